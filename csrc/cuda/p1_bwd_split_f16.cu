// Split phase-1 backward instantiations for one dtype.
#include "select.cuh"

namespace attnres_cuda {
P1BwdFn p1_bwd_coef_select_f16(int ST, int C, bool qreg) { return p1_bwd_coef_select<__half>(ST, C, qreg); }
P1BwdFn p1_bwd_apply_select_f16(int ST) { return p1_bwd_apply_select<__half>(ST); }
}  // namespace attnres_cuda
