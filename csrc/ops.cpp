// The op schemas of attnres, declared once. Each backend registers its kernels in its own file
// (cpu/*.cpp: TORCH_LIBRARY_IMPL(attnres, CPU, m); cuda/*.cu and cuda/*.cpp: TORCH_LIBRARY_IMPL(attnres,
// CUDA, m)). attnres/ops.py holds the typed Python wrappers and the fake (meta) kernels; csrc/autograd.cpp
// the autograd; attnres/reference.py is the ground truth every depth kernel is tested against.
//
// Notation (SPEC §1-2): a source v is a row of d values of one token; rms(v) = sqrt(mean(v^2) + eps);
// a query q is the product w * g of a sublayer's pseudo-query and its RMSNorm weight, so the logit
// of source v is z = q . v / rms(v). Sources are [N, d] (N = tokens), queries [S, d] (or [d]).
// Outputs are in the sources' dtype, log-sum-exps are fp32; all arithmetic accumulates in fp32.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing attnres._C runs the static TORCH_LIBRARY initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(attnres, m) {
  // Phase 1: S queries over n sources -> S normalised outputs [N, d] and lse [S, N] (fp32).
  // The outputs are S separate tensors, not one [S, N, d] buffer: the first becomes a sublayer's
  // input (kept for its backward) while the others die after phase 2; one buffer would keep all alive.
  m.def("phase1(Tensor[] sources, Tensor queries, float eps) -> (Tensor[], Tensor)");
  // grad_outs S x [N, d], grad_lse [S, N] -> (grad of each source [N, d], grad_queries [S, d] fp32).
  m.def(
      "phase1_backward(Tensor[] grad_outs, Tensor grad_lse, Tensor[] sources, Tensor queries, Tensor lse, "
      "float eps) -> (Tensor[], Tensor)");
  // Phase 2: merge a phase-1 result (out [N, d], lse [N]) with the partial summary p [N, d] under
  // query q [d] by one online-softmax step -> (h [N, d], lse of all n+1 sources [N]).
  m.def("phase2(Tensor partial_out, Tensor partial_lse, Tensor partial, Tensor query, float eps) -> (Tensor, Tensor)");
  // Needs h (the forward output, which the sublayer keeps anyway) instead of partial_out:
  // a_o * o = h - a_p * p, so the phase-1 output need not be kept for backward.
  // -> (grad_partial_out, grad_partial_lse, grad_partial, grad_query [d] fp32).
  m.def(
      "phase2_backward(Tensor grad_out, Tensor grad_lse, Tensor out, Tensor partial_lse, Tensor lse, "
      "Tensor partial, Tensor query, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Phase 2 with the next sublayer's input RMSNorm fused in: h as phase2 computes it (rounded to the
  // partial's dtype), then y = h / sqrt(mean(h^2) + norm_eps) * weight in fp32 -> (y [N, d], lse [N]);
  // h is never written. CUDA only (attnres/ops.py composes phase2 and the norm elsewhere).
  m.def(
      "phase2_norm(Tensor partial_out, Tensor partial_lse, Tensor partial, Tensor query, Tensor weight, "
      "float eps, float norm_eps) -> (Tensor, Tensor)");
  // Recomputes h from partial_out (saved instead of h) -> (grad_partial_out, grad_partial_lse,
  // grad_partial, grad_query [d] fp32, grad_weight [d] fp32).
  m.def(
      "phase2_norm_backward(Tensor grad_y, Tensor grad_lse, Tensor partial_out, Tensor partial_lse, Tensor lse, "
      "Tensor partial, Tensor query, Tensor weight, float eps, float norm_eps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // phase2_norm with the partial summary's last addition fused in: partial = prev + addend (same shape and
  // dtype; rounded as torch's add rounds it), then phase2_norm over it -> (y [N, d], lse [N], partial [N, d]).
  // CUDA only (attnres/ops.py composes the add and phase2_norm elsewhere).
  m.def(
      "phase2_norm_add(Tensor partial_out, Tensor partial_lse, Tensor prev, Tensor addend, Tensor query, "
      "Tensor weight, float eps, float norm_eps) -> (Tensor, Tensor, Tensor)");
  // phase2_norm_backward with grad_partial (the gradient of the returned partial from its later uses,
  // None: zero) added to the partial's gradient (after rounding it to the dtype, as autograd adds them),
  // which is then that of prev and of addend -> (grad_partial_out, grad_partial_lse, grad_prev,
  // grad_query [d] fp32, grad_weight [d] fp32).
  m.def(
      "phase2_norm_add_backward(Tensor grad_y, Tensor grad_lse, Tensor? grad_partial, Tensor partial_out, "
      "Tensor partial_lse, Tensor lse, Tensor partial, Tensor query, Tensor weight, float eps, float norm_eps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Direct softmax over depth for one query [d]: sources n x [N, d] -> (out [N, d], lse [N]).
  m.def("depth_attn(Tensor[] sources, Tensor query, float eps) -> (Tensor, Tensor)");
  m.def(
      "depth_attn_backward(Tensor grad_out, Tensor grad_lse, Tensor[] sources, Tensor query, Tensor lse, "
      "float eps) -> (Tensor[], Tensor)");

  // Pipeline-stage messages (kernels: cpu/pack_cpu.cpp, cuda/pack_cuda.cpp): several residual sources
  // into one contiguous send buffer, so a stage boundary is one point-to-point message instead of one
  // per source, and back. Each is the other's backward.
  // tensors: k tensors of one dtype and device, any shapes -> one 1-D buffer of sum(numel) elements,
  // the tensors' elements in order (each flattened in row-major order).
  m.def("pack(Tensor[] tensors) -> Tensor");
  // buffer: 1-D with exactly sum(prod(shape)) elements -> k new tensors of the given shapes (copies,
  // not views of the buffer: the receiver keeps them in its cache while the buffer is reused).
  m.def("unpack(Tensor buffer, SymInt[][] shapes) -> Tensor[]");
}
