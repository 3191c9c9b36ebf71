// Plain-pointer interface between the torch binding (ops_cuda.cpp) and the CUDA kernels (*.cu).
// No torch headers here, so the kernels compile with nvcc alone.
//
// Layout (all row-major, contiguous): sources n x [N, d] (dtype T), queries padded to fp32
// [ST, dp] (rows >= S and columns >= d are zero; dp = NT * C * W covers every column a thread
// touches, so query loads need no bounds checks), lse [S, N] fp32.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace attnres_cuda {

constexpr int kMaxSources = 128;  // pointers passed by value in the kernel arguments
constexpr int kMaxQueries = 16;     // queries per forward launch; the binding splits larger S into groups
constexpr int kMaxQueriesBwd = 12;  // queries per phase-1 backward launch

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Launch shape chosen by the host for a given (dtype, d, S): threads per block, chunks of W
// elements per thread, padded query count and width.
struct Plan {
  int W;      // elements per chunk (16-byte vectors in the forward, 8/16-byte in the backward)
  int C;      // chunks per thread
  int NT;     // threads per block
  int ST;     // padded number of queries (1, 4, 8, 12 or 16)
  int dp;     // padded row width of the fp32 query buffer = NT * C * W
  bool qreg;     // queries held in registers (else re-read from L1)
  bool dq_smem;  // phase-1 backward: per-block query gradient in shared memory (else a global slab)
  int grid;      // persistent blocks
  size_t smem;   // dynamic shared memory per block
  const void* fn;  // the kernel instantiation
  int stages;      // > 0: the staged (cp.async) kernel with this many shared-memory stages
};

struct P1FwdArgs {
  const void* src[kMaxSources];
  void* out[kMaxQueries];
  float* lse;      // [S, N] (row stride lse_stride)
  const float* q;  // [ST, dp]
  int64_t lse_stride;
  int n, S, N, d;
  float eps;
  bool vec;    // 16-byte aligned rows (d % W == 0 and aligned base pointers)
  int stages;  // staged kernel: shared-memory ring depth
};

struct P1BwdArgs {
  const void* src[kMaxSources];
  void* dsrc[kMaxSources];
  const void* dout[kMaxQueries];
  const float* dlse;  // [S, N] (row stride lse_stride)
  const float* lse;   // [S, N]
  const float* q;     // [ST, dp]
  float* dq_part;     // [grid, ST, dp] per-block partial sums of the query gradient
  int64_t lse_stride;
  int n, S, N, d;
  float eps;
  bool vec;
  bool dq_in_smem;
  int stages;  // staged kernel: shared-memory ring depth
  // split kernels (p1_bwd_split.cuh): coefficient buffer [N, n, p1_coef_stride(ST)], tokens per
  // tile of the coefficient kernel, row stride of the padded query buffer
  float* coef;
  int tile;
  int qld;
};

struct P2FwdArgs {
  const void* o;    // [N, d] phase-1 output
  const float* m;   // [N] phase-1 lse
  const void* p;    // [N, d] partial summary
  const float* q;   // [d] fp32, unpadded
  void* h;          // [N, d]: h, or y = rmsnorm(h) * g with the norm fused (g not null)
  float* lse;       // [N]
  const float* g;   // [d] fp32 norm weight (phase2_norm), else null
  // phase2_norm_add (the norm fused): p is the previous partial summary and v the sublayer output that
  // completes it; p + v, rounded to the dtype, is written to p_out and merged. Both null otherwise.
  const void* v;
  void* p_out;
  int N, d;
  float eps, norm_eps;
  bool vec;
  bool qvec;  // q (and g) 16-byte aligned and d % 4 == 0
};

struct P2BwdArgs {
  const void* dh;    // [N, d] (the norm fused: grad of y)
  const float* dlse; // [N]
  const void* h;     // [N, d] forward output h (the norm fused: the phase-1 output o)
  const float* m;    // [N]
  const float* lse;  // [N]
  const void* p;     // [N, d]
  const float* q;    // [d] fp32, unpadded
  void* do_;         // [N, d] grad of the phase-1 output
  float* dm;         // [N]
  void* dp_;         // [N, d] grad of the partial summary
  float* dq_part;    // [grid, dp] (the norm fused: [grid, 2, dp], dq then dg)
  const float* g;    // [d] fp32 norm weight (phase2_norm_backward), else null
  // phase2_norm_add_backward: the gradient of the partial summary from its later uses, added to dp_
  // (after dp_ is rounded to the dtype, as autograd adds the two), else null
  const void* dp_in;
  int N, d;
  float eps, norm_eps;
  bool vec;
  bool qvec;
};

// Phase-1 backward as two kernels (coefficients, then dv and dq): aligned rows, at most 8 queries.
// No kernel (coef.fn or apply.fn null) when the shape does not fit them.
struct SplitPlan {
  Plan coef;    // grid: resident blocks (the launch caps it at the number of token tiles)
  Plan apply;   // NT threads per block; dp = slices * NT * W columns
  int tile;     // tokens per tile of the coefficient kernel
  int slices;   // column slices of the apply kernel (its grid.x)
  int groups;   // token groups of the apply kernel (its grid.y; capped at N by the launch)
  int qwidth;   // columns of the padded query buffer: max(coef.dp, apply.dp)
  int coef_stride;  // floats per (token, source) in the coefficient buffer
};

// Each plan_* fills the launch shape; each launch_* returns cudaGetLastError() after the launch.
Plan plan_p1_fwd(DType dt, int d, int S, int n, int N, int num_sms, bool vec);
Plan plan_p1_bwd(DType dt, int d, int S, int n, int N, int num_sms, bool vec);
// norm: the kernels of phase2_norm / phase2_norm_backward (the sublayer's RMSNorm fused in).
Plan plan_p2(DType dt, int d, int N, int num_sms, bool backward, bool norm);
SplitPlan plan_p1_bwd_split(DType dt, int d, int S, int n, int num_sms);

cudaError_t launch_p1_fwd(DType dt, const Plan& plan, const P1FwdArgs& args, cudaStream_t stream);
cudaError_t launch_p1_bwd(DType dt, const Plan& plan, const P1BwdArgs& args, cudaStream_t stream);
// args.coef must hold N * n * coef_stride floats, args.dq_part groups(N) * ST * apply.dp floats.
cudaError_t launch_p1_bwd_split(const SplitPlan& plan, const P1BwdArgs& args, cudaStream_t stream);
int split_groups(const SplitPlan& plan, int N);
cudaError_t launch_p2_fwd(DType dt, const Plan& plan, const P2FwdArgs& args, cudaStream_t stream);
cudaError_t launch_p2_bwd(DType dt, const Plan& plan, const P2BwdArgs& args, cudaStream_t stream);
// out[r, c] = sum_g part[g, r, c] for r < rows, c < d, part being [groups, rows_alloc, dp]; a fixed
// summation order, so the result is deterministic.
cudaError_t launch_sum_partials(const float* part, float* out, int groups, int rows, int rows_alloc, int d, int dp,
                                cudaStream_t stream);

}  // namespace attnres_cuda
