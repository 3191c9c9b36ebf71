// CPU kernels of attnres::pack / attnres::unpack (schemas in ../ops.cpp): plain memcpy of
// contiguous byte ranges, split over threads by bytes so one large summary is copied in parallel too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace attnres {
namespace {

constexpr int64_t kGrainBytes = 1 << 16;

// Copy the byte ranges src[i] -> dst[i] (lengths len[i]) with every thread taking a contiguous slice
// of the concatenated range [0, total).
void parallel_copy(const std::vector<const char*>& src, const std::vector<char*>& dst,
                   const std::vector<int64_t>& len) {
  std::vector<int64_t> start(len.size() + 1, 0);
  for (size_t i = 0; i < len.size(); ++i) start[i + 1] = start[i] + len[i];
  const int64_t total = start.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrainBytes, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t pos = begin; pos < end && i < len.size(); ++i) {
      const int64_t lo = pos - start[i];
      const int64_t hi = std::min(end, start[i + 1]) - start[i];
      if (hi > lo) std::memcpy(dst[i] + lo, src[i] + lo, hi - lo);
      pos = start[i + 1];
    }
  });
}

at::Tensor pack_cpu(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "attnres::pack: needs at least one tensor");
  const auto dtype = tensors[0].scalar_type();
  int64_t numel = 0;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "attnres::pack: tensors[", i, "] is not on the CPU");
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "attnres::pack: tensors[", i, "] has dtype ",
                tensors[i].scalar_type(), " but tensors[0] has ", dtype);
    contiguous.push_back(tensors[i].contiguous());
    numel += tensors[i].numel();
  }
  at::Tensor buffer = at::empty({numel}, tensors[0].options());
  const int64_t item = buffer.element_size();
  std::vector<const char*> src;
  std::vector<char*> dst;
  std::vector<int64_t> len;
  char* out = static_cast<char*>(buffer.data_ptr());
  for (const auto& t : contiguous) {
    src.push_back(static_cast<const char*>(t.const_data_ptr()));
    dst.push_back(out);
    len.push_back(t.numel() * item);
    out += t.numel() * item;
  }
  parallel_copy(src, dst, len);
  return buffer;
}

std::vector<at::Tensor> unpack_cpu(const at::Tensor& buffer, c10::List<c10::List<c10::SymInt>> shapes) {
  TORCH_CHECK(buffer.device().is_cpu(), "attnres::unpack: buffer is not on the CPU");
  TORCH_CHECK(buffer.dim() == 1, "attnres::unpack: buffer must be 1-D, got ", buffer.dim(), " dims");
  const at::Tensor flat = buffer.contiguous();
  const int64_t item = flat.element_size();
  std::vector<at::Tensor> outs;
  std::vector<const char*> src;
  std::vector<char*> dst;
  std::vector<int64_t> len;
  const char* in = static_cast<const char*>(flat.const_data_ptr());
  int64_t offset = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::vector<int64_t> shape;
    for (const c10::SymInt& s : c10::List<c10::SymInt>(shapes.get(i))) shape.push_back(s.expect_int());
    at::Tensor out = at::empty(shape, flat.options());
    src.push_back(in + offset * item);
    dst.push_back(static_cast<char*>(out.data_ptr()));
    len.push_back(out.numel() * item);
    offset += out.numel();
    outs.push_back(std::move(out));
  }
  TORCH_CHECK(offset == flat.numel(), "attnres::unpack: the shapes hold ", offset,
              " elements but the buffer has ", flat.numel());
  parallel_copy(src, dst, len);
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnres, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace attnres
