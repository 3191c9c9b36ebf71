// Staged phase-1 forward instantiations for one dtype.
#include "select.cuh"

namespace attnres_cuda {
P1FwdFn p1_fwd_staged_select_f16(int ST, int C, bool qfull) { return p1_fwd_staged_select<__half, 8>(ST, C, qfull); }
}  // namespace attnres_cuda
