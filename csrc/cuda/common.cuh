// Device helpers shared by the depth-attention kernels: dtype conversion, chunked row loads and
// stores (16-byte vectors when rows are aligned, a guarded scalar path for any other d), and the
// warp reduce-scatter that turns PP per-thread partial sums into one reduced value per lane.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace attnres_cuda {

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// W consecutive elements of a row; aligned to its full size so that the load is one vector access.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Chunk at column `col` of `row` (row has d valid elements). vec: the row is W-aligned and d % W == 0.
// Columns at or past d read as zero, so they add nothing to any dot product.
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> ld_chunk(const T* __restrict__ row, int col, int d, bool vec) {
  Pack<T, W> p;
  if (vec) {
    if (col < d) {
      p = *reinterpret_cast<const Pack<T, W>*>(row + col);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) p.v[e] = from_f<T>(0.f);
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) p.v[e] = (col + e < d) ? row[col + e] : from_f<T>(0.f);
  }
  return p;
}

template <typename T, int W>
__device__ __forceinline__ void st_chunk(T* __restrict__ row, int col, int d, bool vec, const float (&x)[W]) {
  if (vec) {
    if (col < d) {
      Pack<T, W> p;
#pragma unroll
      for (int e = 0; e < W; ++e) p.v[e] = from_f<T>(x[e]);
      *reinterpret_cast<Pack<T, W>*>(row + col) = p;
    }
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e)
      if (col + e < d) row[col + e] = from_f<T>(x[e]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void unpack(const Pack<T, W>& p, float (&x)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) x[e] = to_f<T>(p.v[e]);
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

constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
constexpr int pow2ceil(int x) { return x <= 1 ? 1 : 2 * pow2ceil((x + 1) / 2); }

// Reduce-scatter over the warp: every lane holds PP partial sums (PP a power of two <= 32); after
// log2(PP) halving steps and 5 - log2(PP) plain butterfly steps each lane holds the warp-wide sum
// of value lane >> (5 - log2 PP). PP - 1 + 5 - log2 PP shuffles instead of 5 * PP.
template <int PP>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[PP], int lane) {
  constexpr int LOG = ilog2(PP);
  static_assert((1 << LOG) == PP && PP <= 32, "PP must be a power of two <= 32");
#pragma unroll
  for (int s = 0; s < LOG; ++s) {
    const int h = PP >> (s + 1);
    const int off = 16 >> s;
    const bool upper = lane & off;
#pragma unroll
    for (int j = 0; j < h; ++j) {
      const float send = upper ? v[j] : v[j + h];
      const float keep = upper ? v[j + h] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  float r = v[0];
#pragma unroll
  for (int off = 16 >> LOG; off >= 1; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
  return r;
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
