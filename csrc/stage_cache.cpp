// Cross-stage caching primitives (SPEC §3): pack several block summaries into one contiguous send
// buffer, so a pipeline-stage boundary is one point-to-point message instead of one per summary, and
// unpack a received buffer back into tensors. Declared here as a fragment of the attnres library;
// kernels: stage_cache_cpu.cpp (CPU), cuda/stage_cache.cpp (CUDA). attnres/stage_cache.py holds the
// typed Python wrappers, the fake kernels and the autograd formulas (pack and unpack are each
// other's backward), and the StageCache that decides which summaries cross a boundary.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnres, m) {
  // tensors: k tensors of one dtype and device, any shapes -> one 1-D buffer of sum(numel) elements,
  // the tensors' elements in order (each flattened in row-major order).
  m.def("pack(Tensor[] tensors) -> Tensor");
  // buffer: 1-D with exactly sum(prod(shape)) elements -> k new tensors of the given shapes (copies,
  // not views of the buffer: the receiver keeps them in its cache while the buffer is reused).
  m.def("unpack(Tensor buffer, SymInt[][] shapes) -> Tensor[]");
}
