// CUDA implementations of the attnres ops (schemas in csrc/ops.cpp): argument checks, output
// allocation and the launches of the kernels in this folder (plain-pointer interface, launch.h).
// float32, bfloat16 and float16 sources; queries of any floating dtype (used in fp32); any d up to
// 8 * 512 chunks of 16 bytes (32768 for 16-bit dtypes, 16384 for float32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "launch.h"

namespace attnres_cuda {
namespace {

using at::Tensor;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "attnres CUDA ", what, " failed: ", cudaGetErrorString(err));
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      TORCH_CHECK(false, "attnres CUDA kernels take float32, bfloat16 or float16 sources, got ", t.scalar_type(),
                  " (float64 runs on the CPU kernels or attnres.reference)");
  }
  return DType::F32;
}

int num_sms() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

// Launch shapes depend on (op, dtype, d, S, n, alignment, device) only; the grid is capped by the
// token count. Caching them keeps occupancy queries and attribute calls off the per-call path.
enum class Op : int { P1Fwd, P1Bwd, P2Fwd, P2Bwd, P1BwdSplit, P2NormFwd, P2NormBwd };

template <typename P, typename Make>
P cached(Op op, DType dt, int d, int S, int n, bool vec, Make make) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int, bool, int>, P> cache;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const auto key = std::make_tuple(static_cast<int>(op), static_cast<int>(dt), d, S, n, vec, dev);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make(num_sms())).first;
  return it->second;
}

Plan cached_plan(Op op, DType dt, int d, int S, int n, bool vec, int N) {
  Plan p = cached<Plan>(op, dt, d, S, n, vec, [&](int sms) {
    const int big = std::numeric_limits<int>::max();
    switch (op) {
      case Op::P1Fwd: return plan_p1_fwd(dt, d, S, n, big, sms, vec);
      case Op::P1Bwd: return plan_p1_bwd(dt, d, S, n, big, sms, vec);
      case Op::P2Fwd: return plan_p2(dt, d, big, sms, false, false);
      case Op::P2Bwd: return plan_p2(dt, d, big, sms, true, false);
      case Op::P2NormFwd: return plan_p2(dt, d, big, sms, false, true);
      default: return plan_p2(dt, d, big, sms, true, true);
    }
  });
  p.grid = std::min(p.grid, N);
  return p;
}

// Phase-1 backward: the split kernels (p1_bwd_split.cuh) where they apply, unless the environment
// variable ATTNRES_P1_BWD is "fused" (read per call, so a benchmark can time both in one process).
bool split_p1_bwd_wanted() {
  const char* mode = std::getenv("ATTNRES_P1_BWD");
  return mode == nullptr || std::string(mode) != "fused";
}

std::vector<Tensor> contiguous_rows(at::TensorList ts, const char* name, int64_t N, int64_t d,
                                    at::ScalarType dtype, const at::Device& device) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor& t = ts[i];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == d, name, "[", i, "] must have shape [", N, ", ", d,
                "], got ", t.sizes());
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), ", expected ", device);
    out.push_back(t.to(dtype).contiguous());
  }
  return out;
}

bool aligned(const Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

// Queries [S, d] (or a slice of them) as zero-padded fp32 [ST, dp]: the queries themselves when they
// already are (no fill and copy kernels per call: the residual path hands over fp32 [S, d]).
Tensor padded_queries(const Tensor& q, int ST, int dp) {
  if (q.scalar_type() == at::kFloat && q.size(0) == ST && q.size(1) == dp && q.is_contiguous() && aligned(q, 16))
    return q;
  Tensor buf = at::zeros({ST, dp}, q.options().dtype(at::kFloat));
  buf.narrow(0, 0, q.size(0)).narrow(1, 0, q.size(1)).copy_(q);
  return buf;
}

void check_plan(const Plan& p, const char* op, int64_t d) {
  TORCH_CHECK(p.C != 0, "attnres ", op, ": d = ", d, " is larger than the CUDA kernels support");
  TORCH_CHECK(p.fn != nullptr && p.grid > 0, "attnres ", op, ": no kernel configuration fits d = ", d,
              " (shared memory or registers); reduce the number of sources or queries");
}

// ------------------------------------------------------------------------------------------- phase 1

std::tuple<std::vector<Tensor>, Tensor> phase1_cuda(at::TensorList sources, const Tensor& queries, double eps) {
  TORCH_CHECK(!sources.empty(), "attnres phase1: sources is empty");
  TORCH_CHECK(sources.size() <= static_cast<size_t>(kMaxSources), "attnres phase1: at most ", kMaxSources,
              " sources, got ", sources.size());
  const Tensor& s0 = sources[0];
  TORCH_CHECK(s0.is_cuda() && s0.dim() == 2, "attnres phase1: sources must be CUDA tensors [N, d]");
  c10::cuda::CUDAGuard guard(s0.device());
  const int64_t N = s0.size(0), d = s0.size(1);
  const int n = static_cast<int>(sources.size());
  const DType dt = dtype_of(s0);
  TORCH_CHECK(queries.dim() == 2 && queries.size(1) == d && queries.size(0) >= 1,
              "attnres phase1: queries must be [S, ", d, "], got ", queries.sizes());
  const int S = static_cast<int>(queries.size(0));
  auto src = contiguous_rows(sources, "sources", N, d, s0.scalar_type(), s0.device());
  Tensor q = queries.to(s0.device()).contiguous();
  std::vector<Tensor> outs;
  for (int l = 0; l < S; ++l) outs.push_back(at::empty({N, d}, s0.options()));
  Tensor lse = at::empty({S, N}, s0.options().dtype(at::kFloat));
  if (N == 0 || d == 0) {
    if (N > 0) lse.fill_(std::log(static_cast<double>(n)));
    for (auto& o : outs) o.zero_();
    return {outs, lse};
  }
  const int vbytes = 16;
  bool vec = d % (vbytes / static_cast<int>(s0.element_size())) == 0;
  for (const auto& t : src) vec = vec && aligned(t, vbytes);
  for (const auto& t : outs) vec = vec && aligned(t, vbytes);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int g0 = 0; g0 < S; g0 += kMaxQueries) {
    const int Sg = std::min(kMaxQueries, S - g0);
    const Plan plan = cached_plan(Op::P1Fwd, dt, static_cast<int>(d), Sg, n, vec, static_cast<int>(N));
    check_plan(plan, "phase1", d);
    Tensor qp = padded_queries(q.narrow(0, g0, Sg), plan.ST, plan.dp);
    P1FwdArgs a{};
    for (int i = 0; i < n; ++i) a.src[i] = src[i].data_ptr();
    for (int l = 0; l < Sg; ++l) a.out[l] = outs[g0 + l].data_ptr();
    a.lse = lse.data_ptr<float>() + static_cast<int64_t>(g0) * N;
    a.q = qp.data_ptr<float>();
    a.lse_stride = N;
    a.n = n;
    a.S = Sg;
    a.N = static_cast<int>(N);
    a.d = static_cast<int>(d);
    a.eps = static_cast<float>(eps);
    a.vec = vec;
    a.stages = plan.stages;
    check_cuda(launch_p1_fwd(dt, plan, a, stream), "phase1 launch");
  }
  return {outs, lse};
}

std::tuple<std::vector<Tensor>, Tensor> phase1_backward_cuda(at::TensorList grad_outs, const Tensor& grad_lse,
                                                             at::TensorList sources, const Tensor& queries,
                                                             const Tensor& lse, double eps) {
  TORCH_CHECK(!sources.empty(), "attnres phase1_backward: sources is empty");
  TORCH_CHECK(sources.size() <= static_cast<size_t>(kMaxSources), "attnres phase1_backward: at most ", kMaxSources,
              " sources, got ", sources.size());
  const Tensor& s0 = sources[0];
  TORCH_CHECK(s0.is_cuda() && s0.dim() == 2, "attnres phase1_backward: sources must be CUDA tensors [N, d]");
  c10::cuda::CUDAGuard guard(s0.device());
  const int64_t N = s0.size(0), d = s0.size(1);
  const int n = static_cast<int>(sources.size());
  const DType dt = dtype_of(s0);
  TORCH_CHECK(queries.dim() == 2 && queries.size(1) == d, "attnres phase1_backward: queries must be [S, ", d,
              "], got ", queries.sizes());
  const int S = static_cast<int>(queries.size(0));
  TORCH_CHECK(static_cast<int>(grad_outs.size()) == S, "attnres phase1_backward: expected ", S,
              " grad_outs, got ", grad_outs.size());
  TORCH_CHECK(grad_lse.numel() == S * N && lse.numel() == S * N,
              "attnres phase1_backward: grad_lse and lse must be [S, N] = [", S, ", ", N, "]");
  auto src = contiguous_rows(sources, "sources", N, d, s0.scalar_type(), s0.device());
  auto gout = contiguous_rows(grad_outs, "grad_outs", N, d, s0.scalar_type(), s0.device());
  Tensor q = queries.to(s0.device()).contiguous();
  Tensor glse = grad_lse.to(s0.device(), at::kFloat).reshape({S, N}).contiguous();
  Tensor lse_c = lse.to(s0.device(), at::kFloat).reshape({S, N}).contiguous();
  std::vector<Tensor> grads;
  for (int i = 0; i < n; ++i) grads.push_back(at::empty({N, d}, s0.options()));
  Tensor grad_q = at::empty({S, d}, s0.options().dtype(at::kFloat));
  if (N == 0 || d == 0) {
    for (auto& g : grads) g.zero_();
    grad_q.zero_();
    return {grads, grad_q};
  }
  const int vbytes = 4 * static_cast<int>(s0.element_size());
  bool vec = d % 4 == 0, vec16 = d % (16 / static_cast<int>(s0.element_size())) == 0;
  for (const auto* ts : {&src, &gout, &grads})
    for (const auto& t : *ts) {
      vec = vec && aligned(t, vbytes);
      vec16 = vec16 && aligned(t, 16);
    }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool split_wanted = vec16 && split_p1_bwd_wanted();
  // More than kMaxQueriesBwd queries: the groups' source gradients add up (in fp32).
  std::vector<Tensor> acc;
  for (int g0 = 0; g0 < S; g0 += kMaxQueriesBwd) {
    const int Sg = std::min(kMaxQueriesBwd, S - g0);
    P1BwdArgs a{};
    for (int i = 0; i < n; ++i) {
      a.src[i] = src[i].data_ptr();
      a.dsrc[i] = grads[i].data_ptr();
    }
    for (int l = 0; l < Sg; ++l) a.dout[l] = gout[g0 + l].data_ptr();
    a.dlse = glse.data_ptr<float>() + static_cast<int64_t>(g0) * N;
    a.lse = lse_c.data_ptr<float>() + static_cast<int64_t>(g0) * N;
    a.lse_stride = N;
    a.n = n;
    a.S = Sg;
    a.N = static_cast<int>(N);
    a.d = static_cast<int>(d);
    a.eps = static_cast<float>(eps);
    // the split kernels where their plan exists (aligned rows, <= 8 queries), else the fused ones
    SplitPlan sp{};
    if (split_wanted)
      sp = cached<SplitPlan>(Op::P1BwdSplit, dt, static_cast<int>(d), Sg, n, true,
                             [&](int sms) { return plan_p1_bwd_split(dt, static_cast<int>(d), Sg, n, sms); });
    const bool split = sp.coef.fn != nullptr;
    Plan plan{};
    if (!split) {
      plan = cached_plan(Op::P1Bwd, dt, static_cast<int>(d), Sg, n, vec, static_cast<int>(N));
      check_plan(plan, "phase1_backward", d);
    }
    const int ST = split ? sp.coef.ST : plan.ST;
    const int qwidth = split ? sp.qwidth : plan.dp, dp = split ? sp.apply.dp : plan.dp;
    const int groups = split ? split_groups(sp, static_cast<int>(N)) : plan.grid;  // dq partial sums
    Tensor qp = padded_queries(q.narrow(0, g0, Sg), ST, qwidth);
    Tensor part = at::empty({groups, ST, dp}, s0.options().dtype(at::kFloat));
    a.q = qp.data_ptr<float>();
    a.qld = qwidth;
    a.dq_part = part.data_ptr<float>();
    if (split) {
      Tensor coef = at::empty({N * n * sp.coef_stride}, s0.options().dtype(at::kFloat));
      a.coef = coef.data_ptr<float>();
      a.tile = sp.tile;
      a.vec = true;
      check_cuda(launch_p1_bwd_split(sp, a, stream), "phase1_backward launch (split kernels)");
    } else {
      a.vec = vec;
      a.dq_in_smem = plan.dq_smem;
      a.stages = plan.stages;
      check_cuda(launch_p1_bwd(dt, plan, a, stream), "phase1_backward launch");
    }
    check_cuda(launch_sum_partials(part.data_ptr<float>(), grad_q.data_ptr<float>() + static_cast<int64_t>(g0) * d,
                                   groups, Sg, ST, static_cast<int>(d), dp, stream),
               "phase1_backward reduction");
    if (S > kMaxQueriesBwd) {
      if (acc.empty()) {
        for (const auto& g : grads) acc.push_back(g.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true));
      } else {
        for (int i = 0; i < n; ++i) acc[i].add_(grads[i]);
      }
    }
  }
  if (!acc.empty())
    for (int i = 0; i < n; ++i) grads[i].copy_(acc[i]);
  return {grads, grad_q};
}

// ------------------------------------------------------------------------------------------- phase 2

// Phase 2, and phase 2 with the sublayer's RMSNorm fused in (`weight` defined: the output is
// y = rmsnorm(h) * weight, h itself is not written); `addend` defined (with the norm): the partial summary
// is partial + addend, returned third (else the third result is undefined). `op` names the op in errors.
std::tuple<Tensor, Tensor, Tensor> phase2_impl(const char* op, const Tensor& partial_out, const Tensor& partial_lse,
                                               const Tensor& partial, const Tensor& addend, const Tensor& query,
                                               const Tensor& weight, double eps, double norm_eps) {
  TORCH_CHECK(partial.is_cuda() && partial.dim() == 2, "attnres ", op, ": partial must be a CUDA tensor [N, d]");
  c10::cuda::CUDAGuard guard(partial.device());
  const int64_t N = partial.size(0), d = partial.size(1);
  const DType dt = dtype_of(partial);
  const bool norm = weight.defined();
  TORCH_CHECK(partial_out.sizes() == partial.sizes(), "attnres ", op, ": partial_out must be [", N, ", ", d, "]");
  TORCH_CHECK(partial_lse.numel() == N, "attnres ", op, ": partial_lse must have ", N, " elements");
  TORCH_CHECK(query.numel() == d, "attnres ", op, ": query must be [", d, "]");
  TORCH_CHECK(!norm || weight.numel() == d, "attnres ", op, ": weight must be [", d, "]");
  const bool add = addend.defined();
  TORCH_CHECK(!add || (norm && addend.sizes() == partial.sizes() && addend.scalar_type() == partial.scalar_type() &&
                       addend.device() == partial.device()),
              "attnres ", op, ": addend must be [", N, ", ", d, "] like partial (same dtype and device)");
  Tensor o = partial_out.to(partial.scalar_type()).contiguous();
  Tensor p = partial.contiguous();
  Tensor v = add ? addend.contiguous() : Tensor();
  Tensor p_new = add ? at::empty({N, d}, partial.options()) : Tensor();
  Tensor m = partial_lse.to(at::kFloat).reshape({N}).contiguous();
  Tensor h = at::empty({N, d}, partial.options());
  Tensor lse = at::empty({N}, partial.options().dtype(at::kFloat));
  if (N == 0) return {h, lse, p_new};
  if (d == 0) {
    lse.copy_(at::logaddexp(m, at::zeros_like(m)));
    return {h, lse, p_new};
  }
  const Plan plan = cached_plan(norm ? Op::P2NormFwd : Op::P2Fwd, dt, static_cast<int>(d), 1, 1, false,
                                static_cast<int>(N));
  check_plan(plan, op, d);
  Tensor qp = query.to(partial.device(), at::kFloat).reshape({d}).contiguous();
  Tensor gp = norm ? weight.to(partial.device(), at::kFloat).reshape({d}).contiguous() : Tensor();
  const int vbytes = 16;
  const bool vec = d % (vbytes / static_cast<int>(p.element_size())) == 0 && aligned(o, vbytes) &&
                   aligned(p, vbytes) && aligned(h, vbytes) && (!add || (aligned(v, vbytes) && aligned(p_new, vbytes)));
  P2FwdArgs a{};
  a.o = o.data_ptr();
  a.m = m.data_ptr<float>();
  a.p = p.data_ptr();
  a.v = add ? v.data_ptr() : nullptr;
  a.p_out = add ? p_new.data_ptr() : nullptr;
  a.q = qp.data_ptr<float>();
  a.g = norm ? gp.data_ptr<float>() : nullptr;
  a.h = h.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.N = static_cast<int>(N);
  a.d = static_cast<int>(d);
  a.eps = static_cast<float>(eps);
  a.norm_eps = static_cast<float>(norm_eps);
  a.vec = vec;
  a.qvec = d % 4 == 0 && aligned(qp, 16) && (!norm || aligned(gp, 16));
  check_cuda(launch_p2_fwd(dt, plan, a, c10::cuda::getCurrentCUDAStream()), op);
  return {h, lse, p_new};
}

std::tuple<Tensor, Tensor> phase2_cuda(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& partial,
                                       const Tensor& query, double eps) {
  auto [h, lse, unused] = phase2_impl("phase2", partial_out, partial_lse, partial, Tensor(), query, Tensor(), eps, 0.0);
  return {h, lse};
}

std::tuple<Tensor, Tensor> phase2_norm_cuda(const Tensor& partial_out, const Tensor& partial_lse,
                                            const Tensor& partial, const Tensor& query, const Tensor& weight,
                                            double eps, double norm_eps) {
  TORCH_CHECK(weight.defined(), "attnres phase2_norm: weight is undefined");
  auto [y, lse, unused] =
      phase2_impl("phase2_norm", partial_out, partial_lse, partial, Tensor(), query, weight, eps, norm_eps);
  return {y, lse};
}

std::tuple<Tensor, Tensor, Tensor> phase2_norm_add_cuda(const Tensor& partial_out, const Tensor& partial_lse,
                                                        const Tensor& prev, const Tensor& addend, const Tensor& query,
                                                        const Tensor& weight, double eps, double norm_eps) {
  TORCH_CHECK(weight.defined() && addend.defined(), "attnres phase2_norm_add: weight or addend is undefined");
  return phase2_impl("phase2_norm_add", partial_out, partial_lse, prev, addend, query, weight, eps, norm_eps);
}

// Backward of the three. Without the norm, `fwd` is the forward output h; with it (`weight` defined),
// `fwd` is the phase-1 output o, `grad_out` the gradient of y, and a fifth result is the weight's
// gradient; `grad_partial` defined (phase2_norm_add): added to the partial summary's gradient.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> phase2_backward_impl(
    const char* op, const Tensor& grad_out, const Tensor& grad_lse, const Tensor& grad_partial, const Tensor& fwd,
    const Tensor& partial_lse, const Tensor& lse, const Tensor& partial, const Tensor& query, const Tensor& weight,
    double eps, double norm_eps) {
  TORCH_CHECK(partial.is_cuda() && partial.dim() == 2, "attnres ", op, ": partial must be a CUDA tensor [N, d]");
  c10::cuda::CUDAGuard guard(partial.device());
  const int64_t N = partial.size(0), d = partial.size(1);
  const DType dt = dtype_of(partial);
  const bool norm = weight.defined();
  TORCH_CHECK(grad_out.sizes() == partial.sizes() && fwd.sizes() == partial.sizes(), "attnres ", op,
              ": the gradient and the saved output must be [", N, ", ", d, "]");
  TORCH_CHECK(grad_lse.numel() == N && partial_lse.numel() == N && lse.numel() == N, "attnres ", op,
              ": grad_lse, partial_lse and lse must have ", N, " elements");
  TORCH_CHECK(query.numel() == d, "attnres ", op, ": query must be [", d, "]");
  TORCH_CHECK(!norm || weight.numel() == d, "attnres ", op, ": weight must be [", d, "]");
  const bool add = grad_partial.defined();
  TORCH_CHECK(!add || (norm && grad_partial.sizes() == partial.sizes()), "attnres ", op,
              ": grad_partial must be [", N, ", ", d, "]");
  Tensor dp_in = add ? grad_partial.to(partial.scalar_type()).contiguous() : Tensor();
  Tensor dh = grad_out.to(partial.scalar_type()).contiguous();
  Tensor h = fwd.to(partial.scalar_type()).contiguous();
  Tensor p = partial.contiguous();
  Tensor m = partial_lse.to(at::kFloat).reshape({N}).contiguous();
  Tensor lse_c = lse.to(at::kFloat).reshape({N}).contiguous();
  Tensor dlse = grad_lse.to(at::kFloat).reshape({N}).contiguous();
  Tensor g_o = at::empty({N, d}, partial.options());
  Tensor g_p = at::empty({N, d}, partial.options());
  Tensor g_m = at::empty({N}, partial.options().dtype(at::kFloat));
  Tensor g_q = at::zeros({d}, partial.options().dtype(at::kFloat));
  Tensor g_w = norm ? at::zeros({d}, partial.options().dtype(at::kFloat)) : Tensor();
  auto result = [&] { return std::make_tuple(g_o, g_m, g_p, g_q, g_w); };
  if (N == 0 || d == 0) {  // g_o, g_p are empty
    if (N > 0) g_m.copy_(dlse * at::exp(m - lse_c));
    return result();
  }
  const Plan plan = cached_plan(norm ? Op::P2NormBwd : Op::P2Bwd, dt, static_cast<int>(d), 1, 1, false,
                                static_cast<int>(N));
  check_plan(plan, op, d);
  Tensor qp = query.to(partial.device(), at::kFloat).reshape({d}).contiguous();
  Tensor gp = norm ? weight.to(partial.device(), at::kFloat).reshape({d}).contiguous() : Tensor();
  const int rows = norm ? 2 : 1;
  Tensor part = at::empty({plan.grid, rows, plan.dp}, partial.options().dtype(at::kFloat));
  const int vbytes = 16;
  const bool vec = d % (vbytes / static_cast<int>(p.element_size())) == 0 && aligned(dh, vbytes) &&
                   aligned(h, vbytes) && aligned(p, vbytes) && aligned(g_o, vbytes) && aligned(g_p, vbytes) &&
                   (!add || aligned(dp_in, vbytes));
  P2BwdArgs a{};
  a.dh = dh.data_ptr();
  a.dlse = dlse.data_ptr<float>();
  a.h = h.data_ptr();
  a.m = m.data_ptr<float>();
  a.lse = lse_c.data_ptr<float>();
  a.p = p.data_ptr();
  a.q = qp.data_ptr<float>();
  a.g = norm ? gp.data_ptr<float>() : nullptr;
  a.do_ = g_o.data_ptr();
  a.dm = g_m.data_ptr<float>();
  a.dp_ = g_p.data_ptr();
  a.dp_in = add ? dp_in.data_ptr() : nullptr;
  a.dq_part = part.data_ptr<float>();
  a.N = static_cast<int>(N);
  a.d = static_cast<int>(d);
  a.eps = static_cast<float>(eps);
  a.norm_eps = static_cast<float>(norm_eps);
  a.vec = vec;
  a.qvec = d % 4 == 0 && aligned(qp, 16) && (!norm || aligned(gp, 16));
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(launch_p2_bwd(dt, plan, a, stream), op);
  // rows of part: dq, then dg (one reduction each, into separate outputs)
  check_cuda(launch_sum_partials(part.data_ptr<float>(), g_q.data_ptr<float>(), plan.grid, 1, rows,
                                 static_cast<int>(d), plan.dp, stream),
             "phase2 backward reduction");
  if (norm)
    check_cuda(launch_sum_partials(part.data_ptr<float>() + plan.dp, g_w.data_ptr<float>(), plan.grid, 1, rows,
                                   static_cast<int>(d), plan.dp, stream),
               "phase2_norm backward reduction");
  return result();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> phase2_backward_cuda(const Tensor& grad_out, const Tensor& grad_lse,
                                                                const Tensor& out, const Tensor& partial_lse,
                                                                const Tensor& lse, const Tensor& partial,
                                                                const Tensor& query, double eps) {
  auto [g_o, g_m, g_p, g_q, unused] = phase2_backward_impl("phase2_backward", grad_out, grad_lse, Tensor(), out,
                                                           partial_lse, lse, partial, query, Tensor(), eps, 0.0);
  return {g_o, g_m, g_p, g_q};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> phase2_norm_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_lse, const Tensor& partial_out, const Tensor& partial_lse,
    const Tensor& lse, const Tensor& partial, const Tensor& query, const Tensor& weight, double eps,
    double norm_eps) {
  TORCH_CHECK(weight.defined(), "attnres phase2_norm_backward: weight is undefined");
  return phase2_backward_impl("phase2_norm_backward", grad_y, grad_lse, Tensor(), partial_out, partial_lse, lse,
                              partial, query, weight, eps, norm_eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> phase2_norm_add_backward_cuda(
    const Tensor& grad_y, const Tensor& grad_lse, const std::optional<Tensor>& grad_partial, const Tensor& partial_out,
    const Tensor& partial_lse, const Tensor& lse, const Tensor& partial, const Tensor& query, const Tensor& weight,
    double eps, double norm_eps) {
  TORCH_CHECK(weight.defined(), "attnres phase2_norm_add_backward: weight is undefined");
  return phase2_backward_impl("phase2_norm_add_backward", grad_y, grad_lse, grad_partial.value_or(Tensor()),
                              partial_out, partial_lse, lse, partial, query, weight, eps, norm_eps);
}

// ------------------------------------------------------------------------------------------- direct

std::tuple<Tensor, Tensor> depth_attn_cuda(at::TensorList sources, const Tensor& query, double eps) {
  TORCH_CHECK(!sources.empty(), "attnres depth_attn: sources is empty");
  const int64_t d = sources[0].size(-1);
  TORCH_CHECK(query.numel() == d, "attnres depth_attn: query must be [", d, "]");
  auto [outs, lse] = phase1_cuda(sources, query.reshape({1, d}), eps);
  return {outs[0], lse[0]};
}

std::tuple<std::vector<Tensor>, Tensor> depth_attn_backward_cuda(const Tensor& grad_out, const Tensor& grad_lse,
                                                                 at::TensorList sources, const Tensor& query,
                                                                 const Tensor& lse, double eps) {
  TORCH_CHECK(!sources.empty(), "attnres depth_attn_backward: sources is empty");
  const int64_t d = sources[0].size(-1);
  TORCH_CHECK(query.numel() == d, "attnres depth_attn_backward: query must be [", d, "]");
  std::vector<Tensor> gouts{grad_out};
  auto [grads, gq] = phase1_backward_cuda(gouts, grad_lse.reshape({1, -1}), sources, query.reshape({1, d}),
                                          lse.reshape({1, -1}), eps);
  return {grads, gq.reshape({d})};
}

}  // namespace
}  // namespace attnres_cuda

TORCH_LIBRARY_IMPL(attnres, CUDA, m) {
  m.impl("phase1", &attnres_cuda::phase1_cuda);
  m.impl("phase1_backward", &attnres_cuda::phase1_backward_cuda);
  m.impl("phase2", &attnres_cuda::phase2_cuda);
  m.impl("phase2_backward", &attnres_cuda::phase2_backward_cuda);
  m.impl("phase2_norm", &attnres_cuda::phase2_norm_cuda);
  m.impl("phase2_norm_backward", &attnres_cuda::phase2_norm_backward_cuda);
  m.impl("phase2_norm_add", &attnres_cuda::phase2_norm_add_cuda);
  m.impl("phase2_norm_add_backward", &attnres_cuda::phase2_norm_add_backward_cuda);
  m.impl("depth_attn", &attnres_cuda::depth_attn_cuda);
  m.impl("depth_attn_backward", &attnres_cuda::depth_attn_backward_cuda);
}
