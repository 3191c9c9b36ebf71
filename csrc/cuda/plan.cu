// Launch shapes and launches of the depth-attention kernels (plain pointers; see launch.h).
#include <algorithm>
#include <limits>

#include "select.cuh"

namespace attnres_cuda {

namespace {

int round_up(int x, int m) { return (x + m - 1) / m * m; }
int div_up(int x, int m) { return (x + m - 1) / m; }

int pad_queries(int S) {
  if (S <= 1) return 1;
  if (S <= 4) return 4;
  if (S <= 8) return 8;
  if (S <= 12) return 12;
  return 16;
}

// Smallest C in {1, 2, 4, 8} with at most max_threads threads per block; 0 when d is too large.
int chunks_per_thread(int chunks, int max_threads) {
  for (int C = 1; C <= 8; C *= 2)
    if (div_up(chunks, C) <= max_threads) return C;
  return 0;
}

int elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// The dynamic shared-memory limit is a property of the kernel function, which several plans share
// (with different sizes): it is raised again before every launch that needs more than 48 KB.
bool raise_smem_limit(const Plan& p) {
  return p.smem <= 48 * 1024 || cudaFuncSetAttribute(p.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(p.smem)) == cudaSuccess;
}

// Persistent grid: as many blocks as fit on the device at once, at most one per token.
void finish(Plan& p, int N, int num_sms) {
  p.grid = 0;
  if (p.fn == nullptr || p.C == 0) return;
  if (!raise_smem_limit(p)) {
    p.fn = nullptr;
    return;
  }
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, p.fn, p.NT, p.smem) != cudaSuccess || per_sm < 1) {
    p.fn = nullptr;
    return;
  }
  p.grid = std::max(1, std::min(N, per_sm * num_sms));
}

}  // namespace

Plan plan_p1_fwd(DType dt, int d, int S, int n, int N, int num_sms, bool vec) {
  Plan p{};
  p.W = 16 / elem_size(dt);
  p.ST = pad_queries(S);
  const int chunks = div_up(d, p.W);
  if (vec) {
    // staged: rows through shared memory, as many stages (<= 4) as fit
    int C = chunks_per_thread(chunks, 512);
    if (C == 8) C = 0;
    if (C > 0) {
      const int NT = std::max(32, round_up(div_up(chunks, C), 32));
      const int dp = NT * C * p.W;
      const bool qfull = p.ST * C * p.W <= 96 && C <= 2;
      const int QG = qfull ? p.ST : std::min(p.ST, 4);
      const int RS = (p.ST / QG) * pow2ceil(QG + 1);
      const size_t fixed = static_cast<size_t>((NT / 32) * n * RS + n * p.ST) * sizeof(float);
      const size_t stage = static_cast<size_t>(n) * dp * elem_size(dt);
      const size_t budget = NT <= 256 ? 110 * 1024 : 220 * 1024;
      const int K = budget > fixed ? static_cast<int>(std::min<size_t>(4, (budget - fixed) / stage)) : 0;
      if (K >= 1) {
        p.C = C;
        p.NT = NT;
        p.dp = dp;
        p.qreg = qfull;
        p.stages = K;
        p.smem = fixed + K * stage;
        switch (dt) {
          case DType::F32: p.fn = reinterpret_cast<const void*>(p1_fwd_staged_select_f32(p.ST, C, qfull)); break;
          case DType::BF16: p.fn = reinterpret_cast<const void*>(p1_fwd_staged_select_bf16(p.ST, C, qfull)); break;
          case DType::F16: p.fn = reinterpret_cast<const void*>(p1_fwd_staged_select_f16(p.ST, C, qfull)); break;
        }
        finish(p, N, num_sms);
        if (p.fn != nullptr) return p;
      }
    }
    p = Plan{};
    p.W = 16 / elem_size(dt);
    p.ST = pad_queries(S);
  }
  p.qreg = chunks <= 384 && p.ST * p.W <= 96;
  p.C = p.qreg ? 1 : chunks_per_thread(chunks, 512);
  if (p.C == 0) return p;
  p.NT = std::max(32, round_up(div_up(chunks, p.C), 32));
  p.dp = p.NT * p.C * p.W;
  const int nw = p.NT / 32, PP = pow2ceil(p.ST + 1);
  p.smem = static_cast<size_t>(nw * n * PP + n * p.ST) * sizeof(float);
  switch (dt) {
    case DType::F32: p.fn = reinterpret_cast<const void*>(p1_fwd_select_f32(p.ST, p.C, p.qreg)); break;
    case DType::BF16: p.fn = reinterpret_cast<const void*>(p1_fwd_select_bf16(p.ST, p.C, p.qreg)); break;
    case DType::F16: p.fn = reinterpret_cast<const void*>(p1_fwd_select_f16(p.ST, p.C, p.qreg)); break;
  }
  finish(p, N, num_sms);
  return p;
}

Plan plan_p1_bwd(DType dt, int d, int S, int n, int N, int num_sms, bool vec) {
  Plan p{};
  p.W = 4;
  p.ST = pad_queries(S);
  const int chunks = div_up(d, p.W);
  if (vec) {
    int C = chunks_per_thread(chunks, 512);
    if (C == 8) C = 0;
    if (C > 0) {
      const int NT = std::max(32, round_up(div_up(chunks, C), 32));
      const int dp = NT * C * p.W;
      const int RSB = pow2ceil(2 * p.ST) + 1;
      const size_t fixed =
          static_cast<size_t>((NT / 32) * n * RSB + 3 * n * p.ST + 2 * n + 2 * p.ST) * sizeof(float) + 16;
      const size_t stage = static_cast<size_t>(n + S) * dp * elem_size(dt);
      const size_t dq = static_cast<size_t>(p.ST) * dp * sizeof(float);
      const size_t budget = NT <= 256 ? 110 * 1024 : 220 * 1024;
      const int K = budget > fixed ? static_cast<int>(std::min<size_t>(3, (budget - fixed) / stage)) : 0;
      if (K >= 1) {
        p.C = C;
        p.NT = NT;
        p.dp = dp;
        p.stages = K;
        p.dq_smem = fixed + K * stage + dq <= budget;
        p.smem = fixed + K * stage + (p.dq_smem ? dq : 0);
        switch (dt) {
          case DType::F32: p.fn = reinterpret_cast<const void*>(p1_bwd_staged_select_f32(p.ST, C)); break;
          case DType::BF16: p.fn = reinterpret_cast<const void*>(p1_bwd_staged_select_bf16(p.ST, C)); break;
          case DType::F16: p.fn = reinterpret_cast<const void*>(p1_bwd_staged_select_f16(p.ST, C)); break;
        }
        finish(p, N, num_sms);
        if (p.fn != nullptr) return p;
      }
    }
    p = Plan{};
    p.W = 4;
    p.ST = pad_queries(S);
  }
  p.qreg = chunks <= 512 && p.ST <= 8;
  p.C = p.qreg ? 1 : chunks_per_thread(chunks, 512);
  if (p.C == 0) return p;
  p.NT = std::max(32, round_up(div_up(chunks, p.C), 32));
  p.dp = p.NT * p.C * p.W;
  const int nw = p.NT / 32, PP = pow2ceil(2 * p.ST + 1);
  const size_t base = round_up((nw * n * PP + 3 * n * p.ST + 2 * n + 2 * p.ST) * sizeof(float), 16);
  const size_t dq = static_cast<size_t>(p.ST) * p.dp * sizeof(float);
  p.dq_smem = base + dq <= 160 * 1024;
  p.smem = p.dq_smem ? base + dq : base;
  switch (dt) {
    case DType::F32: p.fn = reinterpret_cast<const void*>(p1_bwd_select_f32(p.ST, p.C, p.qreg)); break;
    case DType::BF16: p.fn = reinterpret_cast<const void*>(p1_bwd_select_bf16(p.ST, p.C, p.qreg)); break;
    case DType::F16: p.fn = reinterpret_cast<const void*>(p1_bwd_select_f16(p.ST, p.C, p.qreg)); break;
  }
  finish(p, N, num_sms);
  return p;
}

SplitPlan plan_p1_bwd_split(DType dt, int d, int S, int n, int num_sms) {
  SplitPlan sp{};
  const int ST = pad_queries(S);
  if (ST > 8) return sp;
  const int W = p1_split_chunk_bytes(ST) / elem_size(dt);  // p1_split_width of the kernels
  const int chunks = div_up(d, W);
  // coefficients: the block covers the row (C chunks per thread), tiles of TT tokens
  Plan& c = sp.coef;
  c.W = W;
  c.ST = ST;
  c.C = chunks_per_thread(chunks, 512);
  if (c.C == 0 || c.C == 8) return SplitPlan{};
  c.NT = std::max(32, round_up(div_up(chunks, c.C), 32));
  c.dp = c.NT * c.C * W;
  c.qreg = ST * c.C * W <= 32;
  const int nw = c.NT / 32, RSB = pow2ceil(2 * ST) + 1;
  auto smem_for = [&](int TT) {
    return static_cast<size_t>(nw * TT * n * RSB + 3 * TT * n * ST + TT * n + 2 * TT * ST) * sizeof(float);
  };
  int TT = 8;
  while (TT > 1 && smem_for(TT) > 96 * 1024) TT /= 2;
  if (smem_for(TT) > 200 * 1024) return SplitPlan{};
  sp.tile = TT;
  c.smem = smem_for(TT);
  switch (dt) {
    case DType::F32: c.fn = reinterpret_cast<const void*>(p1_bwd_coef_select_f32(ST, c.C, c.qreg)); break;
    case DType::BF16: c.fn = reinterpret_cast<const void*>(p1_bwd_coef_select_bf16(ST, c.C, c.qreg)); break;
    case DType::F16: c.fn = reinterpret_cast<const void*>(p1_bwd_coef_select_f16(ST, c.C, c.qreg)); break;
  }
  finish(c, std::numeric_limits<int>::max(), num_sms);
  // apply: 128 threads per column slice, as many token groups as fill the device
  Plan& a = sp.apply;
  a.W = W;
  a.ST = ST;
  a.C = 1;
  a.NT = 128;
  sp.slices = div_up(d, a.NT * W);
  a.dp = sp.slices * a.NT * W;
  switch (dt) {
    case DType::F32: a.fn = reinterpret_cast<const void*>(p1_bwd_apply_select_f32(ST)); break;
    case DType::BF16: a.fn = reinterpret_cast<const void*>(p1_bwd_apply_select_bf16(ST)); break;
    case DType::F16: a.fn = reinterpret_cast<const void*>(p1_bwd_apply_select_f16(ST)); break;
  }
  finish(a, std::numeric_limits<int>::max(), num_sms);
  if (c.fn == nullptr || a.fn == nullptr) return SplitPlan{};
  sp.groups = std::max(1, a.grid / sp.slices);
  sp.qwidth = std::max(c.dp, a.dp);
  sp.coef_stride = p1_coef_stride(ST);
  return sp;
}

int split_groups(const SplitPlan& sp, int N) { return std::max(1, std::min(sp.groups, N)); }

cudaError_t launch_p1_bwd_split(const SplitPlan& sp, const P1BwdArgs& args, cudaStream_t stream) {
  if (sp.coef.fn == nullptr || sp.apply.fn == nullptr) return cudaErrorInvalidConfiguration;
  if (!raise_smem_limit(sp.coef)) return cudaGetLastError();
  const int tiles = div_up(args.N, sp.tile);
  const int grid = std::max(1, std::min(sp.coef.grid, tiles));
  reinterpret_cast<P1BwdFn>(const_cast<void*>(sp.coef.fn))<<<grid, sp.coef.NT, sp.coef.smem, stream>>>(args);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 agrid(static_cast<unsigned>(sp.slices), static_cast<unsigned>(split_groups(sp, args.N)));
  reinterpret_cast<P1BwdFn>(const_cast<void*>(sp.apply.fn))<<<agrid, sp.apply.NT, 0, stream>>>(args);
  return cudaGetLastError();
}

Plan plan_p2(DType dt, int d, int N, int num_sms, bool backward, bool norm) {
  Plan p{};
  p.W = 16 / elem_size(dt);
  p.ST = 1;
  const int chunks = div_up(d, p.W);
  p.C = chunks_per_thread(chunks, 512);
  if (p.C == 0) return p;
  p.NT = std::max(32, round_up(div_up(chunks, p.C), 32));
  p.dp = p.NT * p.C * p.W;
  p.smem = 0;
  switch (dt) {
    case DType::F32: p.fn = p2_select<float, 4>(p.C, backward, norm); break;
    case DType::BF16: p.fn = p2_select<__nv_bfloat16, 8>(p.C, backward, norm); break;
    case DType::F16: p.fn = p2_select<__half, 8>(p.C, backward, norm); break;
  }
  finish(p, N, num_sms);
  return p;
}

namespace {
// One persistent-grid launch of the plan's kernel (Args: the kernel's by-value argument struct).
template <typename Args>
cudaError_t launch_plan(const Plan& p, const Args& args, cudaStream_t stream) {
  if (p.fn == nullptr || p.grid == 0) return cudaErrorInvalidConfiguration;
  if (!raise_smem_limit(p)) return cudaGetLastError();
  reinterpret_cast<void (*)(const Args)>(const_cast<void*>(p.fn))<<<p.grid, p.NT, p.smem, stream>>>(args);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_p1_fwd(DType, const Plan& p, const P1FwdArgs& args, cudaStream_t stream) {
  return launch_plan(p, args, stream);
}
cudaError_t launch_p1_bwd(DType, const Plan& p, const P1BwdArgs& args, cudaStream_t stream) {
  return launch_plan(p, args, stream);
}
cudaError_t launch_p2_fwd(DType, const Plan& p, const P2FwdArgs& args, cudaStream_t stream) {
  return launch_plan(p, args, stream);
}
cudaError_t launch_p2_bwd(DType, const Plan& p, const P2BwdArgs& args, cudaStream_t stream) {
  return launch_plan(p, args, stream);
}

namespace {
__global__ void sum_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int groups, int rows,
                                    int rows_alloc, int d, int dp) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(rows) * d) return;
  const int r = static_cast<int>(idx / d), c = static_cast<int>(idx % d);
  float s = 0.f;
  for (int g = 0; g < groups; ++g) s += part[(static_cast<int64_t>(g) * rows_alloc + r) * dp + c];
  out[idx] = s;
}
}  // namespace

cudaError_t launch_sum_partials(const float* part, float* out, int groups, int rows, int rows_alloc, int d, int dp,
                                cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(rows) * d;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  sum_partials_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(
      part, out, groups, rows, rows_alloc, d, dp);
  return cudaGetLastError();
}

}  // namespace attnres_cuda
