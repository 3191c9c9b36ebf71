"""The Triton kernels behind :mod:`attnres.model.moe_kernels` (imported by it on first use: importing this
module imports triton). One program per token (gathers) or per tile of rows (SwiGLU); fp32 arithmetic."""

import triton
import triton.language as tl


@triton.jit
def moe_gather_sum_kernel(src, index, weights, out, src_stride, out_stride, d: tl.constexpr,
                          K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slots = tl.arange(0, K_PAD)
    live = slots < K
    rows = tl.load(index + t * K + slots, mask=live, other=0).to(tl.int64)
    x = tl.load(src + rows[:, None] * src_stride + cols[None, :],
                mask=live[:, None] & (cols[None, :] < d), other=0.0).to(tl.float32)
    if HAS_W:  # the weights rounded to the rows' dtype, as a product in that dtype would take them
        w = tl.load(weights + t * K + slots, mask=live, other=0.0).to(src.dtype.element_ty)
        x = x * w.to(tl.float32)[:, None]
    tl.store(out + t * out_stride + cols, tl.sum(x, axis=0).to(out.dtype.element_ty), mask=cols < d)


@triton.jit
def moe_row_dots_kernel(src, index, vec, out, src_stride, vec_stride, d: tl.constexpr, K: tl.constexpr,
                        K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    live = slots < K
    rows = tl.load(index + t * K + slots, mask=live, other=0).to(tl.int64)
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(vec + t * vec_stride + cols, mask=cols < d, other=0.0).to(tl.float32)
        x = tl.load(src + rows[:, None] * src_stride + cols[None, :],
                    mask=live[:, None] & (cols[None, :] < d), other=0.0).to(tl.float32)
        acc += tl.sum(x * v[None, :], axis=1)
    tl.store(out + t * K + slots, acc.to(out.dtype.element_ty), mask=live)


@triton.jit
def swiglu_tile(gu, M, gu_stride, h: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """A program's rows and columns, their mask, and its gate and up values in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    m = (rows < M)[:, None] & (cols < h)[None, :]
    at = gu + rows[:, None] * gu_stride + cols[None, :]
    g = tl.load(at, mask=m, other=0.0).to(tl.float32)
    u = tl.load(at + h, mask=m, other=0.0).to(tl.float32)
    return rows, cols, m, g, u


@triton.jit
def moe_swiglu_fwd_kernel(gu, out, M, gu_stride, out_stride, h: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    rows, cols, m, g, u = swiglu_tile(gu, M, gu_stride, h, BLOCK_M, BLOCK_H)
    y = g * tl.sigmoid(g) * u
    tl.store(out + rows[:, None] * out_stride + cols[None, :], y.to(out.dtype.element_ty), mask=m)


@triton.jit
def moe_swiglu_bwd_kernel(gu, dout, dgu, M, gu_stride, dout_stride, dgu_stride, h: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, m, g, u = swiglu_tile(gu, M, gu_stride, h, BLOCK_M, BLOCK_H)
    dy = tl.load(dout + rows[:, None] * dout_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    dg = dy * u * sg * (1.0 + g * (1.0 - sg))  # d silu(g) / dg = s (1 + g (1 - s))
    du = dy * g * sg
    to = dgu + rows[:, None] * dgu_stride + cols[None, :]
    tl.store(to, dg.to(dgu.dtype.element_ty), mask=m)
    tl.store(to + h, du.to(dgu.dtype.element_ty), mask=m)
