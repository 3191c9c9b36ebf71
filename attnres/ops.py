"""Typed wrappers of the ops in ``attnres._C``: the depth-attention ops, and ``pack`` / ``unpack`` (the
one-message send buffer of a pipeline-stage boundary).

The schemas live in ``csrc/ops.cpp``; this module checks shapes, dtypes and devices with clear
messages, registers the fake (meta) kernels for ``torch.compile`` (the depth ops' autograd formulas
are C++: ``csrc/autograd.cpp``; pack/unpack's are registered here, :func:`_register_pack` says why),
and routes a call to the compiled kernel of the tensors' device. Where there is none (the extension
was not built, or a device without kernels) the call runs :mod:`attnres.reference` instead, which is
the same math in plain PyTorch; a missing extension is reported by one warning at import, and one
built for another torch is an ImportError (:mod:`attnres._extension`).

Sources are n tensors ``[..., d]`` (``[B, T, d]`` or ``[N, d]``), read where they are: no copy is
made of the list (only non-contiguous sources are made contiguous by the kernels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnres import reference
from attnres._extension import load as load_extension

__all__ = [
    "backend",
    "depth_attention",
    "extension_error",
    "fused_add",
    "fused_norm",
    "pack",
    "phase1",
    "phase2",
    "phase2_norm",
    "phase2_norm_add",
    "rms_norm",
    "unpack",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEFAULT_EPS = 1e-6

# None when attnres._C is loaded; "not built" (the reference fallback) when no extension was built.
# An extension built for another torch raises ImportError here (attnres._extension says why).
extension_error: str | None = load_extension()

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _has_kernels(op: str) -> dict[str, bool]:
    """Per device type, whether ``attnres._C`` has kernels of the op ``op`` there."""
    return {
        dev: extension_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"attnres::{op}", key)
        for dev, key in _DISPATCH_KEY.items()
    }


# Looked up once: the kernels register when attnres._C is imported (above). A plain dict also keeps
# backend() traceable by torch.compile (fullgraph), which cannot trace the dispatcher query itself.
_HAS_KERNELS = _has_kernels("phase1")
# phase2_norm and phase2_norm_add have CUDA kernels only (elsewhere they compose phase 2, the norm and
# the add)
_HAS_NORM_KERNELS = _has_kernels("phase2_norm")
_HAS_ADD_KERNELS = _has_kernels("phase2_norm_add")


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def backend(device: torch.device | str) -> str:
    """``"compiled"`` when ``attnres._C`` has kernels for this device type, else ``"reference"``."""
    return "compiled" if _HAS_KERNELS.get(_device_type(device), False) else "reference"


# ----------------------------------------------------------------------------- argument checks


def _check_source(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., d], got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(
            f"{name} must have shape [N, d] or [B, T, d] (at least 2 dims), got {tuple(t.shape)}"
        )
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float32, bfloat16, float16, float64")
    return t


def _check_sources(sources: Sequence[Tensor], name: str = "sources") -> list[Tensor]:
    if isinstance(sources, Tensor) or not isinstance(sources, Sequence):
        raise TypeError(
            f"{name} must be a list of tensors [..., d] (one per source), got {type(sources).__name__}"
        )
    sources = list(sources)
    if not sources:
        raise ValueError(f"{name} is empty: depth attention needs at least one source [..., d]")
    first = _check_source(sources[0], f"{name}[0]")
    for i, s in enumerate(sources[1:], start=1):
        _check_source(s, f"{name}[{i}]")
        if s.shape != first.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(s.shape)} but {name}[0] has {tuple(first.shape)}: "
                "all sources must match"
            )
        if s.dtype != first.dtype:
            raise TypeError(
                f"{name}[{i}] has dtype {s.dtype} but {name}[0] has {first.dtype}: all sources must match"
            )
        if s.device != first.device:
            raise ValueError(
                f"{name}[{i}] is on {s.device} but {name}[0] is on {first.device}: all sources must match"
            )
    return sources


def _check_like(
    t: object, name: str, like: Tensor, shape: tuple[int, ...], what: str, dtype: bool = True
) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(
            f"{name} is on {t.device} but the sources are on {like.device}: move it to {like.device}"
        )
    if dtype and t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but the sources have {like.dtype}: cast it to {like.dtype}"
        )
    if not dtype and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_queries(queries: object, like: Tensor, name: str, single: bool) -> Tensor:
    d = like.shape[-1]
    if not isinstance(queries, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(queries).__name__}")
    if single:
        return _check_like(queries, name, like, (d,), "[d]", dtype=False)
    if queries.dim() != 2 or queries.shape[0] == 0:
        raise ValueError(f"{name} must have shape [S, d] with S >= 1 and d = {d}, got {list(queries.shape)}")
    return _check_like(queries, name, like, (queries.shape[0], d), "[S, d]", dtype=False)


def _no_grad_needed(*args: object) -> bool:
    """True when no gradient can flow through a call (inference, or no input requires grad) and dynamo
    is not tracing: the call may then skip the Python autograd layer, which costs more CPU time than
    the kernel launch itself when batches are small (decoding)."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    for a in args:
        if isinstance(a, Tensor):
            if a.requires_grad:
                return False
        elif isinstance(a, list) and any(t.requires_grad for t in a):
            return False
    return True


def _call(op, *args: object):
    """``op(*args)``, below the autograd layer when :func:`_no_grad_needed` (same result, no graph)."""
    if _no_grad_needed(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype, also that of the lse and query-gradient outputs: fp64 for fp64
    sources (so that gradcheck sees fp64 throughout), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- public ops


def phase1(
    sources: Sequence[Tensor], queries: Tensor, eps: float = DEFAULT_EPS
) -> tuple[list[Tensor], Tensor]:
    """Phase 1: S queries ``[S, d]`` over n sources ``[..., d]`` in one read of the sources.

    Returns S outputs ``[..., d]`` (source dtype; the softmax-weighted sums, one tensor per query so
    that each is freed as soon as it is used) and ``lse [S, ...]`` (fp32).
    """
    sources = _check_sources(sources)
    queries = _check_queries(queries, sources[0], "queries", single=False)
    lead = tuple(sources[0].shape[:-1])
    if backend(sources[0].device) == "reference":
        out, lse = reference.phase1(sources, queries, eps)
        return list(out.unbind(0)), lse
    outs, lse = _call(torch.ops.attnres.phase1, [_flat(s) for s in sources], queries, eps)
    d = sources[0].shape[-1]
    return [o.view(*lead, d) for o in outs], lse.view(queries.shape[0], *lead)


def phase2(
    partial_out: Tensor, partial_lse: Tensor, partial: Tensor, query: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor]:
    """Phase 2: merge ``(partial_out [..., d], partial_lse [...])`` from phase 1 with the partial
    summary ``partial [..., d]`` under ``query [d]`` (online softmax). Returns ``(h, lse)``."""
    partial = _check_source(partial, "partial")
    query, lse_shape = _check_phase2(partial_out, partial_lse, partial, query)
    if backend(partial.device) == "reference":
        return reference.phase2(partial_out, partial_lse, partial, query, eps)
    m = _flat_lse(partial_lse, partial.dtype)
    out, lse = _call(torch.ops.attnres.phase2, _flat(partial_out), m, _flat(partial), query, eps)
    return out.view(partial.shape), lse.view(lse_shape)


def _check_phase2(
    partial_out: Tensor, partial_lse: Tensor, partial: Tensor, query: Tensor
) -> tuple[Tensor, tuple[int, ...]]:
    """The arguments of phase 2 beside ``partial`` (already checked): ``(query, lse shape)``."""
    _check_like(partial_out, "partial_out", partial, tuple(partial.shape), "[..., d] like partial")
    lse_shape = tuple(partial.shape[:-1])
    _check_like(
        partial_lse, "partial_lse", partial, lse_shape, "[...] (partial's shape without d)", dtype=False
    )
    return _check_queries(query, partial, "query", single=True), lse_shape


def _flat_lse(partial_lse: Tensor, dtype: torch.dtype) -> Tensor:
    """``partial_lse`` as the kernels take it: flat, in the accumulation dtype of ``dtype`` sources."""
    m, acc = partial_lse.reshape(-1), _acc_dtype(dtype)
    if m.dtype != acc:  # skips the call of a no-op .to(): this path runs once per sublayer
        m = m.to(acc)
    return m


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The decoder's RMSNorm: ``x / rms(x) * weight`` over the last dim of ``x [..., d]`` (``weight [d]``),
    computed in fp32 (also for fp64 input, where :func:`attnres.reference.rms_norm` keeps fp64) and
    returned in the dtype of ``x``."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_norm(device: torch.device | str) -> bool:
    """Whether :func:`phase2_norm` runs one fused kernel on this device type (CUDA builds)."""
    return _HAS_NORM_KERNELS.get(_device_type(device), False)


def phase2_norm(
    partial_out: Tensor,
    partial_lse: Tensor,
    partial: Tensor,
    query: Tensor,
    weight: Tensor,
    eps: float = DEFAULT_EPS,
    norm_eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """:func:`phase2` and then the next sublayer's input RMSNorm (``weight [d]``, epsilon ``norm_eps``,
    computed in fp32, returned in the partial's dtype): ``(y, lse)``. On CUDA one kernel each way, which
    writes ``y`` but never ``h`` and keeps the phase-1 output for backward instead of ``h`` and the norm's
    fp32 copy of it; elsewhere :func:`phase2` followed by the same norm."""
    partial = _check_source(partial, "partial")
    weight = _check_queries(weight, partial, "weight", single=True)
    if not fused_norm(partial.device) or partial.dtype == torch.float64:
        h, lse = phase2(partial_out, partial_lse, partial, query, eps)
        return rms_norm(h, weight, norm_eps), lse
    query, lse_shape = _check_phase2(partial_out, partial_lse, partial, query)
    m = _flat_lse(partial_lse, partial.dtype)
    y, lse = _call(
        torch.ops.attnres.phase2_norm, _flat(partial_out), m, _flat(partial), query, weight, eps, norm_eps
    )
    return y.view(partial.shape), lse.view(lse_shape)


def fused_add(device: torch.device | str) -> bool:
    """Whether :func:`phase2_norm_add` runs one fused kernel on this device type (CUDA builds)."""
    return _HAS_ADD_KERNELS.get(_device_type(device), False)


def phase2_norm_add(
    partial_out: Tensor,
    partial_lse: Tensor,
    prev: Tensor,
    addend: Tensor,
    query: Tensor,
    weight: Tensor,
    eps: float = DEFAULT_EPS,
    norm_eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`phase2_norm` over the partial summary ``prev + addend`` (``[..., d]`` each, one dtype), which it
    also returns: ``(y, lse, partial)``. On CUDA one kernel each way: the sum is written once and never read
    back, and in backward the partial summary's gradient from its later uses is added in the same kernel
    (Block AttnRes: the sublayer output's add and its gradient's accumulation cost no pass of their own).
    The values are those of ``partial = prev + addend`` followed by :func:`phase2_norm`, bit for bit."""
    prev = _check_source(prev, "prev")
    addend = _check_source(addend, "addend")
    _check_like(addend, "addend", prev, tuple(prev.shape), "[..., d] like prev")
    if not fused_add(prev.device) or prev.dtype == torch.float64:
        partial = prev + addend
        y, lse = phase2_norm(partial_out, partial_lse, partial, query, weight, eps, norm_eps)
        return y, lse, partial
    weight = _check_queries(weight, prev, "weight", single=True)
    query, lse_shape = _check_phase2(partial_out, partial_lse, prev, query)
    m = _flat_lse(partial_lse, prev.dtype)
    y, lse, partial = _call(
        torch.ops.attnres.phase2_norm_add, _flat(partial_out), m, _flat(prev), _flat(addend), query, weight,
        eps, norm_eps,
    )
    return y.view(prev.shape), lse.view(lse_shape), partial.view(prev.shape)


def depth_attention(
    sources: Sequence[Tensor], query: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor]:
    """Direct softmax over depth: one query ``[d]`` over n sources ``[..., d]`` -> ``(out, lse)``."""
    sources = _check_sources(sources)
    query = _check_queries(query, sources[0], "query", single=True)
    if backend(sources[0].device) == "reference":
        return reference.depth_attention(sources, query, eps)
    lead = tuple(sources[0].shape[:-1])
    out, lse = _call(torch.ops.attnres.depth_attn, [_flat(s) for s in sources], query, eps)
    return out.view(*lead, sources[0].shape[-1]), lse.view(lead)


# ----------------------------------------------------------------------------- fake kernels and autograd


def _register() -> None:
    lib = "attnres::"

    @torch.library.register_fake(lib + "phase1")
    def _(sources, queries, eps):
        n_tok, _ = sources[0].shape
        s = queries.shape[0]
        acc = _acc_dtype(sources[0].dtype)
        return [torch.empty_like(sources[0]) for _ in range(s)], sources[0].new_empty(s, n_tok, dtype=acc)

    @torch.library.register_fake(lib + "phase1_backward")
    def _(grad_outs, grad_lse, sources, queries, lse, eps):
        acc = _acc_dtype(sources[0].dtype)
        return [torch.empty_like(s) for s in sources], queries.new_empty(queries.shape, dtype=acc)

    def phase2_out(partial):  # (h or y, lse)
        return torch.empty_like(partial), partial.new_empty(partial.shape[0], dtype=_acc_dtype(partial.dtype))

    def phase2_grads(partial, query):  # (grad_partial_out, grad_partial_lse, grad_partial, grad_query)
        acc = _acc_dtype(partial.dtype)
        return (
            torch.empty_like(partial),
            partial.new_empty(partial.shape[0], dtype=acc),
            torch.empty_like(partial),
            query.new_empty(query.shape, dtype=acc),
        )

    @torch.library.register_fake(lib + "phase2")
    def _(partial_out, partial_lse, partial, query, eps):
        return phase2_out(partial)

    @torch.library.register_fake(lib + "phase2_backward")
    def _(grad_out, grad_lse, out, partial_lse, lse, partial, query, eps):
        return phase2_grads(partial, query)

    @torch.library.register_fake(lib + "phase2_norm")
    def _(partial_out, partial_lse, partial, query, weight, eps, norm_eps):
        return phase2_out(partial)

    @torch.library.register_fake(lib + "phase2_norm_backward")
    def _(grad_y, grad_lse, partial_out, partial_lse, lse, partial, query, weight, eps, norm_eps):
        grad_weight = weight.new_empty(weight.shape, dtype=_acc_dtype(partial.dtype))
        return (*phase2_grads(partial, query), grad_weight)

    @torch.library.register_fake(lib + "phase2_norm_add")
    def _(partial_out, partial_lse, prev, addend, query, weight, eps, norm_eps):
        return (*phase2_out(prev), torch.empty_like(prev))

    @torch.library.register_fake(lib + "phase2_norm_add_backward")
    def _(grad_y, grad_lse, grad_partial, partial_out, partial_lse, lse, partial, query, weight, eps,
          norm_eps):
        grad_weight = weight.new_empty(weight.shape, dtype=_acc_dtype(partial.dtype))
        return (*phase2_grads(partial, query), grad_weight)

    @torch.library.register_fake(lib + "depth_attn")
    def _(sources, query, eps):
        n_tok, _ = sources[0].shape
        return torch.empty_like(sources[0]), sources[0].new_empty(n_tok, dtype=_acc_dtype(sources[0].dtype))

    @torch.library.register_fake(lib + "depth_attn_backward")
    def _(grad_out, grad_lse, sources, query, lse, eps):
        acc = _acc_dtype(sources[0].dtype)
        return [torch.empty_like(s) for s in sources], query.new_empty(query.shape, dtype=acc)

    # autograd: csrc/autograd.cpp (TORCH_LIBRARY_IMPL(attnres, Autograd, m)), in C++ for its host cost


if extension_error is None:
    _register()


# ----------------------------------------------------------------------------- pack / unpack


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """Pack k tensors (one dtype and device, any shapes) into one contiguous 1-D buffer of
    ``sum(t.numel())`` elements, in order: one point-to-point message per pipeline-stage boundary.
    Differentiable: the gradient is unpacked. Without a kernel for the device: ``torch.cat``."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("pack needs at least one tensor")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != first.dtype:
            raise TypeError(f"tensors[{i}] has dtype {t.dtype} but tensors[0] has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {first.device}")
    if backend(first.device) == "reference":
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.ops.attnres.pack(tensors)


def unpack(buffer: Tensor, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Split a 1-D ``buffer`` into new tensors of the given shapes (copies, not views: a receiver may keep
    them while the buffer is reused); ``sum(prod(shape))`` must equal ``buffer.numel()``.
    Differentiable: the gradients are packed."""
    if not isinstance(buffer, Tensor):
        raise TypeError(f"buffer must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.dim() != 1:
        raise ValueError(f"buffer must be 1-D, got shape {list(buffer.shape)}")
    shapes = [[int(s) for s in shape] for shape in shapes]
    if not shapes:
        raise ValueError("unpack needs at least one shape")
    total = sum(math.prod(s) for s in shapes)
    if total != buffer.numel():
        raise ValueError(f"the shapes {shapes} hold {total} elements but the buffer has {buffer.numel()}")
    if backend(buffer.device) == "reference":
        return [c.reshape(s).clone() for c, s in zip(buffer.split([math.prod(s) for s in shapes]), shapes)]
    return list(torch.ops.attnres.unpack(buffer, shapes))


def _register_pack() -> None:
    @torch.library.register_fake("attnres::pack")
    def _(tensors):
        return tensors[0].new_empty(sum(t.numel() for t in tensors))

    @torch.library.register_fake("attnres::unpack")
    def _(buffer, shapes):
        return [buffer.new_empty(s) for s in shapes]

    # Autograd here, not in csrc/autograd.cpp like the depth ops': unpack's ``SymInt[][] shapes`` has no
    # IValue conversion in torch's C++ API, so a typed C++ call of it (backward of pack) does not
    # compile; a C++ version would need a flattened schema. The host cost it would save is small here:
    # two calls per stage boundary and microbatch, beside a point-to-point send of the whole payload.
    def pack_setup(ctx, inputs, output):
        (tensors,) = inputs
        ctx.shapes = [list(t.shape) for t in tensors]

    def pack_backward(ctx, grad):
        return (list(torch.ops.attnres.unpack(grad.contiguous(), ctx.shapes)),)

    torch.library.register_autograd("attnres::pack", pack_backward, setup_context=pack_setup)

    def unpack_setup(ctx, inputs, output):
        buffer, shapes = inputs
        ctx.shapes = shapes
        ctx.like = buffer.new_empty(0)

    def unpack_backward(ctx, grads):
        grads = [
            torch.zeros(s, dtype=ctx.like.dtype, device=ctx.like.device) if g is None else g
            for g, s in zip(grads, ctx.shapes)
        ]
        return torch.ops.attnres.pack(grads), None

    torch.library.register_autograd("attnres::unpack", unpack_backward, setup_context=unpack_setup)


if extension_error is None:
    _register_pack()
