// Phase 1 backward in two kernels (aligned rows, up to 8 queries per launch).
//
// The fused kernels (p1_bwd.cuh) hold one token per block at a time: per token four block-wide
// barriers and short serial steps, with at most a few tokens in flight per SM (shared-memory
// stages). Here the work splits where the data dependence splits:
//
//   coef:  per token tile, the 2S + 1 dot products of every source (q.v, dO.v, v.v), reduced over
//          the block, then the softmax algebra for the whole tile at once (three barriers per
//          TILE of tokens, the serial steps run by as many threads as the tile has sources):
//          a_li, c_li = dz_li / r_i and e_i = -(sum_l dz_li z_li) / (d r_i^2) go to a small fp32
//          buffer [N, n, CS].
//   apply: dv_i = e_i v_i + sum_l a_li dO_l + sum_l c_li q_l and dq_l += sum_i c_li v_i; every
//          thread owns W columns of a column slice and loops over tokens: no communication at all
//          (the dq partial sums of each block are added in a fixed order afterwards).
//
// Both read the n source rows and the S output-gradient rows (the second read is the price: about
// 1.6x the fused minimum of DRAM traffic), but neither waits on a barrier per token.
#pragma once
#include "common.cuh"

namespace attnres_cuda {

// Floats per (token, source) in the coefficient buffer: a [ST], c [ST], e, padded to 16 bytes.
__host__ __device__ constexpr int p1_coef_stride(int ST) { return (2 * ST + 1 + 3) / 4 * 4; }

// Bytes per chunk of the split kernels: 16 up to 4 queries, 8 beyond (the queries, the dq
// accumulators and the output gradients of a chunk live in registers); the plan uses it too.
__host__ __device__ constexpr int p1_split_chunk_bytes(int ST) { return ST <= 4 ? 16 : 8; }
template <typename T>
__host__ __device__ constexpr int p1_split_width(int ST) {
  return p1_split_chunk_bytes(ST) / static_cast<int>(sizeof(T));
}

template <typename T, int ST, int W, int C, bool QREG>
__global__ void __launch_bounds__(512) p1_bwd_coef_kernel(const __grid_constant__ P1BwdArgs a) {
  constexpr int PP = pow2ceil(2 * ST);  // reduce-scattered: q.v [0, ST), dO.v [ST, 2ST)
  constexpr int RSB = PP + 1;            // + the sum of squares
  constexpr int CS = p1_coef_stride(ST);
  // source rows in flight per thread: 64 bytes (16-byte chunks up to 4 queries, 8-byte ones beyond; with
  // more chunks per thread, fewer rows: registers)
  constexpr int U = ST <= 4 ? 4 : C == 1 ? 8 : 2;
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int n = a.n, d = a.d, S = a.S, TT = a.tile, qld = a.qld;
  const int64_t N = a.N;
  const bool vec = a.vec;
  const int TN = TT * n;
  extern __shared__ float4 smem4[];
  float* red = reinterpret_cast<float*>(smem4);  // [nw][TN][RSB]
  float* za = red + nw * TN * RSB;                // [TN][ST] softmax weights
  float* zz = za + TN * ST;                       // [TN][ST] logits
  float* zc = zz + TN * ST;                       // [TN][ST] dO.v, then dz
  float* rr = zc + TN * ST;                       // [TN] rms
  float* lse_s = rr + TN;                         // [TT][ST]
  float* dm_s = lse_s + TT * ST;                  // [TT][ST]
  const float inv_d = 1.f / static_cast<float>(d);

  float qr[QREG ? ST : 1][QREG ? C : 1][W];
  if constexpr (QREG) {
#pragma unroll
    for (int l = 0; l < ST; ++l)
#pragma unroll
      for (int k = 0; k < C; ++k) ld_q<W>(a.q + l * qld + (k * NT + tid) * W, qr[l][k]);
  }
  const int64_t tiles = (N + TT - 1) / TT;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t t0 = tile * TT;
    const int tt = static_cast<int>(N - t0 < TT ? N - t0 : TT);
    for (int idx = tid; idx < TT * ST; idx += NT) {
      const int j = idx / ST, l = idx % ST;
      const bool ok = j < tt && l < S;
      lse_s[idx] = ok ? a.lse[l * a.lse_stride + t0 + j] : 0.f;
      dm_s[idx] = ok ? a.dlse[l * a.lse_stride + t0 + j] : 0.f;
    }
    // ---- the tile's dot products, reduce-scattered per warp into `red`
    for (int j = 0; j < tt; ++j) {
      const int64_t off = (t0 + j) * d;
      Pack<T, W> go[ST][C];
      ld_grads(go, a.dout, S, off, NT, tid, d, vec);
      for_source_rows<T, W, U, C>(a.src, n, off, NT, tid, d, vec, [&](int i, const Pack<T, W>(&x)[C]) {
        float part[PP];
        float ss = 0.f;
        zero(part);
        p1_bwd_dots<T, W, ST, C, QREG>(x, go, qr, a.q, qld, NT, tid, part, ss);
        const float r = warp_reduce_scatter<PP>(part, lane);
        float* slot = red + (warp * TN + j * n + i) * RSB;
        if (rs_writer<PP>(lane)) slot[rs_index<PP>(lane)] = r;
        ss = warp_sum(ss);
        if (lane == 0) slot[PP] = ss;
      });
    }
    __syncthreads();
    // ---- per (token, source): rms, logits, softmax weights
    for (int idx = tid; idx < tt * n; idx += NT) {
      const int j = idx / n;
      float sm[2 * ST + 1];
      sum_warp_partials(sm, red, nw, TN, idx, RSB, PP);
      p1_bwd_source<ST>(sm, inv_d, a.eps, S, lse_s + j * ST, idx, rr, zz, za, zc);
    }
    __syncthreads();
    // ---- per (token, query): D_l = sum_i a_li g_li, dz_li = a_li (g_li - D_l + dm_l)
    for (int idx = tid; idx < tt * ST; idx += NT) {
      const int j = idx / ST, l = idx % ST;
      p1_bwd_dz<ST>(za, zc, j * n * ST + l, n, dm_s[idx]);
    }
    __syncthreads();
    // ---- per (token, source): the coefficients of dv, out to global memory (16-byte stores)
    for (int idx = tid; idx < tt * n; idx += NT) {
      const float r = rr[idx], rinv = 1.f / r;
      float cf[CS];
      float e = 0.f;
#pragma unroll
      for (int l = 0; l < ST; ++l) {
        const float dz = zc[idx * ST + l];
        e = fmaf(dz, zz[idx * ST + l], e);
        cf[l] = za[idx * ST + l];
        cf[ST + l] = dz * rinv;
      }
      cf[2 * ST] = -e * inv_d * rinv * rinv;
#pragma unroll
      for (int l = 2 * ST + 1; l < CS; ++l) cf[l] = 0.f;
      float4* dst = reinterpret_cast<float4*>(a.coef + (t0 * n + idx) * CS);
#pragma unroll
      for (int l = 0; l < CS; l += 4) dst[l / 4] = make_float4(cf[l], cf[l + 1], cf[l + 2], cf[l + 3]);
    }
    // The next tile writes `red` and lse_s/dm_s before its first barrier: every thread has passed
    // the two barriers after their last reads here.
  }
}

// Grid (column slices, token groups); thread = W columns of one slice, for the group's tokens.
template <typename T, int ST, int W>
__global__ void __launch_bounds__(128) p1_bwd_apply_kernel(const __grid_constant__ P1BwdArgs a) {
  constexpr int CS = p1_coef_stride(ST);
  constexpr int U = 2;  // source rows in flight per thread (more spill registers at 4 queries)
  const int n = a.n, d = a.d, S = a.S, qld = a.qld;
  const int64_t N = a.N;
  const bool vec = a.vec;
  const int dp = gridDim.x * blockDim.x * W;
  // one chunk per thread, at chunk index gtid of the row (chunk_col<W>(0, ., gtid) = col)
  const int gtid = blockIdx.x * blockDim.x + threadIdx.x;
  const int col = gtid * W;
  float qr[ST][W], dq[ST][W];
#pragma unroll
  for (int l = 0; l < ST; ++l) {
    ld_q<W>(a.q + l * qld + col, qr[l]);
#pragma unroll
    for (int e = 0; e < W; ++e) dq[l][e] = 0.f;
  }
  if (col < d) {
    for (int64_t t = blockIdx.y; t < N; t += gridDim.y) {
      const int64_t off = t * d;
      Pack<T, W> go[ST][1];
      ld_grads(go, a.dout, S, off, 0, gtid, d, vec);
      const float4* cft = reinterpret_cast<const float4*>(a.coef + t * n * CS);
      for (int i0 = 0; i0 < n; i0 += U) {
        Pack<T, W> x[U];
        ld_rows_at(x, a.src, i0, n, off, col, d, vec);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = i0 + u;
          if (i < n) {
            float cf[CS];
#pragma unroll
            for (int l = 0; l < CS; l += 4) {
              const float4 f = __ldg(cft + (i * CS + l) / 4);
              cf[l] = f.x, cf[l + 1] = f.y, cf[l + 2] = f.z, cf[l + 3] = f.w;
            }
            float v[W], dv[W];
            unpack<T, W>(x[u], v);
            scale(dv, cf[2 * ST], v);
#pragma unroll
            for (int l = 0; l < ST; ++l) {
              if (l < S) {
                float gv[W];
                unpack<T, W>(go[l][0], gv);
                p1_bwd_dv(cf[l], cf[ST + l], gv, qr[l], v, dv, dq[l]);
              }
            }
            st_chunk<T, W>(static_cast<T*>(a.dsrc[i]) + off, col, d, vec, dv);
          }
        }
      }
    }
  }
  float* dst = a.dq_part + static_cast<int64_t>(blockIdx.y) * ST * dp;
#pragma unroll
  for (int l = 0; l < ST; ++l)
#pragma unroll
    for (int e = 0; e < W; ++e) dst[l * dp + col + e] = dq[l][e];
}

}  // namespace attnres_cuda
