// Choose a kernel instantiation from runtime (ST, C, qreg); the dtype files instantiate these.
#pragma once
#include "p1_bwd.cuh"
#include "p1_bwd_split.cuh"
#include "p1_fwd.cuh"
#include "p2.cuh"

namespace attnres_cuda {

using P1FwdFn = void (*)(const P1FwdArgs);
using P1BwdFn = void (*)(const P1BwdArgs);
using P2FwdFn = void (*)(const P2FwdArgs);
using P2BwdFn = void (*)(const P2BwdArgs);

#define ATTNRES_SELECT_C(KERNEL, FN, ...)                     \
  if (qreg) return C == 1 ? (FN)KERNEL<__VA_ARGS__, 1, true> : nullptr; \
  switch (C) {                                                \
    case 1: return KERNEL<__VA_ARGS__, 1, false>;             \
    case 2: return KERNEL<__VA_ARGS__, 2, false>;             \
    case 4: return KERNEL<__VA_ARGS__, 4, false>;             \
    case 8: return KERNEL<__VA_ARGS__, 8, false>;             \
    default: return nullptr;                                  \
  }

template <typename T, int ST, int W>
P1FwdFn p1_fwd_c(int C, bool qreg) {
  ATTNRES_SELECT_C(p1_fwd_kernel, P1FwdFn, T, ST, W)
}
template <typename T, int ST, int W>
P1BwdFn p1_bwd_c(int C, bool qreg) {
  ATTNRES_SELECT_C(p1_bwd_kernel, P1BwdFn, T, ST, W)
}
#undef ATTNRES_SELECT_C

// Staged phase-1 forward: qfull = all padded queries in one group, else groups of 4.
template <typename T, int ST, int W>
P1FwdFn p1_fwd_staged_c(int C, bool qfull) {
  constexpr int Q4 = ST < 4 ? ST : 4;
  switch (C) {
    case 1: return qfull ? p1_fwd_staged_kernel<T, ST, W, 1, ST> : p1_fwd_staged_kernel<T, ST, W, 1, Q4>;
    case 2: return qfull ? p1_fwd_staged_kernel<T, ST, W, 2, ST> : p1_fwd_staged_kernel<T, ST, W, 2, Q4>;
    case 4: return p1_fwd_staged_kernel<T, ST, W, 4, Q4>;
    default: return nullptr;
  }
}

#define ATTNRES_SELECT_ST(F, MAXST)     \
  switch (ST) {                         \
    case 1: return F<T, 1, W>(C, qreg);   \
    case 4: return F<T, 4, W>(C, qreg);   \
    case 8: return F<T, 8, W>(C, qreg);   \
    case 12: return F<T, 12, W>(C, qreg); \
    case 16: if constexpr (MAXST >= 16) return F<T, 16, W>(C, qreg); else return nullptr; \
    default: return nullptr;            \
  }

template <typename T, int W>
P1FwdFn p1_fwd_select(int ST, int C, bool qreg) {
  ATTNRES_SELECT_ST(p1_fwd_c, 16)
}
template <typename T, int ST, int W>
P1BwdFn p1_bwd_staged_c(int C, bool) {
  switch (C) {
    case 1: return p1_bwd_staged_kernel<T, ST, W, 1>;
    case 2: return p1_bwd_staged_kernel<T, ST, W, 2>;
    case 4: return p1_bwd_staged_kernel<T, ST, W, 4>;
    default: return nullptr;
  }
}
template <typename T, int W>
P1BwdFn p1_bwd_staged_select(int ST, int C, bool qreg) {
  ATTNRES_SELECT_ST(p1_bwd_staged_c, kMaxQueriesBwd)
}
template <typename T, int W>
P1FwdFn p1_fwd_staged_select(int ST, int C, bool qreg) {
  ATTNRES_SELECT_ST(p1_fwd_staged_c, 16)
}
template <typename T, int W>
P1BwdFn p1_bwd_select(int ST, int C, bool qreg) {
  ATTNRES_SELECT_ST(p1_bwd_c, kMaxQueriesBwd)  // 2 ST + 1 partial sums must fit one warp
}
#undef ATTNRES_SELECT_ST

// Split phase-1 backward (ST in {1, 4, 8}; chunk width fixed by dtype and ST).
template <typename T, int ST>
P1BwdFn p1_bwd_coef_c(int C, bool qreg) {
  constexpr int W = p1_split_width<T>(ST);
  switch (C) {
    case 1: return qreg ? p1_bwd_coef_kernel<T, ST, W, 1, true> : p1_bwd_coef_kernel<T, ST, W, 1, false>;
    case 2: return qreg ? p1_bwd_coef_kernel<T, ST, W, 2, true> : p1_bwd_coef_kernel<T, ST, W, 2, false>;
    case 4: return qreg ? p1_bwd_coef_kernel<T, ST, W, 4, true> : p1_bwd_coef_kernel<T, ST, W, 4, false>;
    default: return nullptr;
  }
}
template <typename T>
P1BwdFn p1_bwd_coef_select(int ST, int C, bool qreg) {
  switch (ST) {
    case 1: return p1_bwd_coef_c<T, 1>(C, qreg);
    case 4: return p1_bwd_coef_c<T, 4>(C, qreg);
    case 8: return p1_bwd_coef_c<T, 8>(C, qreg);
    default: return nullptr;
  }
}
template <typename T>
P1BwdFn p1_bwd_apply_select(int ST) {
  switch (ST) {
    case 1: return p1_bwd_apply_kernel<T, 1, p1_split_width<T>(1)>;
    case 4: return p1_bwd_apply_kernel<T, 4, p1_split_width<T>(4)>;
    case 8: return p1_bwd_apply_kernel<T, 8, p1_split_width<T>(8)>;
    default: return nullptr;
  }
}

#define ATTNRES_SELECT_P2_C(KERNEL)          \
  switch (C) {                               \
    case 1: return KERNEL<T, W, 1, NORM>;    \
    case 2: return KERNEL<T, W, 2, NORM>;    \
    case 4: return KERNEL<T, W, 4, NORM>;    \
    case 8: return KERNEL<T, W, 8, NORM>;    \
    default: return nullptr;                 \
  }
template <typename T, int W, bool NORM>
P2FwdFn p2_fwd_c(int C) {
  ATTNRES_SELECT_P2_C(p2_fwd_kernel)
}
template <typename T, int W, bool NORM>
P2BwdFn p2_bwd_c(int C) {
  ATTNRES_SELECT_P2_C(p2_bwd_kernel)
}
#undef ATTNRES_SELECT_P2_C
// Phase 2 forward or backward, with or without the fused norm, as an untyped pointer for the plan.
template <typename T, int W>
const void* p2_select(int C, bool backward, bool norm) {
  if (backward)
    return reinterpret_cast<const void*>(norm ? p2_bwd_c<T, W, true>(C) : p2_bwd_c<T, W, false>(C));
  return reinterpret_cast<const void*>(norm ? p2_fwd_c<T, W, true>(C) : p2_fwd_c<T, W, false>(C));
}

// Defined in the per-dtype files (split so that the build compiles them in parallel).
P1FwdFn p1_fwd_select_f32(int ST, int C, bool qreg);
P1FwdFn p1_fwd_select_bf16(int ST, int C, bool qreg);
P1FwdFn p1_fwd_select_f16(int ST, int C, bool qreg);
P1FwdFn p1_fwd_staged_select_f32(int ST, int C, bool qfull);
P1FwdFn p1_fwd_staged_select_bf16(int ST, int C, bool qfull);
P1FwdFn p1_fwd_staged_select_f16(int ST, int C, bool qfull);
P1BwdFn p1_bwd_select_f32(int ST, int C, bool qreg);
P1BwdFn p1_bwd_select_bf16(int ST, int C, bool qreg);
P1BwdFn p1_bwd_select_f16(int ST, int C, bool qreg);
P1BwdFn p1_bwd_staged_select_f32(int ST, int C);
P1BwdFn p1_bwd_staged_select_bf16(int ST, int C);
P1BwdFn p1_bwd_staged_select_f16(int ST, int C);
P1BwdFn p1_bwd_coef_select_f32(int ST, int C, bool qreg);
P1BwdFn p1_bwd_coef_select_bf16(int ST, int C, bool qreg);
P1BwdFn p1_bwd_coef_select_f16(int ST, int C, bool qreg);
P1BwdFn p1_bwd_apply_select_f32(int ST);
P1BwdFn p1_bwd_apply_select_bf16(int ST);
P1BwdFn p1_bwd_apply_select_f16(int ST);

}  // namespace attnres_cuda
