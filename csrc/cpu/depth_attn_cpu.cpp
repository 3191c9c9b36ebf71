// CPU kernels of the depth-attention ops (schemas in csrc/ops.cpp, math in attnres/reference.py).
//
// This file checks the arguments, makes the inputs contiguous, allocates the outputs and splits
// the tokens over threads with at::parallel_for; the per-token work is in depth_attn_kernels.cpp.
// Accumulation is fp32 for fp32/bf16/fp16 sources and fp64 for fp64 sources; the log-sum-exps and
// the query gradients come back in that accumulation dtype (fp64 only for fp64 sources, which is
// what gradcheck needs). The query gradient is a sum over tokens: every chunk of tokens writes its
// own partial sum and the partials are added in chunk order afterwards (no atomics, and the result
// does not depend on how the chunks were scheduled).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "depth_attn_kernels.h"

namespace attnres::cpu {
namespace {

using at::Tensor;
using at::TensorList;

template <typename T, typename A>
struct Types {
  using storage = T;
  using acc = A;
};

// Calls f(Types<T, A>{}) for the storage type T and accumulation type A of a source dtype.
template <typename F>
void dispatch(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(Types<float, float>{});
    case at::kDouble:
      return f(Types<double, double>{});
    case at::kBFloat16:
      return f(Types<bf16, float>{});
    case at::kHalf:
      return f(Types<f16, float>{});
    default:
      TORCH_CHECK(false, op, ": sources have dtype ", st, "; expected float32, bfloat16, float16 or float64");
  }
}

at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
const T* cptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Tokens per chunk: enough that a chunk moves at least ~64K elements, so small calls stay on one thread.
int64_t grain(int64_t rows_per_token, int64_t d) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows_per_token * d)); }

// Runs fn(t0, t1, partial) over [0, N) in chunks, each with its own zeroed partial sum of `size`
// elements; returns the sum of the partials (dtype `dtype`, shape `shape`).
template <typename A, typename Fn>
Tensor reduce_over_tokens(int64_t N, int64_t g, at::IntArrayRef shape, at::ScalarType dtype, Fn fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + g - 1) / g));
  const int64_t per = (N + chunks - 1) / chunks;
  int64_t size = 1;
  for (auto s : shape) size *= s;
  Tensor partial = at::zeros({chunks, size}, at::TensorOptions().dtype(dtype));
  A* base = mptr<A>(partial);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = std::min(N, c * per), t1 = std::min(N, (c + 1) * per);
      fn(t0, t1, base + c * size);
    }
  });
  return (chunks == 1 ? partial[0] : partial.sum(0)).reshape(shape).contiguous();
}

// ----------------------------------------------------------------------------- argument checks

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; the CPU kernel needs every tensor on cpu");
}

void check_float(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// sources: n >= 1 tensors [N, d], d >= 1, one dtype; returns contiguous copies where needed.
std::vector<Tensor> check_sources(TensorList sources, const char* op, const char* name = "sources") {
  TORCH_CHECK(!sources.empty(), op, ": ", name, " is empty; expected at least one source [N, d]");
  const Tensor& s0 = sources[0];
  TORCH_CHECK(s0.dim() == 2, op, ": ", name, "[0] must have shape [N, d], got ", s0.sizes());
  TORCH_CHECK(s0.size(1) >= 1, op, ": ", name, "[0] has d = 0; expected d >= 1");
  std::vector<Tensor> out;
  out.reserve(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    const Tensor& s = sources[i];
    check_cpu(s, op, name);
    TORCH_CHECK(s.sizes() == s0.sizes(), op, ": ", name, "[", i, "] has shape ", s.sizes(), " but ", name,
                "[0] has ", s0.sizes(), "; all must be [N, d] alike");
    TORCH_CHECK(s.scalar_type() == s0.scalar_type(), op, ": ", name, "[", i, "] has dtype ", s.scalar_type(),
                " but ", name, "[0] has ", s0.scalar_type());
    out.push_back(s.contiguous());
  }
  return out;
}

// A tensor of exactly `shape` on cpu, returned contiguous in `dtype`.
Tensor check_shaped(const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* op, const char* name,
                    const char* what) {
  check_cpu(t, op, name);
  check_float(t, op, name);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", what, " = ", shape, ", got ", t.sizes());
  return t.to(dtype).contiguous();
}

Tensor check_queries(const Tensor& q, int64_t d, at::ScalarType acc, const char* op) {
  check_cpu(q, op, "queries");
  check_float(q, op, "queries");
  TORCH_CHECK(q.dim() == 2 && q.size(0) >= 1 && q.size(1) == d, op, ": queries must have shape [S, d] with S >= 1 and d = ",
              d, ", got ", q.sizes());
  return q.to(acc).contiguous();
}

// ----------------------------------------------------------------------------- phase 1 / direct

// Fills outs (S tensors [N, d]) and lse (S * N elements) for sources [N, d] and queries [S, d] (acc dtype).
void phase1_forward_into(const std::vector<Tensor>& src, const Tensor& q, double eps, std::vector<Tensor>& outs,
                         Tensor& lse) {
  const int64_t n = static_cast<int64_t>(src.size()), S = q.size(0), N = src[0].size(0), d = src[0].size(1);
  dispatch(src[0].scalar_type(), "phase1", [&](auto types) {
    using T = typename decltype(types)::storage;
    using A = typename decltype(types)::acc;
    std::vector<const T*> sp(n);
    std::vector<T*> op(S);
    for (int64_t i = 0; i < n; ++i) sp[i] = cptr<T>(src[i]);
    for (int64_t l = 0; l < S; ++l) op[l] = mptr<T>(outs[l]);
    Phase1Args<T, A> args;
    args.n = n, args.S = S, args.d = d, args.N = N, args.eps = static_cast<A>(eps);
    args.src = sp.data(), args.q = cptr<A>(q), args.out = op.data(), args.lse = mptr<A>(lse);
    at::parallel_for(0, N, grain(n + S, d), [&](int64_t t0, int64_t t1) { phase1_forward(args, t0, t1); });
  });
}

// grads of the sources (n tensors [N, d]) and of the queries ([S, d], acc dtype).
std::tuple<std::vector<Tensor>, Tensor> phase1_backward_impl(const std::vector<Tensor>& grad_outs, const Tensor& grad_lse,
                                                             const std::vector<Tensor>& src, const Tensor& q,
                                                             const Tensor& lse, double eps) {
  const int64_t n = static_cast<int64_t>(src.size()), S = q.size(0), N = src[0].size(0), d = src[0].size(1);
  std::vector<Tensor> grads;
  for (int64_t i = 0; i < n; ++i) grads.push_back(at::empty_like(src[i]));
  Tensor grad_q;
  dispatch(src[0].scalar_type(), "phase1_backward", [&](auto types) {
    using T = typename decltype(types)::storage;
    using A = typename decltype(types)::acc;
    std::vector<const T*> sp(n), gp(S);
    std::vector<T*> dp(n);
    for (int64_t i = 0; i < n; ++i) sp[i] = cptr<T>(src[i]), dp[i] = mptr<T>(grads[i]);
    for (int64_t l = 0; l < S; ++l) gp[l] = cptr<T>(grad_outs[l]);
    Phase1Args<T, A> args;
    args.n = n, args.S = S, args.d = d, args.N = N, args.eps = static_cast<A>(eps);
    args.src = sp.data(), args.q = cptr<A>(q), args.lse_saved = cptr<A>(lse);
    args.grad_out = gp.data(), args.grad_lse = cptr<A>(grad_lse), args.grad_src = dp.data();
    grad_q = reduce_over_tokens<A>(N, grain(2 * n + S, d), q.sizes(), q.scalar_type(),
                                   [&](int64_t t0, int64_t t1, A* partial) { phase1_backward(args, t0, t1, partial); });
  });
  return {std::move(grads), grad_q};
}

std::vector<Tensor> check_grad_outs(TensorList grad_outs, int64_t S, const Tensor& like, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(grad_outs.size()) == S, op, ": grad_outs has ", grad_outs.size(),
              " tensors; expected one [N, d] per query (S = ", S, ")");
  std::vector<Tensor> out;
  for (const Tensor& g : grad_outs) out.push_back(check_shaped(g, like.sizes(), like.scalar_type(), op, "grad_outs[l]", "[N, d]"));
  return out;
}

std::tuple<std::vector<Tensor>, Tensor> phase1_cpu(TensorList sources, const Tensor& queries, double eps) {
  auto src = check_sources(sources, "phase1");
  const at::ScalarType acc = acc_dtype(src[0].scalar_type());
  Tensor q = check_queries(queries, src[0].size(1), acc, "phase1");
  const int64_t S = q.size(0), N = src[0].size(0);
  std::vector<Tensor> outs;
  for (int64_t l = 0; l < S; ++l) outs.push_back(at::empty_like(src[0]));
  Tensor lse = at::empty({S, N}, src[0].options().dtype(acc));
  phase1_forward_into(src, q, eps, outs, lse);
  return {std::move(outs), lse};
}

std::tuple<std::vector<Tensor>, Tensor> phase1_backward_cpu(TensorList grad_outs, const Tensor& grad_lse,
                                                            TensorList sources, const Tensor& queries, const Tensor& lse,
                                                            double eps) {
  const char* op = "phase1_backward";
  auto src = check_sources(sources, op);
  const at::ScalarType acc = acc_dtype(src[0].scalar_type());
  Tensor q = check_queries(queries, src[0].size(1), acc, op);
  const int64_t S = q.size(0), N = src[0].size(0);
  auto go = check_grad_outs(grad_outs, S, src[0], op);
  Tensor gl = check_shaped(grad_lse, {S, N}, acc, op, "grad_lse", "[S, N]");
  Tensor ls = check_shaped(lse, {S, N}, acc, op, "lse", "[S, N]");
  return phase1_backward_impl(go, gl, src, q, ls, eps);
}

std::tuple<Tensor, Tensor> depth_attn_cpu(TensorList sources, const Tensor& query, double eps) {
  const char* op = "depth_attn";
  auto src = check_sources(sources, op);
  const at::ScalarType acc = acc_dtype(src[0].scalar_type());
  const int64_t N = src[0].size(0), d = src[0].size(1);
  Tensor q = check_shaped(query, {d}, acc, op, "query", "[d]").view({1, d});
  std::vector<Tensor> outs{at::empty_like(src[0])};
  Tensor lse = at::empty({N}, src[0].options().dtype(acc));
  phase1_forward_into(src, q, eps, outs, lse);
  return {outs[0], lse};
}

std::tuple<std::vector<Tensor>, Tensor> depth_attn_backward_cpu(const Tensor& grad_out, const Tensor& grad_lse,
                                                                TensorList sources, const Tensor& query,
                                                                const Tensor& lse, double eps) {
  const char* op = "depth_attn_backward";
  auto src = check_sources(sources, op);
  const at::ScalarType acc = acc_dtype(src[0].scalar_type());
  const int64_t N = src[0].size(0), d = src[0].size(1);
  Tensor q = check_shaped(query, {d}, acc, op, "query", "[d]").view({1, d});
  Tensor go = check_shaped(grad_out, src[0].sizes(), src[0].scalar_type(), op, "grad_out", "[N, d]");
  Tensor gl = check_shaped(grad_lse, {N}, acc, op, "grad_lse", "[N]");
  Tensor ls = check_shaped(lse, {N}, acc, op, "lse", "[N]");
  auto [grads, grad_q] = phase1_backward_impl({go}, gl, src, q, ls, eps);
  return {std::move(grads), grad_q.view({d})};
}

// ----------------------------------------------------------------------------- phase 2

std::tuple<Tensor, Tensor> phase2_cpu(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& partial,
                                      const Tensor& query, double eps) {
  const char* op = "phase2";
  Tensor p = check_sources({partial}, op, "partial")[0];
  const at::ScalarType st = p.scalar_type(), acc = acc_dtype(st);
  const int64_t N = p.size(0), d = p.size(1);
  Tensor o = check_shaped(partial_out, p.sizes(), st, op, "partial_out", "[N, d] like partial");
  Tensor m = check_shaped(partial_lse, {N}, acc, op, "partial_lse", "[N]");
  Tensor q = check_shaped(query, {d}, acc, op, "query", "[d]");
  Tensor h = at::empty_like(p);
  Tensor lse = at::empty({N}, p.options().dtype(acc));
  dispatch(st, op, [&](auto types) {
    using T = typename decltype(types)::storage;
    using A = typename decltype(types)::acc;
    Phase2Args<T, A> args;
    args.d = d, args.eps = static_cast<A>(eps);
    args.p = cptr<T>(p), args.q = cptr<A>(q), args.m = cptr<A>(m), args.o = cptr<T>(o);
    args.h = mptr<T>(h), args.lse = mptr<A>(lse);
    at::parallel_for(0, N, grain(3, d), [&](int64_t t0, int64_t t1) { phase2_forward(args, t0, t1); });
  });
  return {h, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> phase2_backward_cpu(const Tensor& grad_out, const Tensor& grad_lse,
                                                               const Tensor& out, const Tensor& partial_lse,
                                                               const Tensor& lse, const Tensor& partial,
                                                               const Tensor& query, double eps) {
  const char* op = "phase2_backward";
  Tensor p = check_sources({partial}, op, "partial")[0];
  const at::ScalarType st = p.scalar_type(), acc = acc_dtype(st);
  const int64_t N = p.size(0), d = p.size(1);
  Tensor dh = check_shaped(grad_out, p.sizes(), st, op, "grad_out", "[N, d] like partial");
  Tensor h = check_shaped(out, p.sizes(), st, op, "out", "[N, d] like partial");
  Tensor dl = check_shaped(grad_lse, {N}, acc, op, "grad_lse", "[N]");
  Tensor m = check_shaped(partial_lse, {N}, acc, op, "partial_lse", "[N]");
  Tensor ls = check_shaped(lse, {N}, acc, op, "lse", "[N]");
  Tensor q = check_shaped(query, {d}, acc, op, "query", "[d]");
  Tensor grad_o = at::empty_like(p), grad_p = at::empty_like(p);
  Tensor grad_m = at::empty({N}, p.options().dtype(acc));
  Tensor grad_q;
  dispatch(st, op, [&](auto types) {
    using T = typename decltype(types)::storage;
    using A = typename decltype(types)::acc;
    Phase2Args<T, A> args;
    args.d = d, args.eps = static_cast<A>(eps);
    args.p = cptr<T>(p), args.q = cptr<A>(q), args.m = cptr<A>(m);
    args.grad_h = cptr<T>(dh), args.grad_lse = cptr<A>(dl), args.h_saved = cptr<T>(h), args.lse_saved = cptr<A>(ls);
    args.grad_o = mptr<T>(grad_o), args.grad_m = mptr<A>(grad_m), args.grad_p = mptr<T>(grad_p);
    grad_q = reduce_over_tokens<A>(N, grain(5, d), q.sizes(), acc,
                                   [&](int64_t t0, int64_t t1, A* partial) { phase2_backward(args, t0, t1, partial); });
  });
  return {grad_o, grad_m, grad_p, grad_q};
}

}  // namespace
}  // namespace attnres::cpu

TORCH_LIBRARY_IMPL(attnres, CPU, m) {
  using namespace attnres::cpu;
  m.impl("phase1", &phase1_cpu);
  m.impl("phase1_backward", &phase1_backward_cpu);
  m.impl("phase2", &phase2_cpu);
  m.impl("phase2_backward", &phase2_backward_cpu);
  m.impl("depth_attn", &depth_attn_cpu);
  m.impl("depth_attn_backward", &depth_attn_backward_cpu);
}
