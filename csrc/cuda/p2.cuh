// Phase 2: merge a phase-1 result (o, m) with the partial summary p under one query, forward and
// backward. One token per block at a time (persistent grid); each thread keeps its chunks of the
// token's rows in registers, so every row is read once; one barrier per token (double-buffered
// reduction table).
#pragma once
#include "common.cuh"

namespace attnres_cuda {

template <typename T, int W, int C>
__global__ void __launch_bounds__(512) p2_fwd_kernel(const __grid_constant__ P2FwdArgs a) {
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int d = a.d;
  const int64_t N = a.N;
  const bool vec = a.vec;
  __shared__ float red[2][32][2];
  const float inv_d = 1.f / static_cast<float>(d);
  float qr[C][W];
#pragma unroll
  for (int k = 0; k < C; ++k) ld_q_guarded<W>(a.q, (k * NT + tid) * W, d, a.qvec, qr[k]);
  int buf = 0;
  // software pipelining: the next token's rows are loaded before this token's reduction
  Pack<T, W> po_n[C], pp_n[C];
  float m_n = 0.f;
  auto load = [&](int64_t t) {
    if (t < N) {
#pragma unroll
      for (int k = 0; k < C; ++k) {
        pp_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.p) + t * d, (k * NT + tid) * W, d, vec);
        po_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.o) + t * d, (k * NT + tid) * W, d, vec);
      }
      m_n = a.m[t];
    }
  };
  load(blockIdx.x);
  for (int64_t t = blockIdx.x; t < N; t += gridDim.x, buf ^= 1) {
    const int64_t off = t * d;
    Pack<T, W> po[C], pp[C];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      pp[k] = pp_n[k];
      po[k] = po_n[k];
    }
    const float m = m_n;
    load(t + gridDim.x);
    float part[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float v[W];
      unpack<T, W>(pp[k], v);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        part[0] = fmaf(qr[k][e], v[e], part[0]);
        part[1] = fmaf(v[e], v[e], part[1]);
      }
    }
    const float r = warp_reduce_scatter<2>(part, lane);
    if (rs_writer<2>(lane)) red[buf][warp][rs_index<2>(lane)] = r;
    __syncthreads();
    float dot = 0.f, ss = 0.f;
    for (int w = 0; w < nw; ++w) {
      dot += red[buf][w][0];
      ss += red[buf][w][1];
    }
    const float z = dot * rsqrtf(ss * inv_d + a.eps);
    const float mx = fmaxf(m, z);
    const float lse = mx + __logf(__expf(m - mx) + __expf(z - mx));
    const float ao = __expf(m - lse), ap = __expf(z - lse);
    if (tid == 0) a.lse[t] = lse;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float vo[W], vp[W], h[W];
      unpack<T, W>(po[k], vo);
      unpack<T, W>(pp[k], vp);
#pragma unroll
      for (int e = 0; e < W; ++e) h[e] = fmaf(ao, vo[e], ap * vp[e]);
      st_chunk<T, W>(static_cast<T*>(a.h) + off, (k * NT + tid) * W, d, vec, h);
    }
  }
}

template <typename T, int W, int C>
__global__ void __launch_bounds__(512) p2_bwd_kernel(const __grid_constant__ P2BwdArgs a) {
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int d = a.d;
  const int64_t N = a.N;
  const bool vec = a.vec;
  __shared__ float red[2][32][4];
  const float inv_d = 1.f / static_cast<float>(d);
  float qr[C][W], dq[C][W];
#pragma unroll
  for (int k = 0; k < C; ++k) {
    ld_q_guarded<W>(a.q, (k * NT + tid) * W, d, a.qvec, qr[k]);
#pragma unroll
    for (int e = 0; e < W; ++e) dq[k][e] = 0.f;
  }
  int buf = 0;
  Pack<T, W> pdh_n[C], ph_n[C], pp_n[C];
  float m_n = 0.f, lse_n = 0.f, dlse_n = 0.f;
  auto load = [&](int64_t t) {
    if (t < N) {
#pragma unroll
      for (int k = 0; k < C; ++k) {
        const int col = (k * NT + tid) * W;
        pdh_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.dh) + t * d, col, d, vec);
        ph_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.h) + t * d, col, d, vec);
        pp_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.p) + t * d, col, d, vec);
      }
      m_n = a.m[t], lse_n = a.lse[t], dlse_n = a.dlse[t];
    }
  };
  load(blockIdx.x);
  for (int64_t t = blockIdx.x; t < N; t += gridDim.x, buf ^= 1) {
    const int64_t off = t * d;
    Pack<T, W> pdh[C], ph[C], pp[C];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      pdh[k] = pdh_n[k];
      ph[k] = ph_n[k];
      pp[k] = pp_n[k];
    }
    const float m = m_n, lse = lse_n, dlse = dlse_n;
    load(t + gridDim.x);
    float part[4] = {0.f, 0.f, 0.f, 0.f};  // dh.h, dh.p, q.p, p.p
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float vdh[W], vh[W], vp[W];
      unpack<T, W>(pdh[k], vdh);
      unpack<T, W>(ph[k], vh);
      unpack<T, W>(pp[k], vp);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        part[0] = fmaf(vdh[e], vh[e], part[0]);
        part[1] = fmaf(vdh[e], vp[e], part[1]);
        part[2] = fmaf(qr[k][e], vp[e], part[2]);
        part[3] = fmaf(vp[e], vp[e], part[3]);
      }
    }
    const float r4 = warp_reduce_scatter<4>(part, lane);
    if (rs_writer<4>(lane)) red[buf][warp][rs_index<4>(lane)] = r4;
    __syncthreads();
    float gh = 0.f, gp = 0.f, qp = 0.f, ss = 0.f;
    for (int w = 0; w < nw; ++w) {
      gh += red[buf][w][0];
      gp += red[buf][w][1];
      qp += red[buf][w][2];
      ss += red[buf][w][3];
    }
    const float rms = sqrtf(ss * inv_d + a.eps), rinv = 1.f / rms;
    const float z = qp * rinv;
    const float ap = __expf(z - lse), ao = __expf(m - lse);
    const float dz = ap * (gp - gh + dlse);
    if (tid == 0) a.dm[t] = ap * (gh - gp) + ao * dlse;
    const float c = dz * rinv;
    const float ev = -dz * z * inv_d * rinv * rinv;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int col = (k * NT + tid) * W;
      float vdh[W], vp[W], go[W], gpv[W];
      unpack<T, W>(pdh[k], vdh);
      unpack<T, W>(pp[k], vp);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        go[e] = ao * vdh[e];
        gpv[e] = fmaf(ap, vdh[e], fmaf(c, qr[k][e], ev * vp[e]));
        dq[k][e] = fmaf(c, vp[e], dq[k][e]);
      }
      st_chunk<T, W>(static_cast<T*>(a.do_) + off, col, d, vec, go);
      st_chunk<T, W>(static_cast<T*>(a.dp_) + off, col, d, vec, gpv);
    }
  }
  float* dst = a.dq_part + static_cast<int64_t>(blockIdx.x) * NT * C * W;
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int e = 0; e < W; ++e) dst[(k * NT + tid) * W + e] = dq[k][e];
}

}  // namespace attnres_cuda
