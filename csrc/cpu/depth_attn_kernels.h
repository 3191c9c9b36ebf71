// Per-chunk CPU workers of the depth-attention ops: plain C++ on raw pointers, no ATen.
//
// depth_attn_cpu.cpp checks the arguments, allocates the outputs and splits the tokens over threads
// (at::parallel_for); each worker here processes the tokens [t0, t1) of one chunk. The workers are
// compiled twice (GCC target_clones: x86-64-v3 = AVX2 + FMA + F16C, and the baseline) and the
// loader picks the best clone for the CPU, so the wheel stays portable.
//
// T is the storage type of the sources (float, double, or the 16-bit tags bf16 / f16 below, whose
// bit layouts are those of c10::BFloat16 / c10::Half); A is the accumulation type (double for
// double sources, else float). Every source row of a token is converted to A once into a per-chunk
// scratch buffer, then all the arithmetic runs on those A rows.
//
// Notation (csrc/ops.cpp): rms(v) = sqrt(mean(v^2) + eps); z_li = q_l . v_i / rms(v_i);
// lse_l = logsumexp_i z_li; a_li = exp(z_li - lse_l).
#pragma once

#include <cstdint>

namespace attnres::cpu {

struct bf16 {
  uint16_t x;
};
struct f16 {
  uint16_t x;
};

// Phase 1 (and the direct op, S = 1): S queries over n sources.
template <typename T, typename A>
struct Phase1Args {
  int64_t n = 0;  // sources
  int64_t S = 0;  // queries
  int64_t d = 0;
  A eps = 0;
  const T* const* src = nullptr;  // n pointers to [N, d] rows (contiguous)
  const A* q = nullptr;           // [S, d]
  // forward
  T* const* out = nullptr;  // S pointers to [N, d]
  A* lse = nullptr;         // [S, N]
  // backward
  const A* lse_saved = nullptr;        // [S, N] the forward's lse
  const T* const* grad_out = nullptr;  // S pointers to [N, d]
  const A* grad_lse = nullptr;         // [S, N]
  T* const* grad_src = nullptr;        // n pointers to [N, d]
  int64_t N = 0;                       // tokens (row stride of lse / grad_lse)
};

// Phase 2: merge (o, m) with the partial summary p under one query q.
template <typename T, typename A>
struct Phase2Args {
  int64_t d = 0;
  A eps = 0;
  const T* p = nullptr;  // [N, d]
  const A* q = nullptr;  // [d]
  const A* m = nullptr;  // [N] phase-1 lse
  // forward
  const T* o = nullptr;  // [N, d] phase-1 output
  T* h = nullptr;        // [N, d]
  A* lse = nullptr;      // [N]
  // backward (h and lse are the forward's outputs)
  const T* grad_h = nullptr;    // [N, d]
  const A* grad_lse = nullptr;  // [N]
  const T* h_saved = nullptr;   // [N, d]
  const A* lse_saved = nullptr; // [N]
  T* grad_o = nullptr;          // [N, d]
  A* grad_m = nullptr;          // [N]
  T* grad_p = nullptr;          // [N, d]
};

// grad_q: [S, d] (phase 1) or [d] (phase 2) accumulator of this chunk, zero-initialised by the caller.
#define ATTNRES_DECLARE_WORKERS(T, A)                                                   \
  void phase1_forward(const Phase1Args<T, A>& a, int64_t t0, int64_t t1);               \
  void phase1_backward(const Phase1Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q);   \
  void phase2_forward(const Phase2Args<T, A>& a, int64_t t0, int64_t t1);               \
  void phase2_backward(const Phase2Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q);

ATTNRES_DECLARE_WORKERS(float, float)
ATTNRES_DECLARE_WORKERS(double, double)
ATTNRES_DECLARE_WORKERS(bf16, float)
ATTNRES_DECLARE_WORKERS(f16, float)

#undef ATTNRES_DECLARE_WORKERS

}  // namespace attnres::cpu
