// Phase-1 forward instantiations for one dtype.
#include "select.cuh"

namespace attnres_cuda {
P1FwdFn p1_fwd_select_bf16(int ST, int C, bool qreg) { return p1_fwd_select<__nv_bfloat16, 8>(ST, C, qreg); }
}  // namespace attnres_cuda
