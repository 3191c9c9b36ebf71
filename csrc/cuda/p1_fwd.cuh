// Phase 1 forward: S queries over n sources, one token per block at a time (persistent grid).
//
// Pass 1 reads each source chunk once and forms, per thread, the S partial dot products q_l . v_i
// and the partial sum of squares; a warp reduce-scatter and a small shared-memory table finish the
// sums. Pass 2 re-reads the token's sources (L1/L2 hits: the same block read them microseconds
// earlier) and accumulates the softmax-weighted sums. DRAM traffic is the minimum: n rows in, S out.
#pragma once
#include "common.cuh"

namespace attnres_cuda {

template <typename T, int ST, int W, int C, bool QREG>
__global__ void __launch_bounds__(QREG ? 384 : 512) p1_fwd_kernel(const __grid_constant__ P1FwdArgs a) {
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
    float qr[QREG ? ST : 1][QREG ? W : 1];
    if constexpr (QREG) {
#pragma unroll
      for (int l = 0; l < ST; ++l) ld_q<W>(a.q + l * dp + tid * W, qr[l]);
    }
    // ---- pass 1: logits
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
            for (int e = 0; e < W; ++e) part[ST] = fmaf(v[e], v[e], part[ST]);
#pragma unroll
            for (int l = 0; l < ST; ++l) {
              float qv[W];
              if constexpr (QREG) {
#pragma unroll
                for (int e = 0; e < W; ++e) qv[e] = qr[l][e];
              } else {
                ld_q<W>(a.q + l * dp + (k * NT + tid) * W, qv);
              }
#pragma unroll
              for (int e = 0; e < W; ++e) part[l] = fmaf(qv[e], v[e], part[l]);
            }
          }
          const float r = warp_reduce_scatter<PP>(part, lane);
          if (rs_writer<PP>(lane)) red[(warp * n + i0 + u) * PP + rs_index<PP>(lane)] = r;
        }
      }
    }
    __syncthreads();
    // ---- finish the sums: one thread per source
    for (int i = tid; i < n; i += NT) {
      float s[ST + 1];
#pragma unroll
      for (int l = 0; l <= ST; ++l) s[l] = 0.f;
      for (int w = 0; w < nw; ++w) {
#pragma unroll
        for (int l = 0; l <= ST; ++l) s[l] += red[(w * n + i) * PP + l];
      }
      const float rinv = rsqrtf(s[ST] * inv_d + a.eps);
#pragma unroll
      for (int l = 0; l < ST; ++l) zb[i * ST + l] = s[l] * rinv;
    }
    __syncthreads();
    // ---- softmax over the sources: one thread per query
    if (tid < ST) {
      const int l = tid;
      if (l < S) {
        float mx = -INFINITY;
        for (int i = 0; i < n; ++i) mx = fmaxf(mx, zb[i * ST + l]);
        float sum = 0.f;
        for (int i = 0; i < n; ++i) sum += __expf(zb[i * ST + l] - mx);
        const float lse = mx + __logf(sum);
        a.lse[l * a.lse_stride + t] = lse;
        for (int i = 0; i < n; ++i) zb[i * ST + l] = __expf(zb[i * ST + l] - lse);
      } else {
        for (int i = 0; i < n; ++i) zb[i * ST + l] = 0.f;
      }
    }
    __syncthreads();
    // ---- pass 2: weighted sums (the next token's pass 1 writes only `red`; its first barrier
    // orders this pass's reads of `zb` before the next writes)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
      for (int g0 = 0; g0 < S; g0 += G2) {
        float acc[G2][W];
#pragma unroll
        for (int j = 0; j < G2; ++j)
#pragma unroll
          for (int e = 0; e < W; ++e) acc[j][e] = 0.f;
        for (int i0 = 0; i0 < n; i0 += U) {
          Pack<T, W> x[U];
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (i0 + u < n) x[u] = ld_chunk<T, W>(static_cast<const T*>(a.src[i0 + u]) + off, col, d, vec);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (i0 + u < n) {
              float v[W];
              unpack<T, W>(x[u], v);
              const float* wrow = zb + (i0 + u) * ST + g0;
#pragma unroll
              for (int j = 0; j < G2; ++j) {
                const float wj = wrow[j];
#pragma unroll
                for (int e = 0; e < W; ++e) acc[j][e] = fmaf(wj, v[e], acc[j][e]);
              }
            }
          }
        }
#pragma unroll
        for (int j = 0; j < G2; ++j)
          if (g0 + j < S) st_chunk<T, W>(static_cast<T*>(a.out[g0 + j]) + off, col, d, vec, acc[j]);
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
#pragma unroll
        for (int k = 0; k < C; ++k) {
          const int col = (k * NT + tid) * W;
          cp_async16(dst + i * dpad + col, row + (col < d ? col : 0), col < d);
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
#pragma unroll
        for (int p = 0; p < PG; ++p) part[p] = 0.f;
#pragma unroll
        for (int k = 0; k < C; ++k) {
          float v[W];
          unpack<T, W>(ld_vec<T, W>(rows + i * dpad + (k * NT + tid) * W), v);
#pragma unroll
          for (int e = 0; e < W; ++e) part[QG] = fmaf(v[e], v[e], part[QG]);
#pragma unroll
          for (int j = 0; j < QG; ++j)
#pragma unroll
            for (int e = 0; e < W; ++e) part[j] = fmaf(qr[j][k][e], v[e], part[j]);
        }
        const float r = warp_reduce_scatter<PG>(part, lane);
        if (rs_writer<PG>(lane)) red[(warp * n + i) * RS + g * PG + rs_index<PG>(lane)] = r;
      }
    }
    __syncthreads();
    for (int i = tid; i < n; i += NT) {
      float acc[ST + 1];
#pragma unroll
      for (int l = 0; l <= ST; ++l) acc[l] = 0.f;
      for (int w = 0; w < nw; ++w) {
        const float* rw = red + (w * n + i) * RS;
#pragma unroll
        for (int l = 0; l < ST; ++l) acc[l] += rw[(l / QG) * PG + l % QG];
        acc[ST] += rw[QG];
      }
      const float rinv = rsqrtf(acc[ST] * inv_d + a.eps);
#pragma unroll
      for (int l = 0; l < ST; ++l) zb[i * ST + l] = acc[l] * rinv;
    }
    __syncthreads();
    if (tid < ST) {
      const int l = tid;
      if (l < S) {
        float mx = -INFINITY;
        for (int i = 0; i < n; ++i) mx = fmaxf(mx, zb[i * ST + l]);
        float sum = 0.f;
        for (int i = 0; i < n; ++i) sum += __expf(zb[i * ST + l] - mx);
        const float lse = mx + __logf(sum);
        a.lse[l * a.lse_stride + t] = lse;
        for (int i = 0; i < n; ++i) zb[i * ST + l] = __expf(zb[i * ST + l] - lse);
      } else {
        for (int i = 0; i < n; ++i) zb[i * ST + l] = 0.f;
      }
    }
    __syncthreads();
    // ---- pass 2: weighted sums from the staged rows
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        if (g * QG < S) {
          float acc[QG][W];
#pragma unroll
          for (int j = 0; j < QG; ++j)
#pragma unroll
            for (int e = 0; e < W; ++e) acc[j][e] = 0.f;
          for (int i = 0; i < n; ++i) {
            float v[W];
            unpack<T, W>(ld_vec<T, W>(rows + i * dpad + col), v);
            const float* wrow = zb + i * ST + g * QG;
#pragma unroll
            for (int j = 0; j < QG; ++j) {
              const float wj = wrow[j];
#pragma unroll
              for (int e = 0; e < W; ++e) acc[j][e] = fmaf(wj, v[e], acc[j][e]);
            }
          }
#pragma unroll
          for (int j = 0; j < QG; ++j)
            if (g * QG + j < S) st_chunk<T, W>(static_cast<T*>(a.out[g * QG + j]) + off, col, d, true, acc[j]);
        }
      }
    }
  }
  cp_async_wait<0>();
}

}  // namespace attnres_cuda
