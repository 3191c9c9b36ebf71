// Per-chunk CPU workers of the depth-attention ops (see depth_attn_kernels.h).
//
// Per token: the n source rows are converted once to the accumulation type A in a scratch buffer
// (L1/L2 resident), then the logits, the softmax and the weighted sums all read that buffer.
// Inner loops: conversions and stores are plain `omp simd` loops that GCC auto-vectorises (setup.py
// compiles with -fopenmp); the reductions (dot products, sums of squares) and the weighted sums of
// rows use GCC vector extensions (32-byte vectors) with several independent accumulators, so that
// FMA latency is hidden: dots run four rows x two vectors (eight chains) per load of the shared row,
// and weighted sums keep a tile of eight vectors in registers while all rows are added into it.
// The 16-bit conversions are branchless bit manipulations, bit-identical to c10's round-to-nearest-
// even conversions (checked exhaustively over all 2^32 floats), so that they vectorise too.
#include "depth_attn_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// setup.py compiles with -std=c++17 (ISO mode), which turns off floating-point contraction;
// allow a * b + c -> fma inside these workers (one rounding instead of two, never less accurate).
#pragma GCC optimize("fp-contract=fast")

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATTNRES_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ATTNRES_CLONES
#endif
#define ATTNRES_INLINE static inline __attribute__((always_inline))

namespace attnres::cpu {
namespace {

// ----------------------------------------------------------------------------- scalar conversions

ATTNRES_INLINE float bits_to_f32(uint32_t u) { return __builtin_bit_cast(float, u); }
ATTNRES_INLINE uint32_t f32_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

ATTNRES_INLINE float to_f32(bf16 h) { return bits_to_f32(static_cast<uint32_t>(h.x) << 16); }

ATTNRES_INLINE bf16 from_f32_bf16(float f) {
  // round to nearest even; NaN -> canonical quiet NaN (as c10::BFloat16)
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
  return bf16{static_cast<uint16_t>((rounded & ~is_nan) | (0x7FC0u & is_nan))};
}

ATTNRES_INLINE float to_f32(f16 h) {
  // c10::detail::fp16_ieee_to_fp32_value with the select written as masks
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return bits_to_f32(sign | (f32_to_bits(denormalized) & is_denormal) | (f32_to_bits(normalized) & ~is_denormal));
}

ATTNRES_INLINE f16 from_f32_f16(float f) {
  // c10::detail::fp16_ieee_from_fp32_value (round to nearest even) with the selects written as masks
  const float base0 = (bits_to_f32(f32_to_bits(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const uint32_t bits = f32_to_bits(bits_to_f32((bias >> 1) + 0x07800000u) + base0);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return f16{static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan))};
}

ATTNRES_INLINE float to_acc(float x) { return x; }
ATTNRES_INLINE double to_acc(double x) { return x; }
ATTNRES_INLINE float to_acc(bf16 x) { return to_f32(x); }
ATTNRES_INLINE float to_acc(f16 x) { return to_f32(x); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static inline float of(float x) { return x; }
};
template <>
struct Store<double> {
  static inline double of(double x) { return x; }
};
template <>
struct Store<bf16> {
  static inline bf16 of(float x) { return from_f32_bf16(x); }
};
template <>
struct Store<f16> {
  static inline f16 of(float x) { return from_f32_f16(x); }
};

// ----------------------------------------------------------------------------- row primitives

// 32-byte vectors (GCC vector extensions): one AVX2 register in the x86-64-v3 clone, two SSE registers
// in the baseline one. Reductions use several of them so that independent FMA chains hide the latency.
typedef float vfloat __attribute__((vector_size(32)));
typedef double vdouble __attribute__((vector_size(32)));

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  using type = vfloat;
  static constexpr int64_t width = 8;
};
template <>
struct Vec<double> {
  using type = vdouble;
  static constexpr int64_t width = 4;
};

template <typename A>
ATTNRES_INLINE typename Vec<A>::type vload(const A* p) {
  typename Vec<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ATTNRES_INLINE float hsum(vfloat v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
ATTNRES_INLINE double hsum(vdouble v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// sum(x^2) over d values, four accumulators.
template <typename A>
ATTNRES_INLINE A sumsq(const A* __restrict x, int64_t d) {
  using V = typename Vec<A>::type;
  constexpr int64_t W = Vec<A>::width;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t j = 0;
  for (; j + 4 * W <= d; j += 4 * W) {
    const V x0 = vload(x + j), x1 = vload(x + j + W), x2 = vload(x + j + 2 * W), x3 = vload(x + j + 3 * W);
    a0 += x0 * x0;
    a1 += x1 * x1;
    a2 += x2 * x2;
    a3 += x3 * x3;
  }
  for (; j + W <= d; j += W) {
    const V x0 = vload(x + j);
    a0 += x0 * x0;
  }
  A s = hsum((a0 + a1) + (a2 + a3));
  for (; j < d; ++j) s += x[j] * x[j];
  return s;
}

// dst = src (converted to A); returns sum(dst^2).
template <typename T, typename A>
ATTNRES_INLINE A load_row(A* __restrict dst, const T* __restrict src, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dst[j] = to_acc(src[j]);
  return sumsq(dst, d);
}

template <typename T, typename A>
ATTNRES_INLINE void store_row(T* __restrict dst, const A* __restrict src, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dst[j] = Store<T>::of(src[j]);
}

// out[k] = x . rows[k] for k < K: four rows at a time, two vector accumulators per row, so eight
// independent FMA chains share each load of x.
template <typename A>
ATTNRES_INLINE void dots(const A* __restrict x, const A* const* rows, int64_t K, int64_t d, A* out) {
  using V = typename Vec<A>::type;
  constexpr int64_t W = Vec<A>::width;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const A* __restrict r0 = rows[k];
    const A* __restrict r1 = rows[k + 1];
    const A* __restrict r2 = rows[k + 2];
    const A* __restrict r3 = rows[k + 3];
    V a0 = {}, a1 = {}, b0 = {}, b1 = {}, c0 = {}, c1 = {}, e0 = {}, e1 = {};
    int64_t j = 0;
    for (; j + 2 * W <= d; j += 2 * W) {
      const V x0 = vload(x + j), x1 = vload(x + j + W);
      a0 += x0 * vload(r0 + j);
      a1 += x1 * vload(r0 + j + W);
      b0 += x0 * vload(r1 + j);
      b1 += x1 * vload(r1 + j + W);
      c0 += x0 * vload(r2 + j);
      c1 += x1 * vload(r2 + j + W);
      e0 += x0 * vload(r3 + j);
      e1 += x1 * vload(r3 + j + W);
    }
    A s0 = hsum(a0 + a1), s1 = hsum(b0 + b1), s2 = hsum(c0 + c1), s3 = hsum(e0 + e1);
    for (; j < d; ++j) {
      s0 += x[j] * r0[j];
      s1 += x[j] * r1[j];
      s2 += x[j] * r2[j];
      s3 += x[j] * r3[j];
    }
    out[k] = s0;
    out[k + 1] = s1;
    out[k + 2] = s2;
    out[k + 3] = s3;
  }
  for (; k < K; ++k) {  // one row: four accumulators
    const A* __restrict r0 = rows[k];
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t j = 0;
    for (; j + 4 * W <= d; j += 4 * W) {
      a0 += vload(x + j) * vload(r0 + j);
      a1 += vload(x + j + W) * vload(r0 + j + W);
      a2 += vload(x + j + 2 * W) * vload(r0 + j + 2 * W);
      a3 += vload(x + j + 3 * W) * vload(r0 + j + 3 * W);
    }
    A s0 = hsum((a0 + a1) + (a2 + a3));
    for (; j < d; ++j) s0 += x[j] * r0[j];
    out[k] = s0;
  }
}

template <typename A>
ATTNRES_INLINE void vstore(A* p, typename Vec<A>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// o = sum_k coef[k] * rows[k] (init) or o += sum_k coef[k] * rows[k], for k < K.
// Tiled over j: a tile of eight vectors stays in registers while all K rows are added into it
// (eight independent FMA chains, one load per FMA, o read and written once).
template <typename A>
ATTNRES_INLINE void wsum(A* __restrict o, const A* const* rows, const A* coef, int64_t K, int64_t d, bool init) {
  using V = typename Vec<A>::type;
  constexpr int64_t W = Vec<A>::width;
  constexpr int64_t T = 8 * W;
  int64_t j = 0;
  for (; j + T <= d; j += T) {
    V a[8];
    for (int u = 0; u < 8; ++u) a[u] = init ? V{} : vload(o + j + u * W);
    for (int64_t k = 0; k < K; ++k) {
      const A* __restrict r = rows[k] + j;
      const V c = V{} + coef[k];
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) a[u] += c * vload(r + u * W);
    }
    for (int u = 0; u < 8; ++u) vstore(o + j + u * W, a[u]);
  }
  for (; j + W <= d; j += W) {
    V a0 = init ? V{} : vload(o + j), a1 = {};
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      a0 += (V{} + coef[k]) * vload(rows[k] + j);
      a1 += (V{} + coef[k + 1]) * vload(rows[k + 1] + j);
    }
    if (k < K) a0 += (V{} + coef[k]) * vload(rows[k] + j);
    vstore(o + j, a0 + a1);
  }
  for (; j < d; ++j) {
    A a0 = init ? A(0) : o[j];
    for (int64_t k = 0; k < K; ++k) a0 += coef[k] * rows[k][j];
    o[j] = a0;
  }
}

template <typename A>
ATTNRES_INLINE A inv_rms(A sumsq, int64_t d, A eps) {
  return A(1) / std::sqrt(sumsq / static_cast<A>(d) + eps);
}

// Z[l * n + i] = q_l . v_i for l < S, i < n; blocked along the longer of the two lists.
template <typename A>
ATTNRES_INLINE void all_dots(const A* const* qrows, int64_t S, const A* const* vrows, int64_t n, int64_t d, A* Z,
                             A* tmp) {
  if (n >= 4 || n >= S) {
    for (int64_t l = 0; l < S; ++l) dots(qrows[l], vrows, n, d, Z + l * n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      dots(vrows[i], qrows, S, d, tmp);
      for (int64_t l = 0; l < S; ++l) Z[l * n + i] = tmp[l];
    }
  }
}

// lse = log(e^x + e^y), NaN if either is NaN (as torch.logaddexp).
template <typename A>
ATTNRES_INLINE A logaddexp(A x, A y) {
  if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<A>::quiet_NaN();
  const A mx = x > y ? x : y;
  if (std::isinf(mx)) return mx;
  return mx + std::log1p(std::exp(-std::fabs(x - y)));
}

// ----------------------------------------------------------------------------- phase 1 / direct

template <typename T, typename A>
ATTNRES_INLINE void phase1_forward_impl(const Phase1Args<T, A>& a, int64_t t0, int64_t t1) {
  const int64_t n = a.n, S = a.S, d = a.d, N = a.N;
  std::vector<A> buf(static_cast<size_t>(n * d + d + n + 2 * S * n + S));
  A* V = buf.data();  // [n, d] the token's sources
  A* o = V + n * d;   // [d]
  A* rinv = o + d;    // [n]
  A* Z = rinv + n;    // [S, n] logits
  A* W = Z + S * n;   // [S, n] weights
  A* tmp = W + S * n; // [S]
  std::vector<const A*> vrows(n), qrows(S);
  for (int64_t i = 0; i < n; ++i) vrows[i] = V + i * d;
  for (int64_t l = 0; l < S; ++l) qrows[l] = a.q + l * d;

  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) rinv[i] = inv_rms(load_row(V + i * d, a.src[i] + t * d, d), d, a.eps);
    all_dots(qrows.data(), S, vrows.data(), n, d, Z, tmp);
    for (int64_t l = 0; l < S; ++l) {
      A* z = Z + l * n;
      A mx = -std::numeric_limits<A>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        z[i] *= rinv[i];
        mx = z[i] > mx ? z[i] : mx;
      }
      A sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += std::exp(z[i] - mx);
      const A lse = std::isinf(mx) ? mx : mx + std::log(sum);
      a.lse[l * N + t] = lse;
      for (int64_t i = 0; i < n; ++i) W[l * n + i] = std::exp(z[i] - lse);
    }
    for (int64_t l = 0; l < S; ++l) {
      wsum(o, vrows.data(), W + l * n, n, d, true);
      store_row(a.out[l] + t * d, o, d);
    }
  }
}

template <typename T, typename A>
ATTNRES_INLINE void phase1_backward_impl(const Phase1Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q) {
  const int64_t n = a.n, S = a.S, d = a.d, N = a.N;
  const int64_t K = 2 * S + 1;  // rows of one source's gradient: S grad rows, S queries, the source
  std::vector<A> buf(static_cast<size_t>(n * d + S * d + d + 2 * n + 4 * S * n + K + S));
  A* V = buf.data();   // [n, d]
  A* G = V + n * d;    // [S, d] the token's output gradients
  A* o = G + S * d;    // [d]
  A* rinv = o + d;     // [n]
  A* C = rinv + n;     // [n] sum_l dz_li z_li
  A* Z = C + n;        // [S, n] logits
  A* W = Z + S * n;    // [S, n] weights
  A* Gd = W + S * n;   // [S, n] g_li = dO_l . v_i
  A* B = Gd + S * n;   // [S, n] dz_li / r_i
  A* coef = B + S * n; // [K]
  A* tmp = coef + K;   // [S]
  std::vector<const A*> vrows(n), qrows(S), grows(S), rows(K);
  for (int64_t i = 0; i < n; ++i) vrows[i] = V + i * d;
  for (int64_t l = 0; l < S; ++l) {
    qrows[l] = a.q + l * d;
    grows[l] = G + l * d;
    rows[l] = G + l * d;
    rows[S + l] = a.q + l * d;
  }

  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) rinv[i] = inv_rms(load_row(V + i * d, a.src[i] + t * d, d), d, a.eps);
    for (int64_t l = 0; l < S; ++l) load_row(G + l * d, a.grad_out[l] + t * d, d);
    all_dots(qrows.data(), S, vrows.data(), n, d, Z, tmp);
    all_dots(grows.data(), S, vrows.data(), n, d, Gd, tmp);
    for (int64_t i = 0; i < n; ++i) C[i] = 0;
    for (int64_t l = 0; l < S; ++l) {
      const A lse = a.lse_saved[l * N + t];
      const A dm = a.grad_lse[l * N + t];
      A D = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t li = l * n + i;
        Z[li] *= rinv[i];
        W[li] = std::exp(Z[li] - lse);
        D += W[li] * Gd[li];
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t li = l * n + i;
        const A dz = W[li] * (Gd[li] - D + dm);
        B[li] = dz * rinv[i];
        C[i] += dz * Z[li];
      }
    }
    // dv_i = sum_l a_li dO_l + sum_l (dz_li / r_i) q_l - (sum_l dz_li z_li) / (d r_i^2) v_i
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t l = 0; l < S; ++l) {
        coef[l] = W[l * n + i];
        coef[S + l] = B[l * n + i];
      }
      coef[2 * S] = -C[i] * rinv[i] * rinv[i] / static_cast<A>(d);
      rows[2 * S] = V + i * d;
      wsum(o, rows.data(), coef, K, d, true);
      store_row(a.grad_src[i] + t * d, o, d);
    }
    // dq_l += sum_i (dz_li / r_i) v_i
    for (int64_t l = 0; l < S; ++l) wsum(grad_q + l * d, vrows.data(), B + l * n, n, d, false);
  }
}

// ----------------------------------------------------------------------------- phase 2

template <typename T, typename A>
ATTNRES_INLINE void phase2_forward_impl(const Phase2Args<T, A>& a, int64_t t0, int64_t t1) {
  const int64_t d = a.d;
  std::vector<A> buf(static_cast<size_t>(3 * d));
  A* P = buf.data();
  A* O = P + d;
  A* h = O + d;
  for (int64_t t = t0; t < t1; ++t) {
    const A rinv = inv_rms(load_row(P, a.p + t * d, d), d, a.eps);
    load_row(O, a.o + t * d, d);
    A z;
    dots(P, &a.q, 1, d, &z);
    z *= rinv;
    const A m = a.m[t];
    const A lse = logaddexp(m, z);
    a.lse[t] = lse;
    const A rows_coef[2] = {std::exp(m - lse), std::exp(z - lse)};
    const A* rows[2] = {O, P};
    wsum(h, rows, rows_coef, 2, d, true);
    store_row(a.h + t * d, h, d);
  }
}

template <typename T, typename A>
ATTNRES_INLINE void phase2_backward_impl(const Phase2Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q) {
  const int64_t d = a.d;
  std::vector<A> buf(static_cast<size_t>(4 * d));
  A* P = buf.data();
  A* DH = P + d;
  A* H = DH + d;
  A* o = H + d;
  for (int64_t t = t0; t < t1; ++t) {
    const A rinv = inv_rms(load_row(P, a.p + t * d, d), d, a.eps);
    load_row(DH, a.grad_h + t * d, d);
    load_row(H, a.h_saved + t * d, d);
    A zp[2];  // q . p, dh . p
    const A* qd[2] = {a.q, DH};
    dots(P, qd, 2, d, zp);
    A gh;
    const A* hr[1] = {H};
    dots(DH, hr, 1, d, &gh);
    const A z = zp[0] * rinv, gp = zp[1];
    const A lse = a.lse_saved[t], m = a.m[t], dl = a.grad_lse[t];
    const A ap = std::exp(z - lse), ao = std::exp(m - lse);
    const A dz = ap * (gp - gh + dl);
    a.grad_m[t] = ap * (gh - gp) + ao * dl;
    const A c_o[1] = {ao};
    const A* r_o[1] = {DH};
    wsum(o, r_o, c_o, 1, d, true);
    store_row(a.grad_o + t * d, o, d);
    const A c_p[3] = {ap, dz * rinv, -dz * z * rinv * rinv / static_cast<A>(d)};
    const A* r_p[3] = {DH, a.q, P};
    wsum(o, r_p, c_p, 3, d, true);
    store_row(a.grad_p + t * d, o, d);
    const A c_q[1] = {dz * rinv};
    const A* r_q[1] = {P};
    wsum(grad_q, r_q, c_q, 1, d, false);
  }
}

}  // namespace

// ----------------------------------------------------------------------------- entry points

#define ATTNRES_DEFINE_WORKERS(T, A)                                                                     \
  ATTNRES_CLONES void phase1_forward(const Phase1Args<T, A>& a, int64_t t0, int64_t t1) {                \
    phase1_forward_impl(a, t0, t1);                                                                       \
  }                                                                                                       \
  ATTNRES_CLONES void phase1_backward(const Phase1Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q) {    \
    phase1_backward_impl(a, t0, t1, grad_q);                                                              \
  }                                                                                                       \
  ATTNRES_CLONES void phase2_forward(const Phase2Args<T, A>& a, int64_t t0, int64_t t1) {                \
    phase2_forward_impl(a, t0, t1);                                                                       \
  }                                                                                                       \
  ATTNRES_CLONES void phase2_backward(const Phase2Args<T, A>& a, int64_t t0, int64_t t1, A* grad_q) {    \
    phase2_backward_impl(a, t0, t1, grad_q);                                                              \
  }

ATTNRES_DEFINE_WORKERS(float, float)
ATTNRES_DEFINE_WORKERS(double, double)
ATTNRES_DEFINE_WORKERS(bf16, float)
ATTNRES_DEFINE_WORKERS(f16, float)

#undef ATTNRES_DEFINE_WORKERS

}  // namespace attnres::cpu
