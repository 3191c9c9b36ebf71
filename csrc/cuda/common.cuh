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
#pragma unroll
    for (int j = 0; j < Pack<T, W>::NW; ++j) p.w[j] = 0u;
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

}  // namespace attnres_cuda
