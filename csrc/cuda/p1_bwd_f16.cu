// Phase-1 backward instantiations for one dtype.
#include "select.cuh"

namespace attnres_cuda {
P1BwdFn p1_bwd_select_f16(int ST, int C, bool qreg) { return p1_bwd_select<__half, 4>(ST, C, qreg); }
}  // namespace attnres_cuda
