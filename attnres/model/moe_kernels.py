"""The eager MoE's memory-bound steps as Triton kernels, on CUDA: the gathers into and out of the expert
order, and the routed experts' SwiGLU.

Two reductions over the ``k`` rows a token's slots point at, each one pass over the rows at the copy
bandwidth (no ``[N, k, d]`` temporary), accumulated in fp32:

- :func:`gather_sum`: ``out[t] = sum_s weights[t, s] src[index[t, s]]`` (the combine's forward, ``k`` the
  router's top-k; its ``dy``, one row per bag, ``k = 1``; the dispatch's backward, no weights);
- :func:`row_dots`: ``out[t, s] = <vec[t], src[index[t, s]]>`` (the routing weights' gradient);

and the routed experts' activation on their joint gate-and-up output, :func:`packed_swiglu`:
``silu(gate) * up`` from ``[M, 2h]`` (gate | up) to ``[M, h]``, its backward writing ``[M, 2h]`` directly,
computed in fp32 (torch's eager ops on the two column views ran non-vectorised strided kernels, then
concatenated the two gradients: ~17 ms of `medium`'s eager step on an H100, session 22's profile, against
a traffic floor of ~6.5 ms).

Why not torch's own gathers: ``F.embedding_bag`` computes the first, but on an H100 its CUDA kernel ran
at ~19 % of the copy bandwidth (66 ms over `medium`'s 69 calls a step, session 22), and the kernel behind
its per-sample-weight gradient has no bf16; a gather plus a batched matmul runs the matmul as cuBLAS
gemv (~25 %). Under ``torch.compile`` Inductor generates the equivalent fused kernel from the plain code
(``attnres.model.moe``), so these are for eager mode only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["available", "capable", "gather_sum", "packed_swiglu", "row_dots"]


@functools.cache
def available() -> bool:
    """Whether triton imports (it comes with every CUDA build of torch on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def capable(device: torch.device) -> bool:
    """Whether ``device`` is a GPU these kernels are for: compute capability 8.0 or newer (Triton compiles
    bf16 only there; older GPUs keep torch's ops)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def _kernels():
    from attnres.model import moe_triton as k

    return k.moe_gather_sum_kernel, k.moe_row_dots_kernel, k.moe_swiglu_fwd_kernel, k.moe_swiglu_bwd_kernel


def _tiles(k: int, d: int) -> tuple[int, int]:
    """(K_PAD, BLOCK_D): the slots padded to a power of two (at least 2), and a column tile that keeps
    K_PAD x BLOCK_D at most 4096 values (16 KB of fp32 a program, 32 a thread with four warps)."""
    k_pad = max(2, 1 << (k - 1).bit_length())
    return k_pad, min(max(16, 1 << (d - 1).bit_length()), max(64, 4096 // k_pad))


def _check(src: Tensor, index: Tensor) -> None:
    if src.dim() != 2 or index.dim() != 2 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src must be [R, d] and index [N, k] integers, got {tuple(src.shape)} and "
                         f"{tuple(index.shape)} {index.dtype}")


def gather_sum(src: Tensor, index: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_s weights[t, s] src[index[t, s]]`` for ``src [R, d]``, ``index [N, k]`` (weights
    ``[N, k]``, rounded to ``src``'s dtype; None: 1) -> ``[N, d]`` in ``src``'s dtype, summed in fp32."""
    _check(src, index)
    src, index = _unit_stride(src), index.contiguous()
    (n, k), d = index.shape, src.shape[1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    if n == 0 or d == 0:
        return out
    k_pad, block = _tiles(k, d)
    w = weights.contiguous() if weights is not None else index  # a pointer HAS_W=False never reads
    with _on(src):
        _kernels()[0][(n, -(-d // block))](src, index, w, out, src.stride(0), out.stride(0), d=d, K=k,
                                          K_PAD=k_pad, BLOCK_D=block, HAS_W=weights is not None,
                                          num_warps=4)
    return out


def row_dots(src: Tensor, index: Tensor, vec: Tensor) -> Tensor:
    """``out[t, s] = <vec[t], src[index[t, s]]>`` for ``src [R, d]``, ``index [N, k]``, ``vec [N, d]`` (in
    ``src``'s dtype) -> ``[N, k]`` in ``src``'s dtype, summed in fp32."""
    _check(src, index)
    src, index, vec = _unit_stride(src), index.contiguous(), _unit_stride(vec)
    (n, k), d = index.shape, src.shape[1]
    out = torch.empty(n, k, dtype=src.dtype, device=src.device)
    if n == 0:
        return out
    k_pad, block = _tiles(k, d)
    with _on(src):
        _kernels()[1][(n,)](src, index, vec, out, src.stride(0), vec.stride(0), d=d, K=k, K_PAD=k_pad,
                            BLOCK_D=block, num_warps=4)
    return out


def _swiglu_tiles(h: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_H): whole rows (``h`` padded to a power of two), 2048 values a program."""
    block_h = max(16, 1 << (h - 1).bit_length())
    return max(1, 2048 // block_h), block_h


class _PackedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: Tensor) -> Tensor:
        gu = _unit_stride(gu)
        m, h = gu.shape[0], gu.shape[1] // 2
        out = torch.empty(m, h, dtype=gu.dtype, device=gu.device)
        ctx.save_for_backward(gu)
        if m:
            bm, bh = _swiglu_tiles(h)
            with _on(gu):
                _kernels()[2][(-(-m // bm),)](gu, out, m, gu.stride(0), out.stride(0), h=h, BLOCK_M=bm,
                                              BLOCK_H=bh, num_warps=4)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> Tensor:
        (gu,) = ctx.saved_tensors
        dout = _unit_stride(dout.to(gu.dtype))
        m, h = dout.shape
        dgu = torch.empty_like(gu, memory_format=torch.contiguous_format)
        if m:
            bm, bh = _swiglu_tiles(h)
            with _on(gu):
                _kernels()[3][(-(-m // bm),)](gu, dout, dgu, m, gu.stride(0), dout.stride(0), dgu.stride(0),
                                              h=h, BLOCK_M=bm, BLOCK_H=bh, num_warps=4)
        return dgu


def packed_swiglu(gu: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``gu = [gate | up]`` of shape ``[M, 2h]`` -> ``[M, h]`` in ``gu``'s dtype,
    computed in fp32; differentiable (the backward keeps ``gu`` only and writes its ``[M, 2h]`` gradient
    in one pass)."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"packed_swiglu: gu must be [M, 2h] (gate | up), got {tuple(gu.shape)}")
    return _PackedSwiGLU.apply(gu)


def _on(x: Tensor) -> contextlib.AbstractContextManager:
    """The launch on ``x``'s GPU (Triton launches on the current one); a CPU tensor under Triton's
    interpreter (``TRITON_INTERPRET=1``, the CPU tests) needs none."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
