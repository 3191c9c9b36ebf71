// Phase 1 backward, one token per block at a time (persistent grid).
//
// With a_li = exp(z_li - lse_l), g_li = dO_l . v_i, D_l = sum_i a_li g_li,
// dz_li = a_li (g_li - D_l + dm_l):
//   dv_i = sum_l a_li dO_l + sum_l (dz_li / r_i) q_l - (sum_l dz_li z_li) / (d r_i^2) v_i
//   dq_l = sum_tokens sum_i (dz_li / r_i) v_i
// Pass A reads each source once (q . v, dO . v, v . v: 2S + 1 partial sums, reduce-scattered);
// the token's S output gradients stay in registers. Pass B re-reads the sources (L1/L2 hits) and
// writes dv. dq accumulates per block (shared memory or a per-block global slab, each thread
// owning its columns, so no atomics), and launch_sum_partials adds the blocks up in a fixed order.
#pragma once
#include "common.cuh"

namespace attnres_cuda {

template <typename T, int ST, int W, int C, bool QREG>
__global__ void __launch_bounds__(512) p1_bwd_kernel(const __grid_constant__ P1BwdArgs a) {
  constexpr int PP = pow2ceil(2 * ST + 1);  // slots: q.v [0, ST), dO.v [ST, 2ST), v.v 2ST
  constexpr int U = 2;
  static_assert(!QREG || C == 1, "register-resident queries need one chunk per thread");
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int n = a.n, d = a.d, S = a.S;
  const int64_t N = a.N;
  const int dp = NT * C * W;
  const bool vec = a.vec;
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);  // [nw][n][PP]
  float* za = red + nw * n * PP;                  // [n][ST] softmax weights
  float* zz = za + n * ST;                        // [n][ST] logits
  float* zc = zz + n * ST;                        // [n][ST] g, then dz, then dz / r
  float* rr = zc + n * ST;                        // [n] rms
  float* ee = rr + n;                             // [n] coefficient of v in dv
  float* lse_s = ee + n;                          // [ST]
  float* dm_s = lse_s + ST;                       // [ST]
  float* dq_s = dm_s + ST;                        // [ST][dp] when a.dq_in_smem (16-byte aligned by the host)
  float* dqacc = a.dq_in_smem ? dq_s : a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp;
  const float inv_d = 1.f / static_cast<float>(d);

  zero_rows<ST, C, W>(dqacc, dp, NT, tid);

  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const int64_t off = t * d;
    p1_bwd_ld_lse<ST>(lse_s, dm_s, a.lse, a.dlse, a.lse_stride, t, S, tid);
    // the token's output gradients, kept for both passes
    Pack<T, W> go[ST][C];
    ld_grads(go, a.dout, S, off, NT, tid, d, vec);
    float qr[QREG ? ST : 1][1][W];
    ld_q_regs<QREG, ST, W>(qr, a.q, dp, tid);
    // ---- pass A
    for_source_rows<T, W, U, C>(a.src, n, off, NT, tid, d, vec, [&](int i, const Pack<T, W>(&x)[C]) {
      float part[PP];
      zero(part);
      p1_bwd_dots<T, W, ST, C, QREG>(x, go, qr, a.q, dp, NT, tid, part, part[2 * ST]);
      const float r = warp_reduce_scatter<PP>(part, lane);
      if (rs_writer<PP>(lane)) red[(warp * n + i) * PP + rs_index<PP>(lane)] = r;
    });
    __syncthreads();
    // ---- per source: rms, logits, weights
    p1_bwd_weights<ST>(red, nw, PP, 2 * ST, inv_d, a.eps, S, lse_s, dm_s, n, tid, NT, rr, zz, za, zc, ee);
    // ---- pass B (the next token's first writes to shared memory other than `red` come after
    // its first barrier, which every thread reaches only once done here)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = chunk_col<W>(k, NT, tid);
      float dqt[ST][W];
      zero(dqt);
      for (int i0 = 0; i0 < n; i0 += U) {
        Pack<T, W> x[U];
        ld_rows_at(x, a.src, i0, n, off, col, d, vec);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (i0 + u < n) {
            const int i = i0 + u;
            float v[W], dv[W];
            unpack<T, W>(x[u], v);
            scale(dv, ee[i], v);
#pragma unroll
            for (int l = 0; l < ST; ++l) {
              const float al = za[i * ST + l], cl = zc[i * ST + l];
              float qv[W], gv[W];
              q_chunk<QREG>(qr, a.q, dp, l, k, NT, tid, qv);
              unpack<T, W>(go[l][k], gv);
              p1_bwd_dv(al, cl, gv, qv, v, dv, dqt[l]);
            }
            st_chunk<T, W>(static_cast<T*>(a.dsrc[i]) + off, col, d, vec, dv);
          }
        }
      }
      add_rows(dqacc, dp, col, dqt);
    }
  }
  if (a.dq_in_smem) copy_rows<ST, C, W>(a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp, dq_s, dp, NT, tid);
}

}  // namespace attnres_cuda

namespace attnres_cuda {

// Staged variant (aligned rows): the token's n source rows and S output-gradient rows are copied
// into a ring of K shared-memory stages with cp.async, K - 1 tokens ahead; both passes read them
// from shared memory. Queries sit in registers (reloaded per token from L1).
template <typename T, int ST, int W, int C>
__global__ void __launch_bounds__(512, 1) p1_bwd_staged_kernel(const __grid_constant__ P1BwdArgs a) {
  constexpr int PP = pow2ceil(2 * ST);  // reduce-scattered: q.v [0, ST), dO.v [ST, 2ST)
  constexpr int RSB = PP + 1;            // + the sum of squares, reduced on its own
  constexpr int CB = W * static_cast<int>(sizeof(T));  // bytes per chunk
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int n = a.n, d = a.d, S = a.S, K = a.stages;
  const int64_t N = a.N;
  const int dp = NT * C * W;
  const int rows_per_stage = n + S;
  extern __shared__ float4 smem4[];
  T* stage0 = reinterpret_cast<T*>(smem4);  // [K][n + S][dp]
  float* red = reinterpret_cast<float*>(stage0 + static_cast<size_t>(K) * rows_per_stage * dp);  // [nw][n][RSB]
  float* za = red + nw * n * RSB;
  float* zz = za + n * ST;
  float* zc = zz + n * ST;
  float* rr = zc + n * ST;
  float* ee = rr + n;
  float* lse_s = ee + n;
  float* dm_s = lse_s + ST;
  float* dq_s = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(dm_s + ST) + 15) & ~static_cast<uintptr_t>(15));  // [ST][dp]
  float* dqacc = a.dq_in_smem ? dq_s : a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp;
  const float inv_d = 1.f / static_cast<float>(d);
  const int64_t G = gridDim.x;

  zero_rows<ST, C, W>(dqacc, dp, NT, tid);

  auto issue = [&](int64_t t, int s) {
    if (t < N) {
      T* dst = stage0 + static_cast<size_t>(s) * rows_per_stage * dp;
      for (int r = 0; r < rows_per_stage; ++r) {
        const T* row = static_cast<const T*>(r < n ? a.src[r] : a.dout[r - n]) + t * d;
        stage_row<CB, T, W, C>(dst + r * dp, row, NT, tid, d);
      }
    }
    cp_async_commit();
  };

  for (int s = 0; s < K - 1; ++s) issue(blockIdx.x + s * G, s);
  int it = 0;
  for (int64_t t = blockIdx.x; t < N; t += G, ++it) {
    const int s = it % K;
    stage_wait(K, t, issue);
    p1_bwd_ld_lse<ST>(lse_s, dm_s, a.lse, a.dlse, a.lse_stride, t, S, tid);
    __syncthreads();
    if (K > 1) issue(t + (K - 1) * G, (it + K - 1) % K);
    const T* rows = stage0 + static_cast<size_t>(s) * rows_per_stage * dp;
    const T* grows = rows + static_cast<size_t>(n) * dp;
    const int64_t off = t * d;
    float qr[ST][C][W];
#pragma unroll
    for (int l = 0; l < ST; ++l)
#pragma unroll
      for (int k = 0; k < C; ++k) ld_q<W>(a.q + l * dp + (k * NT + tid) * W, qr[l][k]);
    // ---- pass A
    for (int i = 0; i < n; ++i) {
      float part[PP];
      float ss = 0.f;
      zero(part);
#pragma unroll
      for (int k = 0; k < C; ++k) {
        const int col = chunk_col<W>(k, NT, tid);
        float v[W];
        unpack<T, W>(ld_vec<T, W>(rows + i * dp + col), v);
        fma_dot(v, v, ss);
#pragma unroll
        for (int l = 0; l < ST; ++l) {
          if (l < S) {
            float gv[W];
            unpack<T, W>(ld_vec<T, W>(grows + l * dp + col), gv);
            fma_dot2(qr[l][k], gv, v, part[l], part[ST + l]);
          }
        }
      }
      const float r = warp_reduce_scatter<PP>(part, lane);
      if (rs_writer<PP>(lane)) red[(warp * n + i) * RSB + rs_index<PP>(lane)] = r;
      ss = warp_sum(ss);
      if (lane == 0) red[(warp * n + i) * RSB + PP] = ss;
    }
    __syncthreads();
    p1_bwd_weights<ST>(red, nw, RSB, PP, inv_d, a.eps, S, lse_s, dm_s, n, tid, NT, rr, zz, za, zc, ee);
    // ---- pass B
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = chunk_col<W>(k, NT, tid);
      float dqt[ST][W];
      zero(dqt);
      for (int i = 0; i < n; ++i) {
        float v[W], dv[W];
        unpack<T, W>(ld_vec<T, W>(rows + i * dp + col), v);
        scale(dv, ee[i], v);
#pragma unroll
        for (int l = 0; l < ST; ++l) {
          if (l < S) {
            const float al = za[i * ST + l], cl = zc[i * ST + l];
            float gv[W];
            unpack<T, W>(ld_vec<T, W>(grows + l * dp + col), gv);
            p1_bwd_dv(al, cl, gv, qr[l][k], v, dv, dqt[l]);
          }
        }
        st_chunk<T, W>(static_cast<T*>(a.dsrc[i]) + off, col, d, true, dv);
      }
      add_rows(dqacc, dp, col, dqt);
    }
  }
  cp_async_wait<0>();
  if (a.dq_in_smem) copy_rows<ST, C, W>(a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp, dq_s, dp, NT, tid);
}

}  // namespace attnres_cuda
