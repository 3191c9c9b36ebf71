// CUDA kernels of attnres::pack / attnres::unpack (schemas in ../ops.cpp). Pure ATen: pack is
// one batched concatenation kernel (at::cat of the flattened tensors) on the current stream, unpack
// one copy per tensor out of the received buffer. No hand-written kernel pays for itself here: both
// are bandwidth-bound copies that ATen already does at full bandwidth.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace attnres {
namespace {

at::Tensor pack_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "attnres::pack: needs at least one tensor");
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].is_cuda(), "attnres::pack: tensors[", i, "] is not on a CUDA device");
    TORCH_CHECK(tensors[i].scalar_type() == tensors[0].scalar_type(), "attnres::pack: tensors[", i,
                "] has dtype ", tensors[i].scalar_type(), " but tensors[0] has ", tensors[0].scalar_type());
    flat.push_back(tensors[i].reshape({-1}));
  }
  return at::cat(flat, 0);
}

std::vector<at::Tensor> unpack_cuda(const at::Tensor& buffer, c10::List<c10::List<c10::SymInt>> shapes) {
  TORCH_CHECK(buffer.is_cuda(), "attnres::unpack: buffer is not on a CUDA device");
  TORCH_CHECK(buffer.dim() == 1, "attnres::unpack: buffer must be 1-D, got ", buffer.dim(), " dims");
  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::vector<int64_t> shape;
    for (const c10::SymInt& s : c10::List<c10::SymInt>(shapes.get(i))) shape.push_back(s.expect_int());
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    TORCH_CHECK(offset + numel <= buffer.numel(), "attnres::unpack: the shapes hold more elements than the ",
                buffer.numel(), " of the buffer");
    outs.push_back(buffer.narrow(0, offset, numel).view(shape).clone(at::MemoryFormat::Contiguous));
    offset += numel;
  }
  TORCH_CHECK(offset == buffer.numel(), "attnres::unpack: the shapes hold ", offset,
              " elements but the buffer has ", buffer.numel());
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnres, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace attnres
