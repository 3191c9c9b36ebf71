// Autograd for the depth-attention ops, for every backend (TORCH_LIBRARY_IMPL(attnres, Autograd, m)).
//
// Each forward op redispatches below autograd to the backend kernel and saves what its *_backward op
// needs; backward calls that op. The formulas are those of SPEC §2 (derived in the backward kernels'
// comments); this file only wires them. In C++ rather than torch.library.register_autograd, for the
// host time: a small launch-bound model's Block AttnRes step was 1.17x the standard one on an H100,
// and the Python autograd wrapper was a part of that. On the 2-core CPU machine, tiny tensors (9
// sources, 2 queries), fwd + bwd per call: phase 1 458-571 -> 390-476 us, phase 2 307-335 -> 258-280 us
// (two runs each, old and new build alternated).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ListAndTensor = std::tuple<std::vector<Tensor>, Tensor>;
using TensorPair = std::tuple<Tensor, Tensor>;

// The C++ signatures of the schemas in csrc/ops.cpp.
using Phase1Op = ListAndTensor(at::TensorList, const Tensor&, double);
using Phase1BackwardOp =
    ListAndTensor(at::TensorList, const Tensor&, at::TensorList, const Tensor&, const Tensor&, double);
using Phase2Op = TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double);
using Phase2BackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    double);
using Phase2NormOp = TensorPair(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                double);
using Phase2NormBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, double, double);
using Phase2NormAddOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, double, double);
using Phase2NormAddBackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, double, double);
using DepthAttnOp = TensorPair(at::TensorList, const Tensor&, double);
using DepthAttnBackwardOp =
    ListAndTensor(const Tensor&, const Tensor&, at::TensorList, const Tensor&, const Tensor&, double);

// The typed handle of the op `name` (looked up once per call site: the callers keep it static).
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// An undefined incoming gradient (the output was not used) as zeros like `like`.
Tensor defined_or_zeros(const Tensor& g, const Tensor& like) {
  return g.defined() ? g : at::zeros_like(like);
}

// Phase 1 and the direct op read a list of sources under queries: both save the sources, the
// query (or queries), the lse and eps, and return a gradient per source, the query's and eps's none.
void save_sources(AutogradContext* ctx, at::TensorList sources, const Tensor& query, const Tensor& lse,
                  double eps) {
  std::vector<Tensor> saved(sources.begin(), sources.end());
  saved.push_back(query);
  saved.push_back(lse);
  ctx->save_for_backward(saved);
  ctx->saved_data["eps"] = eps;
}

struct SavedSources {
  std::vector<Tensor> sources;
  Tensor query, lse;
  double eps;
};

SavedSources saved_sources(AutogradContext* ctx) {
  auto saved = ctx->get_saved_variables();
  SavedSources out{{}, saved[saved.size() - 2], saved.back(), ctx->saved_data["eps"].toDouble()};
  out.sources.assign(saved.begin(), saved.end() - 2);
  return out;
}

variable_list source_grads(const std::vector<Tensor>& grad_sources, const Tensor& grad_query,
                           const Tensor& query) {
  variable_list result(grad_sources.begin(), grad_sources.end());
  result.push_back(grad_query.to(query.scalar_type()));
  result.emplace_back();  // eps
  return result;
}

// ---------------------------------------------------------------------------- phase 1

class Phase1 : public torch::autograd::Function<Phase1> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList sources, const Tensor& queries,
                               double eps) {
    static auto op = typed_op<Phase1Op>("attnres::phase1");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [outs, lse] = op.call(sources, queries, eps);
    save_sources(ctx, sources, queries, lse, eps);
    outs.push_back(lse);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = typed_op<Phase1BackwardOp>("attnres::phase1_backward");
    const SavedSources in = saved_sources(ctx);
    std::vector<Tensor> grad_outs;
    grad_outs.reserve(grads.size() - 1);
    for (size_t s = 0; s + 1 < grads.size(); ++s) {
      grad_outs.push_back(defined_or_zeros(grads[s], in.sources[0]));
    }
    const Tensor grad_lse = defined_or_zeros(grads.back(), in.lse);
    auto [grad_sources, grad_q] = op.call(grad_outs, grad_lse, in.sources, in.query, in.lse, in.eps);
    return source_grads(grad_sources, grad_q, in.query);
  }
};

ListAndTensor phase1_autograd(at::TensorList sources, const Tensor& queries, double eps) {
  auto out = Phase1::apply(sources, queries, eps);
  Tensor lse = out.back();
  out.pop_back();
  return {std::move(out), lse};
}

// ---------------------------------------------------------------------------- phase 2

class Phase2 : public torch::autograd::Function<Phase2> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& partial_out, const Tensor& partial_lse,
                               const Tensor& partial, const Tensor& query, double eps) {
    static auto op = typed_op<Phase2Op>("attnres::phase2");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(partial_out, partial_lse, partial, query, eps);
    // h (out) instead of partial_out: the sublayer keeps h anyway (phase2_backward's schema comment)
    ctx->save_for_backward({out, partial_lse, lse, partial, query});
    ctx->saved_data["eps"] = eps;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = typed_op<Phase2BackwardOp>("attnres::phase2_backward");
    auto saved = ctx->get_saved_variables();
    const Tensor &out = saved[0], &partial_lse = saved[1], &lse = saved[2], &partial = saved[3],
                 &query = saved[4];
    auto [g_o, g_m, g_p, g_q] = op.call(defined_or_zeros(grads[0], out), defined_or_zeros(grads[1], lse), out,
                                        partial_lse, lse, partial, query, ctx->saved_data["eps"].toDouble());
    return {g_o, g_m.to(partial_lse.scalar_type()), g_p, g_q.to(query.scalar_type()), Tensor()};
  }
};

TensorPair phase2_autograd(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& partial,
                           const Tensor& query, double eps) {
  auto out = Phase2::apply(partial_out, partial_lse, partial, query, eps);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------- phase 2 + norm

class Phase2Norm : public torch::autograd::Function<Phase2Norm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& partial_out, const Tensor& partial_lse,
                               const Tensor& partial, const Tensor& query, const Tensor& weight, double eps,
                               double norm_eps) {
    static auto op = typed_op<Phase2NormOp>("attnres::phase2_norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, lse] = op.call(partial_out, partial_lse, partial, query, weight, eps, norm_eps);
    // the phase-1 output, not h (which the op never writes): backward recomputes h from it
    ctx->save_for_backward({partial_out, partial_lse, lse, partial, query, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["norm_eps"] = norm_eps;
    return {y, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = typed_op<Phase2NormBackwardOp>("attnres::phase2_norm_backward");
    auto saved = ctx->get_saved_variables();
    const Tensor &out = saved[0], &partial_lse = saved[1], &lse = saved[2], &partial = saved[3],
                 &query = saved[4], &weight = saved[5];
    auto [g_o, g_m, g_p, g_q, g_w] =
        op.call(defined_or_zeros(grads[0], partial), defined_or_zeros(grads[1], lse), out, partial_lse, lse,
                partial, query, weight, ctx->saved_data["eps"].toDouble(), ctx->saved_data["norm_eps"].toDouble());
    return {g_o,     g_m.to(partial_lse.scalar_type()), g_p, g_q.to(query.scalar_type()),
            g_w.to(weight.scalar_type()), Tensor(), Tensor()};
  }
};

TensorPair phase2_norm_autograd(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& partial,
                                const Tensor& query, const Tensor& weight, double eps, double norm_eps) {
  auto out = Phase2Norm::apply(partial_out, partial_lse, partial, query, weight, eps, norm_eps);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------- phase 2 + norm + the add

class Phase2NormAdd : public torch::autograd::Function<Phase2NormAdd> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& partial_out, const Tensor& partial_lse,
                               const Tensor& prev, const Tensor& addend, const Tensor& query, const Tensor& weight,
                               double eps, double norm_eps) {
    static auto op = typed_op<Phase2NormAddOp>("attnres::phase2_norm_add");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, lse, partial] = op.call(partial_out, partial_lse, prev, addend, query, weight, eps, norm_eps);
    // the new partial summary (an output) and the phase-1 output, as Phase2Norm saves them
    ctx->save_for_backward({partial_out, partial_lse, lse, partial, query, weight});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["norm_eps"] = norm_eps;
    return {y, lse, partial};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = typed_op<Phase2NormAddBackwardOp>("attnres::phase2_norm_add_backward");
    auto saved = ctx->get_saved_variables();
    const Tensor &out = saved[0], &partial_lse = saved[1], &lse = saved[2], &partial = saved[3],
                 &query = saved[4], &weight = saved[5];
    std::optional<Tensor> grad_partial;
    if (grads[2].defined()) grad_partial = grads[2];
    auto [g_o, g_m, g_p, g_q, g_w] =
        op.call(defined_or_zeros(grads[0], partial), defined_or_zeros(grads[1], lse), grad_partial, out,
                partial_lse, lse, partial, query, weight, ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["norm_eps"].toDouble());
    // partial = prev + addend: both get the partial's gradient (the one tensor, as torch's add gives it)
    return {g_o, g_m.to(partial_lse.scalar_type()), g_p, g_p, g_q.to(query.scalar_type()),
            g_w.to(weight.scalar_type()), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> phase2_norm_add_autograd(const Tensor& partial_out, const Tensor& partial_lse,
                                                            const Tensor& prev, const Tensor& addend,
                                                            const Tensor& query, const Tensor& weight, double eps,
                                                            double norm_eps) {
  auto out = Phase2NormAdd::apply(partial_out, partial_lse, prev, addend, query, weight, eps, norm_eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------- direct

class DepthAttn : public torch::autograd::Function<DepthAttn> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList sources, const Tensor& query,
                               double eps) {
    static auto op = typed_op<DepthAttnOp>("attnres::depth_attn");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(sources, query, eps);
    save_sources(ctx, sources, query, lse, eps);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = typed_op<DepthAttnBackwardOp>("attnres::depth_attn_backward");
    const SavedSources in = saved_sources(ctx);
    auto [grad_sources, grad_q] = op.call(defined_or_zeros(grads[0], in.sources[0]),
                                          defined_or_zeros(grads[1], in.lse), in.sources, in.query, in.lse,
                                          in.eps);
    return source_grads(grad_sources, grad_q, in.query);
  }
};

TensorPair depth_attn_autograd(at::TensorList sources, const Tensor& query, double eps) {
  auto out = DepthAttn::apply(sources, query, eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnres, Autograd, m) {
  m.impl("phase1", &phase1_autograd);
  m.impl("phase2", &phase2_autograd);
  m.impl("phase2_norm", &phase2_norm_autograd);
  m.impl("phase2_norm_add", &phase2_norm_add_autograd);
  m.impl("depth_attn", &depth_attn_autograd);
}
