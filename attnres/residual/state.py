"""What flows along depth: the state of one forward pass, the lazy input a sublayer's norm finishes, and
the fused last merge + norm with Block AttnRes' ``recompute`` mode.

``recompute`` keeps only the partial summary of each sublayer for backward (not its input ``h``, nor
the norm's fp32 copy of it) and runs phase 1 once per block again in backward, so that Block AttnRes
keeps no more activations than the standard residual apart from its sources. The gradients are those
of the path without recompute, bit for bit: backward replays the same ops on the same values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnres import ops, reference

if TYPE_CHECKING:
    from attnres.residual.block import _Pending


class ResidualState:
    """What flows along depth for one forward pass (and, under pipeline parallelism, across stages).

    ``sources``: the completed sources ``[B, T, d]`` each — standard: unused; Full: ``[v_0, v_1, ...]``;
    Block: the embedding and the block summaries ``[b_0, b_1, ...]``. ``partial``: the sum of the
    outputs of the current block so far (None at a block boundary). ``hidden``: the standard residual
    stream. These three are all a pipeline stage hands to the next.

    Optional, set by :meth:`Residual.begin`: ``query_cache`` (decoding: the depth queries by sublayer
    range, kept across calls) and ``records`` (one dict per sublayer input and the read-out: depth
    weights and source norms, :mod:`attnres.residual.diagnostics`).

    Block AttnRes may leave the last output's addition to ``partial`` pending (:meth:`defer_add`), for the
    next sublayer's input to make it in the same kernel as its phase 2 and norm
    (:func:`attnres.ops.phase2_norm_add`); reading ``partial`` makes a pending addition first, so every
    other reader sees the sum. Writers call :meth:`set_partial`.
    """

    def __init__(
        self, sources: list[Tensor] | None = None, partial: Tensor | None = None,
        hidden: Tensor | None = None, query_cache: dict[tuple[int, int], Tensor] | None = None,
        records: list[dict] | None = None,
    ) -> None:
        self.sources: list[Tensor] = [] if sources is None else sources
        self._partial, self._addend = partial, None
        self.hidden, self.query_cache, self.records = hidden, query_cache, records
        # the phase-1 results of the current block or group (Block / Full AttnRes only; not handed over:
        # a stage that receives the state runs phase 1 for its own sublayers)
        self._pending: _Pending | None = None

    @property
    def partial(self) -> Tensor | None:
        if self._addend is not None:
            self._partial, self._addend = self._partial + self._addend, None
        return self._partial

    def set_partial(self, value: Tensor | None) -> None:
        """``partial = value`` (any pending addition dropped). A method, not a property setter: Dynamo
        stores ``state.partial = ...`` as a plain attribute without calling a setter (torch 2.11)."""
        self._partial, self._addend = value, None

    def defer_add(self, addend: Tensor) -> None:
        """``partial += addend``, made by the next reader: the fused kernel of the next sublayer's input
        (:meth:`take_add`) or, for any other reader, when it reads ``partial``."""
        if self._partial is None or self._addend is not None:
            raise RuntimeError("defer_add needs a partial summary and no addition pending")
        self._addend = addend

    def take_add(self) -> tuple[Tensor, Tensor] | None:
        """The pending addition ``(partial, addend)``, handed to the caller, who sets ``partial`` to the
        sum; None when none is pending."""
        if self._addend is None:
            return None
        pending, self._addend = (self._partial, self._addend), None
        return pending

    @property
    def add_pending(self) -> bool:
        return self._addend is not None

    @property
    def device(self) -> torch.device:
        """The device of the residual stream."""
        if self.hidden is not None:
            return self.hidden.device
        return (self.sources[0] if self.sources else self._partial).device

    def __repr__(self) -> str:
        shapes = [tuple(s.shape) for s in self.sources]
        part = None if self._partial is None else tuple(self._partial.shape)
        return f"ResidualState(sources={shapes}, partial={part}, add_pending={self.add_pending})"


@dataclass(eq=False)
class DepthInput:
    """The input ``h`` of a sublayer short of the residual path's last step, for the sublayer's RMS norm
    to finish inside its own forward (where FSDP has gathered its weight): :meth:`normalized`.

    ``out [..., d]``, ``lse [...]``: the depth attention over the sources read so far; ``last [..., d]``:
    the source still to merge under ``query [d]`` by one phase-2 step (epsilon ``eps``), None when
    ``h = out``. ``fused``: the merge and the norm run as the one op :func:`attnres.ops.phase2_norm`
    (``h`` is never written; backward keeps ``out`` instead of ``h`` and the norm's fp32 copy of it).
    ``recompute`` (Block AttnRes, ``recompute`` mode): the block's phase 1, run again in backward to
    give back ``out`` (query ``k`` of the block), so that neither ``out`` nor ``h`` is kept.
    """

    out: Tensor
    lse: Tensor
    last: Tensor | None
    query: Tensor
    eps: float
    fused: bool
    recompute: _BlockRecompute | None = None
    k: int = 0
    # Block AttnRes with the last output's addition pending: ``last`` is the state's partial summary,
    # taken (with the addition made in the fused kernel) at the first use
    deferred: ResidualState | None = None

    def normalized(self, weight: Tensor, norm_eps: float) -> Tensor:
        """``rms_norm(h, weight [d], norm_eps) [..., d]``, in the dtype of the sources."""
        if self.deferred is not None:
            state, self.deferred = self.deferred, None
            # (phase2_in_torch: the pending add is made in torch code, by reading partial)
            pending = None if phase2_in_torch() else state.take_add()
            if pending is not None:
                y, _, partial = ops.phase2_norm_add(
                    self.out, self.lse, *pending, self.query, weight, self.eps, norm_eps
                )
                state.set_partial(partial)
                self.last = partial
                return y
            self.last = state.partial
        if self.recompute is not None:
            return _MergedNorm.apply(
                self.out, self.lse, self.last, self.query, weight, self.recompute, self.k, self.eps,
                norm_eps, self.fused,
            )
        return merge_and_norm(
            self.out, self.lse, self.last, self.query, weight, self.eps, norm_eps, self.fused
        )

    def tensor(self) -> Tensor:
        """``h [..., d]`` itself, for a consumer that is not an RMS norm (the unfused merge, no recompute)."""
        if self.deferred is not None:
            self.last, self.deferred = self.deferred.partial, None
        if self.last is None:
            return self.out
        return ops.phase2(self.out, self.lse, self.last, self.query, self.eps)[0]


# --------------------------------------------------------------- the fused last merge + norm, and recompute
# An experiment (session 27): under torch.compile, phase 2 + norm as torch code (attnres.reference) that
# Inductor fuses with its neighbours (the MoE's combine, the partial summary's add), instead of the kernel,
# an opaque op Inductor cannot fuse into. ATTNRES_COMPILED_PHASE2=inductor; read once (a bool for Dynamo).
PHASE2_INDUCTOR = os.environ.get("ATTNRES_COMPILED_PHASE2", "kernel") == "inductor"


def phase2_in_torch() -> bool:
    """Whether phase 2 + norm (and Block AttnRes' pending add) run as torch code here rather than as the
    fused op: :data:`PHASE2_INDUCTOR`, under torch.compile."""
    return PHASE2_INDUCTOR and torch.compiler.is_compiling()


def merge_and_norm(
    out: Tensor, lse: Tensor, last: Tensor | None, query: Tensor, weight: Tensor, eps: float,
    norm_eps: float, fused: bool,
) -> Tensor:
    """``rms_norm(h, weight [d], norm_eps) [..., d]`` with ``h`` the phase-2 merge of ``(out [..., d],
    lse [...])`` and ``last [..., d]`` under ``query [d]`` (``h = out`` when ``last`` is None); ``fused``:
    as the one op :func:`attnres.ops.phase2_norm`, else :func:`attnres.ops.phase2` and then the norm."""
    if last is None:
        return ops.rms_norm(out, weight, norm_eps)
    if fused and phase2_in_torch():
        return reference.phase2_norm(out, lse, last, query, weight, eps, norm_eps)[0]
    if fused:
        return ops.phase2_norm(out, lse, last, query, weight, eps, norm_eps)[0]
    return ops.rms_norm(ops.phase2(out, lse, last, query, eps)[0], weight, norm_eps)


class _BlockRecompute:
    """Phase 1 of one block again in backward, once, for the :class:`_MergedNorm` of its sublayers:
    the first of them to run backward (the block's last sublayer) recomputes every query's output, and
    each takes its own and lets it go. The sources are those phase 1 read (its backward keeps them)."""

    def __init__(self, sources: list[Tensor], queries: Tensor, eps: float) -> None:
        self.sources: list[Tensor] | None = sources
        self.queries, self.eps = queries, eps
        self.outs: list[Tensor | None] | None = None

    def take(self, k: int) -> Tensor:
        """The phase-1 output ``[..., d]`` of query ``k``, recomputed (for every query) at the first call."""
        if self.outs is None:
            with torch.no_grad():
                self.outs = list(ops.phase1(self.sources, self.queries, self.eps)[0])
            # not a saved tensor: drop it now, or it would outlive backward with any reference to the graph
            self.sources = None
        out, self.outs[k] = self.outs[k], None
        if out is None:
            raise RuntimeError(f"the phase-1 output of query {k} was already used: backward ran twice "
                               "through the graph (retain_graph is not supported in recompute mode)")
        return out


class _MergedNorm(torch.autograd.Function):
    """:func:`merge_and_norm` of ``(out, lse, partial, query, weight)`` that keeps the partial and small
    tensors for backward, not ``out`` or ``h``: backward takes ``out`` again from
    :meth:`_BlockRecompute.take` and replays :func:`merge_and_norm` (the same ops on the same values, so
    the gradients are those of the path without recompute, bit for bit)."""

    @staticmethod
    def forward(ctx, out, lse, partial, query, weight, holder, k, eps, norm_eps, fused):
        ctx.holder, ctx.k, ctx.settings = holder, k, (eps, norm_eps, fused)
        ctx.autocast = _autocast_state(out.device.type)
        ctx.save_for_backward(lse, partial, query, weight)
        return merge_and_norm(out, lse, partial, query, weight, eps, norm_eps, fused)

    @staticmethod
    def backward(ctx, grad):
        lse, partial, query, weight = ctx.saved_tensors
        out = ctx.holder.take(ctx.k)
        leaves = [t if t is None else t.detach().requires_grad_() for t in (out, lse, partial, query, weight)]
        wants = [t is not None and n for t, n in zip(leaves, ctx.needs_input_grad[:5])]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            y = merge_and_norm(*leaves, *ctx.settings)
        inputs = [t for t, want in zip(leaves, wants) if want]
        got = iter(torch.autograd.grad(y, inputs, grad, allow_unused=True))
        grads = [next(got) if want else None for want in wants]
        return (*grads, None, None, None, None, None)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
