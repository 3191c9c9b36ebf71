// Phase 1 forward: S queries over n sources, one token per block at a time (persistent grid).
//
// Pass 1 reads each source chunk once and forms, per thread, the S partial dot products q_l . v_i
// and the partial sum of squares; a warp reduce-scatter and a small shared-memory table finish the
// sums. Pass 2 re-reads the token's sources (L1/L2 hits: the same block read them microseconds
// earlier) and accumulates the softmax-weighted sums. DRAM traffic is the minimum: n rows in, S out.
#pragma once
#include "common.cuh"

namespace attnres_cuda {

// One query over two chunks a thread (e.g. d 7168 bf16 with too many sources to stage): two blocks per
// SM (<= 64 registers). ptxas otherwise picks one block of 96 registers, which measured 1.17x slower on
// an H100 at N 16384, n 33 (5.55 -> 6.48 ms); with the bound it is back to 5.52 ms
// (benchmarks/results/ops_ab_h100_s13_restructure_gate.json).
template <int ST, int C, bool QREG>
constexpr int p1_fwd_min_blocks() {
  return ST == 1 && C == 2 && !QREG ? 2 : 1;
}

template <typename T, int ST, int W, int C, bool QREG>
__global__ void __launch_bounds__(QREG ? 384 : 512, (p1_fwd_min_blocks<ST, C, QREG>())) p1_fwd_kernel(const __grid_constant__ P1FwdArgs a) {
  constexpr int PP = pow2ceil(ST + 1);  // slots: 0..ST-1 dot products, ST sum of squares
  constexpr int U = C == 1 ? 4 : 2;     // sources in flight per thread
  constexpr int G2 = QREG ? ST : (ST < 4 ? ST : 4);  // queries accumulated together in pass 2
  static_assert(!QREG || C == 1, "register-resident queries need one chunk per thread");
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int n = a.n, d = a.d, S = a.S;
  const int64_t N = a.N;
  const int dp = NT * C * W;
  const bool vec = a.vec;
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);  // [nw][n][PP]
  float* zb = red + nw * n * PP;                  // [n][ST]: logits, then softmax weights
  const float inv_d = 1.f / static_cast<float>(d);

  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const int64_t off = t * d;
    float qr[QREG ? ST : 1][1][W];
    ld_q_regs<QREG, ST, W>(qr, a.q, dp, tid);
    // ---- pass 1: logits
    for_source_rows<T, W, U, C>(a.src, n, off, NT, tid, d, vec, [&](int i, const Pack<T, W>(&x)[C]) {
      float part[PP];
      zero(part);
#pragma unroll
      for (int k = 0; k < C; ++k) {
        float v[W];
        unpack<T, W>(x[k], v);
        fma_dot(v, v, part[ST]);
#pragma unroll
        for (int l = 0; l < ST; ++l) {
          float qv[W];
          q_chunk<QREG>(qr, a.q, dp, l, k, NT, tid, qv);
          fma_dot(qv, v, part[l]);
        }
      }
      const float r = warp_reduce_scatter<PP>(part, lane);
      if (rs_writer<PP>(lane)) red[(warp * n + i) * PP + rs_index<PP>(lane)] = r;
    });
    __syncthreads();
    // ---- finish the sums: one thread per source
    for (int i = tid; i < n; i += NT) {
      float s[ST + 1];
      sum_warp_partials(s, red, nw, n, i, PP, ST);
      p1_fwd_logits<ST>(s, inv_d, a.eps, zb, i);
    }
    // ---- softmax over the sources: one thread per query
    p1_fwd_softmax<ST>(zb, n, S, tid, a.lse, a.lse_stride, t);
    // ---- pass 2: weighted sums (the next token's pass 1 writes only `red`; its first barrier
    // orders this pass's reads of `zb` before the next writes)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
      for (int g0 = 0; g0 < S; g0 += G2) {
        float acc[G2][W];
        zero(acc);
        for (int i0 = 0; i0 < n; i0 += U) {
          Pack<T, W> x[U];
          ld_rows_at(x, a.src, i0, n, off, col, d, vec);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (i0 + u < n) {
              float v[W];
              unpack<T, W>(x[u], v);
              fma_rows(acc, zb + (i0 + u) * ST + g0, v);
            }
          }
        }
        st_rows<T>(acc, a.out, g0, S, off, col, d, vec);
      }
    }
  }
}

}  // namespace attnres_cuda

namespace attnres_cuda {

// Staged variant (16-byte aligned rows): the token's n source rows are copied into a ring of K
// shared-memory stages with cp.async, K - 1 tokens ahead, so DRAM reads of the next tokens overlap
// the arithmetic of this one; both passes then read the rows from shared memory (DRAM traffic stays
// the minimum, and pass 2 costs no L2 re-read). Queries are processed in groups of QG whose fp32
// chunks sit in registers (reloaded per token from L1).
template <typename T, int ST, int W, int C, int QG>
__global__ void __launch_bounds__(512, 1) p1_fwd_staged_kernel(const __grid_constant__ P1FwdArgs a) {
  static_assert(ST % QG == 0, "query groups must tile the padded queries");
  constexpr int NG = ST / QG;
  constexpr int PG = pow2ceil(QG + 1);  // per group: QG dot products + the sum of squares
  constexpr int RS = NG * PG;
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int n = a.n, d = a.d, S = a.S, K = a.stages;
  const int64_t N = a.N;
  const int dpad = NT * C * W;
  extern __shared__ float4 smem4[];
  T* stage0 = reinterpret_cast<T*>(smem4);  // [K][n][dpad]
  float* red = reinterpret_cast<float*>(stage0 + static_cast<size_t>(K) * n * dpad);  // [nw][n][RS]
  float* zb = red + nw * n * RS;  // [n][ST]
  const float inv_d = 1.f / static_cast<float>(d);
  const int64_t G = gridDim.x;

  auto issue = [&](int64_t t, int s) {
    if (t < N) {
      T* dst = stage0 + static_cast<size_t>(s) * n * dpad;
      for (int i = 0; i < n; ++i) {
        const T* row = static_cast<const T*>(a.src[i]) + t * d;
        stage_row<16, T, W, C>(dst + i * dpad, row, NT, tid, d);
      }
    }
    cp_async_commit();
  };

  for (int s = 0; s < K - 1; ++s) issue(blockIdx.x + s * G, s);
  int it = 0;
  for (int64_t t = blockIdx.x; t < N; t += G, ++it) {
    const int s = it % K;
    stage_wait(K, t, issue);
    __syncthreads();  // this token's rows are in; every thread is done with the previous token
    if (K > 1) issue(t + (K - 1) * G, (it + K - 1) % K);
    const T* rows = stage0 + static_cast<size_t>(s) * n * dpad;
    const int64_t off = t * d;
    // ---- pass 1: logits, one query group at a time
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      float qr[QG][C][W];
#pragma unroll
      for (int j = 0; j < QG; ++j)
#pragma unroll
        for (int k = 0; k < C; ++k) ld_q<W>(a.q + (g * QG + j) * dpad + (k * NT + tid) * W, qr[j][k]);
      for (int i = 0; i < n; ++i) {
        float part[PG];
        zero(part);
#pragma unroll
        for (int k = 0; k < C; ++k) {
          float v[W];
          unpack<T, W>(ld_vec<T, W>(rows + i * dpad + chunk_col<W>(k, NT, tid)), v);
          fma_dot(v, v, part[QG]);
#pragma unroll
          for (int j = 0; j < QG; ++j) fma_dot(qr[j][k], v, part[j]);
        }
        const float r = warp_reduce_scatter<PG>(part, lane);
        if (rs_writer<PG>(lane)) red[(warp * n + i) * RS + g * PG + rs_index<PG>(lane)] = r;
      }
    }
    __syncthreads();
    for (int i = tid; i < n; i += NT) {
      float acc[ST + 1];
      zero(acc);
      for (int w = 0; w < nw; ++w) {
        const float* rw = red + (w * n + i) * RS;
#pragma unroll
        for (int l = 0; l < ST; ++l) acc[l] += rw[(l / QG) * PG + l % QG];
        acc[ST] += rw[QG];
      }
      p1_fwd_logits<ST>(acc, inv_d, a.eps, zb, i);
    }
    p1_fwd_softmax<ST>(zb, n, S, tid, a.lse, a.lse_stride, t);
    // ---- pass 2: weighted sums from the staged rows
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        if (g * QG < S) {
          float acc[QG][W];
          zero(acc);
          for (int i = 0; i < n; ++i) {
            float v[W];
            unpack<T, W>(ld_vec<T, W>(rows + i * dpad + col), v);
            fma_rows(acc, zb + i * ST + g * QG, v);
          }
          st_rows<T>(acc, a.out, g * QG, S, off, col, d, true);
        }
      }
    }
  }
  cp_async_wait<0>();
}

}  // namespace attnres_cuda
