"""fla's chunked KDA and its short convolution as ``torch.library`` custom ops: opaque to ``torch.compile``.

fla 0.6 marks its ``chunk_kda`` ``@torch.compiler.disable``, so under ``torch.compile`` every KDA layer is
a graph break. Dynamo then runs the decoder's layer loop eagerly and compiles only the pieces between
breaks (``benchmarks/compile_breaks.py`` reproduces it on a CPU; on an H100 the compiled study model ran
mostly eager and compiled Block AttnRes hit the recompile limit, ``benchmarks/e2e_notes.md`` session 10).
As custom ops with fake kernels the kernels stay fla's Triton kernels, and everything around them (the
projections, gates, norms, the residual path, the MoE) compiles into one graph.

The pair mirrors fla's own autograd function in its default mode (``disable_recompute=False``): the
forward keeps the chunk-local cumulative gate and the two intra-chunk matrices ``Aqk``, ``Akk``; the
backward (fla's ``chunk_kda_bwd``) recomputes ``w``, ``u`` and the chunk states from them. Training only:
no initial or final state (decoding keeps fla's functions, where a graph break does not matter).

:func:`short_conv` is fla's Triton ``causal_conv1d`` with the SiLU (what the eager fused path calls) as a
pair of ops: it reads a strided ``x`` (the KDA layer's q, k, v are column views of one projection) in
place, and its backward (one kernel for ``dx`` and the weight's gradient, after a recompute of the
convolution) replaces the shifted products, masks and reductions Inductor makes of ``ShortConv``'s plain
code: 17 ms against ~33 ms (with the q/k L2 norms) for `medium`'s 18 KDA layers at 8 x 4096 tokens on an
H100 (session 21's profiles, eager and compiled).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["chunk_kda", "short_conv"]

CHUNK = 64  # fla's KDA chunk size (its intra-chunk kernels take 32 or 64; chunk_kda uses 64)


def _chunk_indices(cu_seqlens: Tensor | None, cu_seqlens_cpu: Tensor | None) -> Tensor | None:
    if cu_seqlens is None:
        return None
    from fla.ops.utils.index import prepare_chunk_indices

    return prepare_chunk_indices(cu_seqlens, CHUNK, cu_seqlens_cpu=cu_seqlens_cpu)


def _fla_forward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    cu_seqlens: Tensor | None, cu_seqlens_cpu: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fla.ops.kda.chunk_fwd import chunk_kda_fwd

    with torch.cuda.device(q.device):
        o, _, g_cumsum, Aqk, Akk, *_ = chunk_kda_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False,
            cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
            chunk_indices=_chunk_indices(cu_seqlens, cu_seqlens_cpu), chunk_size=CHUNK,
        )
    return o.to(q.dtype), g_cumsum, Aqk, Akk


def _fla_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g_cumsum: Tensor, Aqk: Tensor, Akk: Tensor,
    scale: float, cu_seqlens: Tensor | None, cu_seqlens_cpu: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fla.ops.kda.chunk_bwd import chunk_kda_bwd

    with torch.cuda.device(q.device):
        dq, dk, dv, db, dg, *_ = chunk_kda_bwd(
            q=q, k=k, v=v, beta=beta, Aqk=Aqk, Akk=Akk, scale=scale, initial_state=None, do=do, dht=None,
            g=g_cumsum, cu_seqlens=cu_seqlens, chunk_indices=_chunk_indices(cu_seqlens, cu_seqlens_cpu),
            chunk_size=CHUNK,
        )
    return dq, dk, dv, dg, db


def _fla_conv_forward(x: Tensor, weight: Tensor) -> Tensor:
    from fla.modules.causal_conv1d.ops import causal_conv1d_fwd

    with torch.cuda.device(x.device):
        y, _ = causal_conv1d_fwd(x=x, weight=weight, bias=None, residual=None, activation="silu")
    return y


def _fla_conv_backward(dy: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    from fla.modules.causal_conv1d.ops import causal_conv1d_bwd

    with torch.cuda.device(x.device):
        dx, dw, *_ = causal_conv1d_bwd(x=x, dy=dy, dht=None, weight=weight, bias=None, residual=None,
                                       initial_state=None, activation="silu")
    return dx, dw


# The implementations the ops call, looked up at call time: a CPU test swaps in a PyTorch reference to
# check the registration, the fake kernels and the autograd wiring without a GPU.
IMPL: dict[str, Any] = {"forward": _fla_forward, "backward": _fla_backward,
                        "conv_forward": _fla_conv_forward, "conv_backward": _fla_conv_backward}


@torch.library.custom_op("attnres::fla_chunk_kda_fwd", mutates_args=())
def _forward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    cu_seqlens: Tensor | None, cu_seqlens_cpu: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    return tuple(t.contiguous() for t in IMPL["forward"](q, k, v, g, beta, scale, cu_seqlens, cu_seqlens_cpu))


@_forward.register_fake
def _(q, k, v, g, beta, scale, cu_seqlens, cu_seqlens_cpu):
    B, T, H, _ = v.shape
    o = v.new_empty(v.shape, dtype=q.dtype)
    g_cumsum = g.new_empty(g.shape, dtype=torch.float32)  # fla's chunk-local cumsum is fp32
    Aqk = k.new_empty(B, T, H, CHUNK)
    return o, g_cumsum, Aqk, k.new_empty(B, T, H, CHUNK)


@torch.library.custom_op("attnres::fla_chunk_kda_bwd", mutates_args=())
def _backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g_cumsum: Tensor, Aqk: Tensor, Akk: Tensor,
    scale: float, cu_seqlens: Tensor | None, cu_seqlens_cpu: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v, beta, g_cumsum, Aqk, Akk = (t.contiguous() for t in (q, k, v, beta, g_cumsum, Aqk, Akk))
    dq, dk, dv, dg, db = IMPL["backward"](
        do.contiguous(), q, k, v, beta, g_cumsum, Aqk, Akk, scale, cu_seqlens, cu_seqlens_cpu)
    # in the inputs' dtypes (fla's function does the same; g is fp32, beta in q's dtype), contiguous as the
    # fake kernel says (fla's are: no copy)
    grads = zip((dq, dk, dv, dg, db), (q, k, v, g_cumsum, beta))
    return tuple(t.to(ref.dtype).contiguous() for t, ref in grads)


@_backward.register_fake
def _(do, q, k, v, beta, g_cumsum, Aqk, Akk, scale, cu_seqlens, cu_seqlens_cpu):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, g_cumsum, beta))


def _kda_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, g, beta, scale, cu_seqlens, cu_seqlens_cpu = inputs
    _, g_cumsum, Aqk, Akk = output
    ctx.save_for_backward(q, k, v, beta, g_cumsum, Aqk, Akk, cu_seqlens, cu_seqlens_cpu)
    ctx.scale = scale


def _kda_backward(ctx: Any, do: Tensor, *_unused: Tensor) -> tuple:
    # the gradients of g_cumsum, Aqk and Akk (saved for this backward, never used otherwise) are ignored
    q, k, v, beta, g_cumsum, Aqk, Akk, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
    dq, dk, dv, dg, db = torch.ops.attnres.fla_chunk_kda_bwd(
        do, q, k, v, beta, g_cumsum, Aqk, Akk, ctx.scale, cu_seqlens, cu_seqlens_cpu)
    return dq, dk, dv, dg, db, None, None, None


# The backward registered on the forward op (torch.library.register_autograd), not an autograd.Function
# around the two ops: Dynamo traces the op as one node, where a Function becomes a higher-order op with its
# forward and backward as subgraphs, which torch 2.11's nested compile regions (Decoder.compile_nested)
# fail on when a region is called again (KeyError: 'example_value' in are_same_graph_modules; H100,
# session 25).
_forward.register_autograd(_kda_backward, setup_context=_kda_setup_context)


def chunk_kda(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    cu_seqlens: Tensor | None = None, cu_seqlens_cpu: Tensor | None = None,
) -> Tensor:
    """fla's chunked KDA, traced by ``torch.compile`` as one opaque op: q, k ``[B, T, H, K]``,
    v ``[B, T, H, V]`` (one dtype), g ``[B, T, H, K]`` fp32 log decay, beta ``[B, T, H]`` in q's dtype;
    ``cu_seqlens`` (and its CPU copy, to avoid a host sync) for packed documents with ``B = 1``.
    Returns o ``[B, T, H, V]``."""
    # fla's kernels index contiguous memory; v comes from the short conv as a transposed view, and the
    # saved copies must be the contiguous ones too (backward reads them)
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    return torch.ops.attnres.fla_chunk_kda_fwd(q, k, v, g, beta, scale, cu_seqlens, cu_seqlens_cpu)[0]


@torch.library.custom_op("attnres::fla_short_conv_fwd", mutates_args=())
def _conv_forward(x: Tensor, weight: Tensor) -> Tensor:
    return IMPL["conv_forward"](x, weight).contiguous()


@_conv_forward.register_fake
def _(x, weight):
    return x.new_empty(x.shape)


@torch.library.custom_op("attnres::fla_short_conv_bwd", mutates_args=())
def _conv_backward(dy: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw = IMPL["conv_backward"](dy, x, weight)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype).contiguous()


@_conv_backward.register_fake
def _(dy, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _conv_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)  # x as it came (a strided view is kept, not copied)


def _conv_backward_formula(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor]:
    x, weight = ctx.saved_tensors
    return torch.ops.attnres.fla_short_conv_bwd(dy, x, weight)


_conv_forward.register_autograd(_conv_backward_formula, setup_context=_conv_setup_context)


def short_conv(x: Tensor, weight: Tensor) -> Tensor:
    """``silu(causal depthwise conv(x))`` through fla's Triton ``causal_conv1d``, traced by ``torch.compile``
    as one opaque op each way: ``x [B, T, C]`` (any row stride, last dim contiguous), ``weight [C, W]``
    (:class:`attnres.model.kda.ShortConv`'s convention: tap ``W - 1`` multiplies ``x_t``; zeros before the
    start, no state). Returns ``[B, T, C]`` contiguous, in ``x``'s dtype."""
    return torch.ops.attnres.fla_short_conv_fwd(x, weight)
