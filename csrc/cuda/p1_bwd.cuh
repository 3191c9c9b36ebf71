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

#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int l = 0; l < ST; ++l)
#pragma unroll
      for (int e = 0; e < W; ++e) dqacc[l * dp + (k * NT + tid) * W + e] = 0.f;

  for (int64_t t = blockIdx.x; t < N; t += gridDim.x) {
    const int64_t off = t * d;
    if (tid < ST) {
      lse_s[tid] = tid < S ? a.lse[tid * a.lse_stride + t] : 0.f;
      dm_s[tid] = tid < S ? a.dlse[tid * a.lse_stride + t] : 0.f;
    }
    // the token's output gradients, kept for both passes
    Pack<T, W> go[ST][C];
#pragma unroll
    for (int l = 0; l < ST; ++l)
#pragma unroll
      for (int k = 0; k < C; ++k) {
        if (l < S) {
          go[l][k] = ld_chunk<T, W>(static_cast<const T*>(a.dout[l]) + off, (k * NT + tid) * W, d, vec);
        } else {
#pragma unroll
          for (int j = 0; j < Pack<T, W>::NW; ++j) go[l][k].w[j] = 0u;
        }
      }
    float qr[QREG ? ST : 1][QREG ? W : 1];
    if constexpr (QREG) {
#pragma unroll
      for (int l = 0; l < ST; ++l) ld_q<W>(a.q + l * dp + tid * W, qr[l]);
    }
    // ---- pass A
    for (int i0 = 0; i0 < n; i0 += U) {
      Pack<T, W> x[U][C];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < C; ++k)
          if (i0 + u < n)
            x[u][k] = ld_chunk<T, W>(static_cast<const T*>(a.src[i0 + u]) + off, (k * NT + tid) * W, d, vec);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i0 + u < n) {
          float part[PP];
#pragma unroll
          for (int s = 0; s < PP; ++s) part[s] = 0.f;
#pragma unroll
          for (int k = 0; k < C; ++k) {
            float v[W];
            unpack<T, W>(x[u][k], v);
#pragma unroll
            for (int e = 0; e < W; ++e) part[2 * ST] = fmaf(v[e], v[e], part[2 * ST]);
#pragma unroll
            for (int l = 0; l < ST; ++l) {
              float qv[W], gv[W];
              if constexpr (QREG) {
#pragma unroll
                for (int e = 0; e < W; ++e) qv[e] = qr[l][e];
              } else {
                ld_q<W>(a.q + l * dp + (k * NT + tid) * W, qv);
              }
              unpack<T, W>(go[l][k], gv);
#pragma unroll
              for (int e = 0; e < W; ++e) {
                part[l] = fmaf(qv[e], v[e], part[l]);
                part[ST + l] = fmaf(gv[e], v[e], part[ST + l]);
              }
            }
          }
          const float r = warp_reduce_scatter<PP>(part, lane);
          if (rs_writer<PP>(lane)) red[(warp * n + i0 + u) * PP + rs_index<PP>(lane)] = r;
        }
      }
    }
    __syncthreads();
    // ---- per source: rms, logits, weights
    for (int i = tid; i < n; i += NT) {
      float s[2 * ST + 1];
#pragma unroll
      for (int l = 0; l <= 2 * ST; ++l) s[l] = 0.f;
      for (int w = 0; w < nw; ++w) {
#pragma unroll
        for (int l = 0; l <= 2 * ST; ++l) s[l] += red[(w * n + i) * PP + l];
      }
      const float r = sqrtf(s[2 * ST] * inv_d + a.eps);
      const float rinv = 1.f / r;
      rr[i] = r;
#pragma unroll
      for (int l = 0; l < ST; ++l) {
        const float z = s[l] * rinv;
        zz[i * ST + l] = z;
        za[i * ST + l] = l < S ? __expf(z - lse_s[l]) : 0.f;
        zc[i * ST + l] = s[ST + l];
      }
    }
    __syncthreads();
    // ---- per query: D_l and dz
    if (tid < ST) {
      const int l = tid;
      float D = 0.f;
      for (int i = 0; i < n; ++i) D = fmaf(za[i * ST + l], zc[i * ST + l], D);
      const float dm = dm_s[l];
      for (int i = 0; i < n; ++i) zc[i * ST + l] = za[i * ST + l] * (zc[i * ST + l] - D + dm);
    }
    __syncthreads();
    // ---- per source: coefficients of q_l and v_i in dv_i
    for (int i = tid; i < n; i += NT) {
      const float r = rr[i], rinv = 1.f / r;
      float e = 0.f;
#pragma unroll
      for (int l = 0; l < ST; ++l) {
        const float dz = zc[i * ST + l];
        e = fmaf(dz, zz[i * ST + l], e);
        zc[i * ST + l] = dz * rinv;
      }
      ee[i] = -e * inv_d * rinv * rinv;
    }
    __syncthreads();
    // ---- pass B (the next token's first writes to shared memory other than `red` come after
    // its first barrier, which every thread reaches only once done here)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
      float dqt[ST][W];
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dqt[l][e] = 0.f;
      for (int i0 = 0; i0 < n; i0 += U) {
        Pack<T, W> x[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (i0 + u < n) x[u] = ld_chunk<T, W>(static_cast<const T*>(a.src[i0 + u]) + off, col, d, vec);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (i0 + u < n) {
            const int i = i0 + u;
            float v[W], dv[W];
            unpack<T, W>(x[u], v);
            const float ei = ee[i];
#pragma unroll
            for (int e = 0; e < W; ++e) dv[e] = ei * v[e];
#pragma unroll
            for (int l = 0; l < ST; ++l) {
              const float al = za[i * ST + l], cl = zc[i * ST + l];
              float qv[W], gv[W];
              if constexpr (QREG) {
#pragma unroll
                for (int e = 0; e < W; ++e) qv[e] = qr[l][e];
              } else {
                ld_q<W>(a.q + l * dp + col, qv);
              }
              unpack<T, W>(go[l][k], gv);
#pragma unroll
              for (int e = 0; e < W; ++e) {
                dv[e] = fmaf(al, gv[e], dv[e]);
                dv[e] = fmaf(cl, qv[e], dv[e]);
                dqt[l][e] = fmaf(cl, v[e], dqt[l][e]);
              }
            }
            st_chunk<T, W>(static_cast<T*>(a.dsrc[i]) + off, col, d, vec, dv);
          }
        }
      }
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dqacc[l * dp + col + e] += dqt[l][e];
    }
  }
  if (a.dq_in_smem) {
    float* dst = a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp;
#pragma unroll
    for (int k = 0; k < C; ++k)
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dst[l * dp + (k * NT + tid) * W + e] = dq_s[l * dp + (k * NT + tid) * W + e];
  }
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

#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int l = 0; l < ST; ++l)
#pragma unroll
      for (int e = 0; e < W; ++e) dqacc[l * dp + (k * NT + tid) * W + e] = 0.f;

  auto issue = [&](int64_t t, int s) {
    if (t < N) {
      T* dst = stage0 + static_cast<size_t>(s) * rows_per_stage * dp;
      for (int r = 0; r < rows_per_stage; ++r) {
        const T* row = static_cast<const T*>(r < n ? a.src[r] : a.dout[r - n]) + t * d;
#pragma unroll
        for (int k = 0; k < C; ++k) {
          const int col = (k * NT + tid) * W;
          cp_async<CB>(dst + r * dp + col, row + (col < d ? col : 0), col < d);
        }
      }
    }
    cp_async_commit();
  };

  for (int s = 0; s < K - 1; ++s) issue(blockIdx.x + s * G, s);
  int it = 0;
  for (int64_t t = blockIdx.x; t < N; t += G, ++it) {
    const int s = it % K;
    if (K == 1) {
      issue(t, 0);
      cp_async_wait<0>();
    } else if (K == 2) {
      cp_async_wait<0>();
    } else if (K == 3) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<2>();
    }
    if (tid < ST) {
      lse_s[tid] = tid < S ? a.lse[tid * a.lse_stride + t] : 0.f;
      dm_s[tid] = tid < S ? a.dlse[tid * a.lse_stride + t] : 0.f;
    }
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
#pragma unroll
      for (int p = 0; p < PP; ++p) part[p] = 0.f;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        const int col = (k * NT + tid) * W;
        float v[W];
        unpack<T, W>(ld_vec<T, W>(rows + i * dp + col), v);
#pragma unroll
        for (int e = 0; e < W; ++e) ss = fmaf(v[e], v[e], ss);
#pragma unroll
        for (int l = 0; l < ST; ++l) {
          if (l < S) {
            float gv[W];
            unpack<T, W>(ld_vec<T, W>(grows + l * dp + col), gv);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              part[l] = fmaf(qr[l][k][e], v[e], part[l]);
              part[ST + l] = fmaf(gv[e], v[e], part[ST + l]);
            }
          }
        }
      }
      const float r = warp_reduce_scatter<PP>(part, lane);
      if (rs_writer<PP>(lane)) red[(warp * n + i) * RSB + rs_index<PP>(lane)] = r;
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) red[(warp * n + i) * RSB + PP] = ss;
    }
    __syncthreads();
    for (int i = tid; i < n; i += NT) {
      float sm[2 * ST + 1];
#pragma unroll
      for (int l = 0; l <= 2 * ST; ++l) sm[l] = 0.f;
      for (int w = 0; w < nw; ++w) {
#pragma unroll
        for (int l = 0; l < 2 * ST; ++l) sm[l] += red[(w * n + i) * RSB + l];
        sm[2 * ST] += red[(w * n + i) * RSB + PP];
      }
      const float r = sqrtf(sm[2 * ST] * inv_d + a.eps);
      const float rinv = 1.f / r;
      rr[i] = r;
#pragma unroll
      for (int l = 0; l < ST; ++l) {
        const float z = sm[l] * rinv;
        zz[i * ST + l] = z;
        za[i * ST + l] = l < S ? __expf(z - lse_s[l]) : 0.f;
        zc[i * ST + l] = sm[ST + l];
      }
    }
    __syncthreads();
    if (tid < ST) {
      const int l = tid;
      float D = 0.f;
      for (int i = 0; i < n; ++i) D = fmaf(za[i * ST + l], zc[i * ST + l], D);
      const float dm = dm_s[l];
      for (int i = 0; i < n; ++i) zc[i * ST + l] = za[i * ST + l] * (zc[i * ST + l] - D + dm);
    }
    __syncthreads();
    for (int i = tid; i < n; i += NT) {
      const float r = rr[i], rinv = 1.f / r;
      float e = 0.f;
#pragma unroll
      for (int l = 0; l < ST; ++l) {
        const float dz = zc[i * ST + l];
        e = fmaf(dz, zz[i * ST + l], e);
        zc[i * ST + l] = dz * rinv;
      }
      ee[i] = -e * inv_d * rinv * rinv;
    }
    __syncthreads();
    // ---- pass B
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
      float dqt[ST][W];
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dqt[l][e] = 0.f;
      for (int i = 0; i < n; ++i) {
        float v[W], dv[W];
        unpack<T, W>(ld_vec<T, W>(rows + i * dp + col), v);
        const float ei = ee[i];
#pragma unroll
        for (int e = 0; e < W; ++e) dv[e] = ei * v[e];
#pragma unroll
        for (int l = 0; l < ST; ++l) {
          if (l < S) {
            const float al = za[i * ST + l], cl = zc[i * ST + l];
            float gv[W];
            unpack<T, W>(ld_vec<T, W>(grows + l * dp + col), gv);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              dv[e] = fmaf(al, gv[e], dv[e]);
              dv[e] = fmaf(cl, qr[l][k][e], dv[e]);
              dqt[l][e] = fmaf(cl, v[e], dqt[l][e]);
            }
          }
        }
        st_chunk<T, W>(static_cast<T*>(a.dsrc[i]) + off, col, d, true, dv);
      }
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dqacc[l * dp + col + e] += dqt[l][e];
    }
  }
  cp_async_wait<0>();
  if (a.dq_in_smem) {
    float* dst = a.dq_part + static_cast<int64_t>(blockIdx.x) * ST * dp;
#pragma unroll
    for (int k = 0; k < C; ++k)
#pragma unroll
      for (int l = 0; l < ST; ++l)
#pragma unroll
        for (int e = 0; e < W; ++e) dst[l * dp + (k * NT + tid) * W + e] = dq_s[l * dp + (k * NT + tid) * W + e];
  }
}

}  // namespace attnres_cuda
