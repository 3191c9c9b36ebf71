// Staged phase-1 backward instantiations for one dtype.
#include "select.cuh"

namespace attnres_cuda {
P1BwdFn p1_bwd_staged_select_f32(int ST, int C) { return p1_bwd_staged_select<float, 4>(ST, C, false); }
}  // namespace attnres_cuda
