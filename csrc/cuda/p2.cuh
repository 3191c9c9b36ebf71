// Phase 2: merge a phase-1 result (o, m) with the partial summary p under one query, forward and
// backward. One token per block at a time (persistent grid); each thread keeps its chunks of the
// token's rows in registers, so every row is read once; one barrier per token (double-buffered
// reduction table).
#pragma once
#include "common.cuh"

namespace attnres_cuda {

// NORM: the sublayer's input RMSNorm fused in (op phase2_norm): h is rounded to T as phase 2 would
// store it, then y = h * rsqrt(mean(h^2) + norm_eps) * g is written instead of h (a second reduction
// per token; h never goes to memory).
template <typename T, int W, int C, bool NORM>
__global__ void __launch_bounds__(512) p2_fwd_kernel(const __grid_constant__ P2FwdArgs a) {
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int d = a.d;
  const int64_t N = a.N;
  const bool vec = a.vec;
  __shared__ float red[2][32][2];
  __shared__ float red2[NORM ? 32 : 1];
  const float inv_d = 1.f / static_cast<float>(d);
  float qr[C][W], gr[NORM ? C : 1][W];
#pragma unroll
  for (int k = 0; k < C; ++k) {
    ld_q_guarded<W>(a.q, (k * NT + tid) * W, d, a.qvec, qr[k]);
    if constexpr (NORM) ld_q_guarded<W>(a.g, (k * NT + tid) * W, d, a.qvec, gr[k]);
  }
  int buf = 0;
  // software pipelining: the next token's rows are loaded before this token's reduction
  // ADD (phase2_norm_add): the partial summary is p + v, written to p_out
  const bool add = NORM && a.v != nullptr;
  Pack<T, W> po_n[C], pp_n[C], pv_n[NORM ? C : 1];
  float m_n = 0.f;
  auto load = [&](int64_t t) {
    if (t < N) {
#pragma unroll
      for (int k = 0; k < C; ++k) {
        pp_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.p) + t * d, (k * NT + tid) * W, d, vec);
        po_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.o) + t * d, (k * NT + tid) * W, d, vec);
        if constexpr (NORM)
          if (add) pv_n[k] = ld_chunk<T, W>(static_cast<const T*>(a.v) + t * d, (k * NT + tid) * W, d, vec);
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
    if constexpr (NORM) {
      if (add) {  // p + v, rounded as torch's add rounds it, then used as the partial summary
#pragma unroll
        for (int k = 0; k < C; ++k) {
          float x[W], y[W];
          unpack<T, W>(pp[k], x);
          unpack<T, W>(pv_n[k], y);
#pragma unroll
          for (int e = 0; e < W; ++e) x[e] += y[e];
          pp[k] = pack<T, W>(x);
          st_chunk<T, W>(static_cast<T*>(a.p_out) + off, (k * NT + tid) * W, d, vec, x);
        }
      }
    }
    const float m = m_n;
    load(t + gridDim.x);
    float rinv;
    const float z = p2_logit(pp, qr, red[buf], lane, warp, nw, inv_d, a.eps, rinv);
    const float mx = fmaxf(m, z);
    const float lse = mx + __logf(__expf(m - mx) + __expf(z - mx));
    const float ao = __expf(m - lse), ap = __expf(z - lse);
    if (tid == 0) a.lse[t] = lse;
    if constexpr (!NORM) {
#pragma unroll
      for (int k = 0; k < C; ++k) {
        float h[W];
        p2_merge<T, W>(po[k], pp[k], ao, ap, h);
        st_chunk<T, W>(static_cast<T*>(a.h) + off, (k * NT + tid) * W, d, vec, h);
      }
    } else {
      // red2 is safe with one buffer: it is written after this token's first barrier, which no thread
      // passes before every thread has read the previous token's red2
      float hh = 0.f;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        float h[W];
        p2_merge<T, W>(po[k], pp[k], ao, ap, h);
#pragma unroll
        for (int e = 0; e < W; ++e) hh = fmaf(h[e], h[e], hh);
      }
      hh = warp_sum(hh);
      if (lane == 0) red2[warp] = hh;
      __syncthreads();
      hh = 0.f;
      for (int w = 0; w < nw; ++w) hh += red2[w];
      const float r = rsqrtf(hh * inv_d + a.norm_eps);
#pragma unroll
      for (int k = 0; k < C; ++k) {
        float h[W];
        p2_merge<T, W>(po[k], pp[k], ao, ap, h);
#pragma unroll
        for (int e = 0; e < W; ++e) h[e] = h[e] * r * gr[k][e];
        st_chunk<T, W>(static_cast<T*>(a.h) + off, (k * NT + tid) * W, d, vec, h);
      }
    }
  }
}

// Backward. NORM (op phase2_norm_backward): a.dh is the gradient of the norm's output y and a.h the
// phase-1 output o (h is recomputed bit for bit as the forward rounded it: same reductions, same
// order); the norm's backward is folded into the dot products, so the phase-2 part needs no third
// pass: with r = rsqrt(mean(h^2) + norm_eps), gy = g * dy and S = gy . h,
//   dh = r gy - h r^3 S / d,  dh . h = r S - r^3 S (h . h) / d,  dh . p = r (gy . p) - r^3 S (h . p) / d,
//   dg = sum over tokens of dy h r (a second per-block partial row next to dq's).
// (Capping the norm variant's registers at 80, for 3 blocks of 256 threads per SM instead of 2 at 125
// registers, made it 10-13 % slower on the H200: session 9, cuda_notes.md.)
template <typename T, int W, int C, bool NORM>
__global__ void __launch_bounds__(512)
    p2_bwd_kernel(const __grid_constant__ P2BwdArgs a) {
  const int tid = threadIdx.x, NT = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = NT >> 5;
  const int d = a.d;
  const int64_t N = a.N;
  const bool vec = a.vec;
  __shared__ float red[2][32][4];
  __shared__ float red2[NORM ? 32 : 1][4];
  const float inv_d = 1.f / static_cast<float>(d);
  constexpr int CN = NORM ? C : 1;
  float qr[C][W], dq[C][W], gr[CN][W], dg[CN][W];
#pragma unroll
  for (int k = 0; k < C; ++k) {
    ld_q_guarded<W>(a.q, (k * NT + tid) * W, d, a.qvec, qr[k]);
#pragma unroll
    for (int e = 0; e < W; ++e) dq[k][e] = 0.f;
    if constexpr (NORM) {
      ld_q_guarded<W>(a.g, (k * NT + tid) * W, d, a.qvec, gr[k]);
#pragma unroll
      for (int e = 0; e < W; ++e) dg[k][e] = 0.f;
    }
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
    // phase2_norm_add's incoming gradient of the sum: issued now, in flight during the two reductions
    // (one chunk per thread, d <= 4096 in bf16: 125 -> 100 registers; with more chunks the registers
    // held across the reductions spill, so those load it where it is used)
    constexpr bool kEarlyDin = NORM && C == 1;
    Pack<T, W> pdin[1];
    if constexpr (kEarlyDin) {
      if (a.dp_in != nullptr) {
        pdin[0] = ld_chunk<T, W>(static_cast<const T*>(a.dp_in) + off, tid * W, d, vec);
      }
    }
    float gh, gp, z, rinv, ap, ao, r = 0.f, k2 = 0.f;
    if constexpr (!NORM) {
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
      float qp = 0.f, ss = 0.f;
      gh = gp = 0.f;
      for (int w = 0; w < nw; ++w) {
        gh += red[buf][w][0];
        gp += red[buf][w][1];
        qp += red[buf][w][2];
        ss += red[buf][w][3];
      }
      rinv = 1.f / sqrtf(ss * inv_d + a.eps);
      z = qp * rinv;
      ap = __expf(z - lse), ao = __expf(m - lse);
    } else {
      // round 1 exactly as the forward (same sums, same order): the same z, a_o, a_p, hence the same h
      z = p2_logit(pp, qr, red[buf], lane, warp, nw, inv_d, a.eps, rinv);
      ap = __expf(z - lse), ao = __expf(m - lse);
      // round 2 (red2: one buffer, as in the forward): h.h, gy.h, gy.p, h.p
      float part4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k = 0; k < C; ++k) {
        float h[W], vdy[W], vp[W];
        p2_merge<T, W>(ph[k], pp[k], ao, ap, h);
        unpack<T, W>(pdh[k], vdy);
        unpack<T, W>(pp[k], vp);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float gy = gr[k][e] * vdy[e];
          part4[0] = fmaf(h[e], h[e], part4[0]);
          part4[1] = fmaf(gy, h[e], part4[1]);
          part4[2] = fmaf(gy, vp[e], part4[2]);
          part4[3] = fmaf(h[e], vp[e], part4[3]);
        }
      }
      const float r4 = warp_reduce_scatter<4>(part4, lane);
      if (rs_writer<4>(lane)) red2[warp][rs_index<4>(lane)] = r4;
      __syncthreads();
      float hh = 0.f, sh = 0.f, sp = 0.f, hp = 0.f;
      for (int w = 0; w < nw; ++w) {
        hh += red2[w][0];
        sh += red2[w][1];
        sp += red2[w][2];
        hp += red2[w][3];
      }
      r = rsqrtf(hh * inv_d + a.norm_eps);
      k2 = r * r * sh * inv_d;  // dh = r (gy - h k2)
      gh = r * (sh - k2 * hh);
      gp = r * (sp - k2 * hp);
    }
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
      if constexpr (NORM) {  // vdh: dy -> dh; dg += dy h r
        float h[W];
        p2_merge<T, W>(ph[k], pp[k], ao, ap, h);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          dg[k][e] = fmaf(vdh[e] * h[e], r, dg[k][e]);
          vdh[e] = r * fmaf(-h[e], k2, gr[k][e] * vdh[e]);
        }
      }
#pragma unroll
      for (int e = 0; e < W; ++e) {
        go[e] = ao * vdh[e];
        gpv[e] = fmaf(ap, vdh[e], fmaf(c, qr[k][e], ev * vp[e]));
        dq[k][e] = fmaf(c, vp[e], dq[k][e]);
      }
      st_chunk<T, W>(static_cast<T*>(a.do_) + off, col, d, vec, go);
      if constexpr (NORM) {
        if (a.dp_in != nullptr) {  // round(gpv) + dp_in, as autograd would add the rounded gradient
          float din[W];
          unpack<T, W>(kEarlyDin ? pdin[0] : ld_chunk<T, W>(static_cast<const T*>(a.dp_in) + off, col, d, vec), din);
          unpack<T, W>(pack<T, W>(gpv), gpv);
#pragma unroll
          for (int e = 0; e < W; ++e) gpv[e] += din[e];
        }
      }
      st_chunk<T, W>(static_cast<T*>(a.dp_) + off, col, d, vec, gpv);
    }
  }
  // per-block partial rows: [grid, 1 + NORM, NT * C * W] (dq, then dg)
  const int dpw = NT * C * W;
  float* dst = a.dq_part + static_cast<int64_t>(blockIdx.x) * (NORM ? 2 : 1) * dpw;
#pragma unroll
  for (int k = 0; k < C; ++k)
#pragma unroll
    for (int e = 0; e < W; ++e) {
      dst[(k * NT + tid) * W + e] = dq[k][e];
      if constexpr (NORM) dst[dpw + (k * NT + tid) * W + e] = dg[k][e];
    }
}

}  // namespace attnres_cuda
