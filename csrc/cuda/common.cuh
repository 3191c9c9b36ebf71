// Device helpers shared by the depth-attention kernels: dtype conversion, chunked row loads and
// stores (16-byte vectors when rows are aligned, a guarded scalar path for any other d), and the
// warp reduce-scatter that turns PP per-thread partial sums into one reduced value per lane.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "launch.h"

namespace attnres_cuda {

// fp32 <-> T, for T = float, __nv_bfloat16, __half (round to nearest even for the 16-bit types).
template <typename T>
__device__ __forceinline__ float to_f(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}
template <typename T>
__device__ __forceinline__ T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}

// W consecutive elements of a row as raw 32-bit words (W * sizeof(T) is 8 or 16 bytes), so that
// loads and stores are single vector accesses (an array of __nv_bfloat16 is copied element-wise).
template <typename T, int W>
struct Pack {
  static constexpr int NW = W * static_cast<int>(sizeof(T)) / 4;
  static_assert(NW == 2 || NW == 4, "a chunk is 8 or 16 bytes");
  uint32_t w[NW];
};

template <typename T, int W>
__device__ __forceinline__ void zero(Pack<T, W>& p) {
#pragma unroll
  for (int j = 0; j < Pack<T, W>::NW; ++j) p.w[j] = 0u;
}

template <typename T>
__device__ __forceinline__ uint32_t bits16(T x) {
  return static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&x));
}

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> ld_vec(const T* p) {
  Pack<T, W> r;
  if constexpr (Pack<T, W>::NW == 4) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    r.w[0] = u.x, r.w[1] = u.y, r.w[2] = u.z, r.w[3] = u.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    r.w[0] = u.x, r.w[1] = u.y;
  }
  return r;
}

// Chunk at column `col` of `row` (row has d valid elements). vec: the row is aligned to the chunk
// size and d % W == 0. Columns at or past d read as zero, so they add nothing to any dot product.
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> ld_chunk(const T* __restrict__ row, int col, int d, bool vec) {
  Pack<T, W> p;
  if (vec) {
    if (col < d) return ld_vec<T, W>(row + col);
    zero(p);
    return p;
  }
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < W; ++e) p.w[e] = col + e < d ? __float_as_uint(static_cast<float>(row[col + e])) : 0u;
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) {
      const uint32_t lo = col + 2 * j < d ? bits16(row[col + 2 * j]) : 0u;
      const uint32_t hi = col + 2 * j + 1 < d ? bits16(row[col + 2 * j + 1]) : 0u;
      p.w[j] = lo | (hi << 16);
    }
  }
  return p;
}

template <typename T, int W>
__device__ __forceinline__ void unpack(const Pack<T, W>& p, float (&x)[W]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < W; ++e) x[e] = __uint_as_float(p.w[e]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) {
      x[2 * j] = __uint_as_float(p.w[j] << 16);
      x[2 * j + 1] = __uint_as_float(p.w[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) {
      __half2 h;
      memcpy(&h, &p.w[j], 4);
      const float2 f = __half22float2(h);
      x[2 * j] = f.x;
      x[2 * j + 1] = f.y;
    }
  }
}

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> pack(const float (&x)[W]) {
  Pack<T, W> p;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < W; ++e) p.w[e] = __float_as_uint(x[e]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * j], x[2 * j + 1]);
      memcpy(&p.w[j], &h, 4);
    }
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) {
      const __half2 h = __floats2half2_rn(x[2 * j], x[2 * j + 1]);
      memcpy(&p.w[j], &h, 4);
    }
  }
  return p;
}

template <typename T, int W>
__device__ __forceinline__ void st_chunk(T* __restrict__ row, int col, int d, bool vec, const float (&x)[W]) {
  const Pack<T, W> p = pack<T, W>(x);
  if (vec) {
    if (col < d) {
      if constexpr (Pack<T, W>::NW == 4) {
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(row + col), "r"(p.w[0]), "r"(p.w[1]),
                     "r"(p.w[2]), "r"(p.w[3])
                     : "memory");
      } else {
        asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(row + col), "r"(p.w[0]), "r"(p.w[1]) : "memory");
      }
    }
    return;
  }
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < W; ++e)
      if (col + e < d) row[col + e] = __uint_as_float(p.w[e]);
  } else {
    unsigned short* r16 = reinterpret_cast<unsigned short*>(row);
#pragma unroll
    for (int e = 0; e < W; ++e)
      if (col + e < d) r16[col + e] = static_cast<unsigned short>(p.w[e / 2] >> (16 * (e % 2)));
  }
}

// cp.async of one 16-byte chunk (or zeros past d) into shared memory; sm_80 and later.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
// 8-byte variant (through L1: .cg takes 16-byte copies only).
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
  if constexpr (BYTES == 16) {
    cp_async16(smem, gmem, valid);
  } else {
    static_assert(BYTES == 8, "8- or 16-byte chunks");
    cp_async8(smem, gmem, valid);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A select the compiler cannot turn into a run-time-indexed (local-memory) array access.
__device__ __forceinline__ float select(bool p, float a, float b) {
  float r;
  asm("{\n .reg .pred q;\n setp.ne.u32 q, %1, 0;\n selp.f32 %0, %2, %3, q;\n}" : "=f"(r) : "r"(static_cast<unsigned>(p)), "f"(a), "f"(b));
  return r;
}

// W fp32 values of the padded query buffer (always in bounds and 16-byte aligned).
template <int W>
__device__ __forceinline__ void ld_q(const float* __restrict__ q, float (&x)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int e = 0; e < W; e += 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(q + e));
      x[e] = f.x;
      x[e + 1] = f.y;
      x[e + 2] = f.z;
      x[e + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) x[e] = __ldg(q + e);
  }
}

// W fp32 query values at column col of an unpadded [d] row: vector loads where aligned, zeros past d.
template <int W>
__device__ __forceinline__ void ld_q_guarded(const float* __restrict__ q, int col, int d, bool qvec, float (&x)[W]) {
  if (qvec && col + W <= d) {
    ld_q<W>(q + col, x);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) x[e] = col + e < d ? __ldg(q + col + e) : 0.f;
  }
}

constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
constexpr int pow2ceil(int x) { return x <= 1 ? 1 : 2 * pow2ceil((x + 1) / 2); }

template <int H, int OFF, int PP>
__device__ __forceinline__ void rs_steps(float (&v)[PP], int lane) {
  if constexpr (H >= 1) {
    const bool upper = lane & OFF;
#pragma unroll
    for (int j = 0; j < H; ++j) {
      const float send = select(upper, v[j], v[j + H]);
      const float keep = select(upper, v[j + H], v[j]);
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    rs_steps<H / 2, OFF / 2, PP>(v, lane);
  }
}

// Reduce-scatter over the warp: every lane holds PP partial sums (PP a power of two <= 32); after
// log2(PP) halving steps and 5 - log2(PP) plain butterfly steps each lane holds the warp-wide sum
// of value lane >> (5 - log2 PP). PP - 1 + 5 - log2 PP shuffles instead of 5 * PP.
template <int PP>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[PP], int lane) {
  constexpr int LOG = ilog2(PP);
  static_assert((1 << LOG) == PP && PP <= 32, "PP must be a power of two <= 32");
  rs_steps<PP / 2, 16, PP>(v, lane);
  float r = v[0];
#pragma unroll
  for (int off = 16 >> LOG; off >= 1; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
  return r;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int PP>
__device__ __forceinline__ bool rs_writer(int lane) {
  return (lane & ((32 / PP) - 1)) == 0;
}
template <int PP>
__device__ __forceinline__ int rs_index(int lane) {
  return lane / (32 / PP);
}

// ---- Blocks shared by the kernel bodies (see the note at the top of this file). Each keeps the
// arithmetic, the order of operations and the index expressions of the code it replaced.

template <int P>
__device__ __forceinline__ void zero(float (&x)[P]) {
#pragma unroll
  for (int p = 0; p < P; ++p) x[p] = 0.f;
}
template <int R, int W>
__device__ __forceinline__ void zero(float (&x)[R][W]) {
#pragma unroll
  for (int r = 0; r < R; ++r) zero(x[r]);
}

// Column of chunk k of a thread that owns the chunks k NT + tid (k < C) of a row.
template <int W>
__device__ __forceinline__ int chunk_col(int k, int NT, int tid) {
  return (k * NT + tid) * W;
}

// The chunks of rows i0 .. i0 + U - 1 (rows[i] + off: [d], dtype T) that the thread reads: its C
// chunks (ld_rows), or the one at column col (ld_rows_at). Rows at or past n are not read.
template <typename T, int W, int U, int C>
__device__ __forceinline__ void ld_rows(Pack<T, W> (&x)[U][C], const void* const* rows, int i0, int n, int64_t off,
                                        int NT, int tid, int d, bool vec) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int k = 0; k < C; ++k)
      if (i0 + u < n)
        x[u][k] = ld_chunk<T, W>(static_cast<const T*>(rows[i0 + u]) + off, chunk_col<W>(k, NT, tid), d, vec);
}
template <typename T, int W, int U>
__device__ __forceinline__ void ld_rows_at(Pack<T, W> (&x)[U], const void* const* rows, int i0, int n, int64_t off,
                                           int col, int d, bool vec) {
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (i0 + u < n) x[u] = ld_chunk<T, W>(static_cast<const T*>(rows[i0 + u]) + off, col, d, vec);
}

// One pass over the token's n source rows for the reduce-scattered dot products: U rows loaded at a
// time (each thread its C chunks, ld_rows), and for each row i < n, body(i, x) with x its chunks.
template <typename T, int W, int U, int C, typename Body>
__device__ __forceinline__ void for_source_rows(const void* const* rows, int n, int64_t off, int NT, int tid, int d,
                                                bool vec, Body&& body) {
  for (int i0 = 0; i0 < n; i0 += U) {
    Pack<T, W> x[U][C];
    ld_rows(x, rows, i0, n, off, NT, tid, d, vec);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u < n) body(i0 + u, x[u]);
  }
}

// s[l] for l < L - 1, and s[L - 1] from slot ss: the sums over the block's nw warps of row i's
// reduce-scattered partials (red: [nw][rows][stride]), each summed in warp order.
template <int L>
__device__ __forceinline__ void sum_warp_partials(float (&s)[L], const float* red, int nw, int rows, int i, int stride,
                                                  int ss) {
  zero(s);
  for (int w = 0; w < nw; ++w) {
    const float* slot = red + (w * rows + i) * stride;
#pragma unroll
    for (int l = 0; l < L - 1; ++l) s[l] += slot[l];
    s[L - 1] += slot[ss];
  }
}

// The thread's C chunks of the token's output gradients dO_l (dout[l] + off: [d]) for l < S, zeros
// for the padded queries.
template <typename T, int W, int ST, int C>
__device__ __forceinline__ void ld_grads(Pack<T, W> (&go)[ST][C], const void* const* dout, int S, int64_t off, int NT,
                                         int tid, int d, bool vec) {
#pragma unroll
  for (int l = 0; l < ST; ++l)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      if (l < S) {
        go[l][k] = ld_chunk<T, W>(static_cast<const T*>(dout[l]) + off, chunk_col<W>(k, NT, tid), d, vec);
      } else {
        zero(go[l][k]);
      }
    }
}

// Query l's chunk k: from the registers qr (QREG) or from the buffer q ([., ld], through L1).
template <bool QREG, int W, int R, int RC>
__device__ __forceinline__ void q_chunk(const float (&qr)[R][RC][W], const float* q, int ld, int l, int k, int NT,
                                        int tid, float (&qv)[W]) {
  if constexpr (QREG) {
#pragma unroll
    for (int e = 0; e < W; ++e) qv[e] = qr[l][k][e];
  } else {
    ld_q<W>(q + l * ld + chunk_col<W>(k, NT, tid), qv);
  }
}

// acc += a . b over one chunk (FMAs in column order).
template <int W>
__device__ __forceinline__ void fma_dot(const float (&a)[W], const float (&b)[W], float& acc) {
#pragma unroll
  for (int e = 0; e < W; ++e) acc = fmaf(a[e], b[e], acc);
}
// acc_q += q . v and acc_g += g . v over one chunk, interleaved column by column.
template <int W>
__device__ __forceinline__ void fma_dot2(const float (&q)[W], const float (&g)[W], const float (&v)[W], float& acc_q,
                                         float& acc_g) {
#pragma unroll
  for (int e = 0; e < W; ++e) {
    acc_q = fmaf(q[e], v[e], acc_q);
    acc_g = fmaf(g[e], v[e], acc_g);
  }
}

// y = a x over one chunk.
template <int W>
__device__ __forceinline__ void scale(float (&y)[W], float a, const float (&x)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) y[e] = a * x[e];
}

// acc[j] += wrow[j] v for j < G (one chunk of G weighted sums).
template <int G, int W>
__device__ __forceinline__ void fma_rows(float (&acc)[G][W], const float* wrow, const float (&v)[W]) {
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const float wj = wrow[j];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[j][e] = fmaf(wj, v[e], acc[j][e]);
  }
}

// Store chunk `col` of out[g0 + j] + off (dtype T), j < G, for the rows g0 + j < S.
template <typename T, int W, int G>
__device__ __forceinline__ void st_rows(const float (&acc)[G][W], void* const* out, int g0, int S, int64_t off, int col,
                                        int d, bool vec) {
#pragma unroll
  for (int j = 0; j < G; ++j)
    if (g0 + j < S) st_chunk<T, W>(static_cast<T*>(out[g0 + j]) + off, col, d, vec, acc[j]);
}

// The thread's C chunks of R fp32 rows of width ld (x: [R, ld]) set to zero, or copied from src.
template <int R, int C, int W>
__device__ __forceinline__ void zero_rows(float* x, int ld, int NT, int tid) {
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int l = 0; l < R; ++l)
#pragma unroll
      for (int e = 0; e < W; ++e) x[l * ld + chunk_col<W>(k, NT, tid) + e] = 0.f;
}
template <int R, int C, int W>
__device__ __forceinline__ void copy_rows(float* dst, const float* src, int ld, int NT, int tid) {
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int l = 0; l < R; ++l)
#pragma unroll
      for (int e = 0; e < W; ++e)
        dst[l * ld + chunk_col<W>(k, NT, tid) + e] = src[l * ld + chunk_col<W>(k, NT, tid) + e];
}
// x[l, col + e] += v[l][e].
template <int R, int W>
__device__ __forceinline__ void add_rows(float* x, int ld, int col, const float (&v)[R][W]) {
#pragma unroll
  for (int l = 0; l < R; ++l)
#pragma unroll
    for (int e = 0; e < W; ++e) x[l * ld + col + e] += v[l][e];
}

// ---- cp.async staging of a token's rows (the staged phase-1 kernels)

// The thread's C chunks of one row (d valid elements, dtype T) into the shared-memory row dst;
// chunks at or past d are zero-filled. CB: bytes per chunk.
template <int CB, typename T, int W, int C>
__device__ __forceinline__ void stage_row(T* dst, const T* row, int NT, int tid, int d) {
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int col = chunk_col<W>(k, NT, tid);
    cp_async<CB>(dst + col, row + (col < d ? col : 0), col < d);
  }
}

// Wait for token t's stage in a ring of K stages filled K - 1 tokens ahead (K = 1: issue it now).
template <typename Issue>
__device__ __forceinline__ void stage_wait(int K, int64_t t, const Issue& issue) {
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
}

// ---- phase-1 forward: the per-token scalar steps

// Logits of source i from its sums s over the warps (the ST dot products, then the sum of squares):
// z_il = s_l / rms into zb [n][ST].
template <int ST>
__device__ __forceinline__ void p1_fwd_logits(const float (&s)[ST + 1], float inv_d, float eps, float* zb, int i) {
  const float rinv = rsqrtf(s[ST] * inv_d + eps);
#pragma unroll
  for (int l = 0; l < ST; ++l) zb[i * ST + l] = s[l] * rinv;
}

// Softmax over the n sources, one thread per query l = tid < ST, between two barriers: zb [n][ST]
// holds the logits and gets the weights (zeros for the padded queries l >= S); lse[l * lse_stride + t]
// gets the log-sum-exp.
template <int ST>
__device__ __forceinline__ void p1_fwd_softmax(float* zb, int n, int S, int tid, float* lse, int64_t lse_stride,
                                               int64_t t) {
  __syncthreads();
  if (tid < ST) {
    const int l = tid;
    if (l < S) {
      float mx = -INFINITY;
      for (int i = 0; i < n; ++i) mx = fmaxf(mx, zb[i * ST + l]);
      float sum = 0.f;
      for (int i = 0; i < n; ++i) sum += __expf(zb[i * ST + l] - mx);
      const float m = mx + __logf(sum);
      lse[l * lse_stride + t] = m;
      for (int i = 0; i < n; ++i) zb[i * ST + l] = __expf(zb[i * ST + l] - m);
    } else {
      for (int i = 0; i < n; ++i) zb[i * ST + l] = 0.f;
    }
  }
  __syncthreads();
}

// ---- phase-1 backward (fused, staged and split kernels): per-token steps

// The token's lse_l and d lse_l (row stride lse_stride, column t) into shared memory, zeros for l >= S.
template <int ST>
__device__ __forceinline__ void p1_bwd_ld_lse(float* lse_s, float* dm_s, const float* lse, const float* dlse,
                                              int64_t lse_stride, int64_t t, int S, int tid) {
  if (tid < ST) {
    lse_s[tid] = tid < S ? lse[tid * lse_stride + t] : 0.f;
    dm_s[tid] = tid < S ? dlse[tid * lse_stride + t] : 0.f;
  }
}

// Pass A for one source row (the thread's C chunks x): q_l . v into part[l], dO_l . v into
// part[ST + l], v . v into ss.
template <typename T, int W, int ST, int C, bool QREG, int PP, int R, int RC>
__device__ __forceinline__ void p1_bwd_dots(const Pack<T, W> (&x)[C], const Pack<T, W> (&go)[ST][C],
                                            const float (&qr)[R][RC][W], const float* q, int qld, int NT, int tid,
                                            float (&part)[PP], float& ss) {
#pragma unroll
  for (int k = 0; k < C; ++k) {
    float v[W];
    unpack<T, W>(x[k], v);
    fma_dot(v, v, ss);
#pragma unroll
    for (int l = 0; l < ST; ++l) {
      float qv[W], gv[W];
      q_chunk<QREG>(qr, q, qld, l, k, NT, tid, qv);
      unpack<T, W>(go[l][k], gv);
      fma_dot2(qv, gv, v, part[l], part[ST + l]);
    }
  }
}

// Row i of the (token, source) tables from its sums s over the warps (q.v at [0, ST), dO.v at
// [ST, 2 ST), v.v at 2 ST): the rms r (rr[i]), the logits z_l (zz), the softmax weights a_l (za; lse:
// the token's [ST], zero for l >= S) and g_l = dO_l . v (zc); zz, za, zc: [., ST].
template <int ST>
__device__ __forceinline__ void p1_bwd_source(const float (&s)[2 * ST + 1], float inv_d, float eps, int S,
                                              const float* lse, int i, float* rr, float* zz, float* za, float* zc) {
  const float r = sqrtf(s[2 * ST] * inv_d + eps);
  const float rinv = 1.f / r;
  rr[i] = r;
#pragma unroll
  for (int l = 0; l < ST; ++l) {
    const float z = s[l] * rinv;
    zz[i * ST + l] = z;
    za[i * ST + l] = l < S ? __expf(z - lse[l]) : 0.f;
    zc[i * ST + l] = s[ST + l];
  }
}

// One (token, query) l: D = sum_i a_il g_il, then zc_il = dz_il = a_il (g_il - D + dm) over the n
// sources (za, zc: [n][ST] from the token's first row).
template <int ST>
__device__ __forceinline__ void p1_bwd_dz(const float* za, float* zc, int l, int n, float dm) {
  float D = 0.f;
  for (int i = 0; i < n; ++i) D = fmaf(za[i * ST + l], zc[i * ST + l], D);
  for (int i = 0; i < n; ++i) zc[i * ST + l] = za[i * ST + l] * (zc[i * ST + l] - D + dm);
}

// The fused kernels' steps between the per-source tables and pass B, each after a barrier: per query
// l = tid < ST, dz (p1_bwd_dz); per source i, zc_il = dz_il / r_i (in place) and the coefficient of v_i
// in dv_i, ee[i] = -(sum_l dz_il z_il) / (d r_i^2). Ends with a barrier.
template <int ST>
__device__ __forceinline__ void p1_bwd_coefs(float* za, float* zc, const float* zz, const float* rr, float* ee,
                                             const float* dm_s, int n, int tid, int NT, float inv_d) {
  __syncthreads();
  if (tid < ST) p1_bwd_dz<ST>(za, zc, tid, n, dm_s[tid]);
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
}

// Per source (one thread each): the sums of the warps' partials of row i (red: [nw][n][stride], the
// sum of squares at slot ss), then its rms, logits and weights; then per query D_l and dz, and per
// source the coefficients of q_l and v_i in dv_i (p1_bwd_coefs).
template <int ST>
__device__ __forceinline__ void p1_bwd_weights(const float* red, int nw, int stride, int ss, float inv_d, float eps,
                                               int S, const float* lse_s, const float* dm_s, int n, int tid, int NT,
                                               float* rr, float* zz, float* za, float* zc, float* ee) {
  for (int i = tid; i < n; i += NT) {
    float s[2 * ST + 1];
    sum_warp_partials(s, red, nw, n, i, stride, ss);
    p1_bwd_source<ST>(s, inv_d, eps, S, lse_s, i, rr, zz, za, zc);
  }
  p1_bwd_coefs<ST>(za, zc, zz, rr, ee, dm_s, n, tid, NT, inv_d);
}

// The thread's chunk (W floats at column tid W) of each of the ST queries, kept in registers when QREG.
template <bool QREG, int ST, int W>
__device__ __forceinline__ void ld_q_regs(float (&qr)[QREG ? ST : 1][1][W], const float* q, int dp, int tid) {
  if constexpr (QREG) {
#pragma unroll
    for (int l = 0; l < ST; ++l) ld_q<W>(q + l * dp + tid * W, qr[l][0]);
  }
}

// One chunk of pass B for query l: dv += a_l dO_l, then dv += c_l q_l; dq_l += c_l v.
template <int W>
__device__ __forceinline__ void p1_bwd_dv(float al, float cl, const float (&gv)[W], const float (&qv)[W],
                                          const float (&v)[W], float (&dv)[W], float (&dq)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) {
    dv[e] = fmaf(al, gv[e], dv[e]);
    dv[e] = fmaf(cl, qv[e], dv[e]);
    dq[e] = fmaf(cl, v[e], dq[e]);
  }
}

// ---- phase 2 (forward, and the backward of the norm-fused op, which recomputes h bit for bit)

// h = a_o o + a_p p for one chunk, rounded to T (the value phase 2 stores, and the fused norm reads).
template <typename T, int W>
__device__ __forceinline__ void p2_merge(const Pack<T, W>& po, const Pack<T, W>& pp, float ao, float ap,
                                         float (&h)[W]) {
  float vo[W], vp[W];
  unpack<T, W>(po, vo);
  unpack<T, W>(pp, vp);
#pragma unroll
  for (int e = 0; e < W; ++e) h[e] = to_f<T>(from_f<T>(fmaf(ao, vo[e], ap * vp[e])));
}

// The logit z = q . p / rms(p) of the token (rinv = 1 / rms(p)): the thread's partial sums over its C
// chunks, a warp reduce-scatter into red[warp][0, 2), one barrier, then the sums over the nw warps.
template <typename T, int W, int C, int RW>
__device__ __forceinline__ float p2_logit(const Pack<T, W> (&pp)[C], const float (&qr)[C][W], float (&red)[32][RW],
                                          int lane, int warp, int nw, float inv_d, float eps, float& rinv) {
  float part[2] = {0.f, 0.f};  // q.p, p.p
#pragma unroll
  for (int k = 0; k < C; ++k) {
    float vp[W];
    unpack<T, W>(pp[k], vp);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      part[0] = fmaf(qr[k][e], vp[e], part[0]);
      part[1] = fmaf(vp[e], vp[e], part[1]);
    }
  }
  const float r = warp_reduce_scatter<2>(part, lane);
  if (rs_writer<2>(lane)) red[warp][rs_index<2>(lane)] = r;
  __syncthreads();
  float dot = 0.f, ss = 0.f;
  for (int w = 0; w < nw; ++w) {
    dot += red[w][0];
    ss += red[w][1];
  }
  rinv = rsqrtf(ss * inv_d + eps);
  return dot * rinv;
}

}  // namespace attnres_cuda
