"""The residual path of a PreNorm decoder: standard, Full AttnRes or Block AttnRes (SPEC §1-2).

One interface, driven by the decoder::

    state = residual.begin(embedding)           # v_0, [B, T, d]
    for i, sublayer in enumerate(sublayers):    # i = 0 .. L-1 (two per decoder layer)
        h = residual.input(state, i)            # the input of sublayer i
        residual.output(state, i, sublayer(h))  # hand back its output v_i
    x = residual.readout(state)                 # goes to the final norm and the LM head

The depth mixer's parameters (one pseudo-query and one RMSNorm weight per sublayer, plus the
read-out's) sit in ``queries``, a ``ModuleDict`` keyed by sublayer index (and ``"out"``), so a
pipeline stage can drop the entries of the sublayers it does not own and names stay stable.

Block AttnRes runs two phases: at the first sublayer of a block (or the first one a stage owns),
phase 1 reads the completed block summaries once for the queries of all remaining sublayers of the
block; each sublayer then merges its phase-1 result with the partial summary in phase 2. Full
AttnRes is the case of one sublayer per block. The sources are read where they are: nothing is
stacked per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from attnres import ops, reference

ResidualMode = Literal["standard", "full", "block"]
# (out, lse, partial, query, norm weight) -> the next sublayer's normalised input
_Merge = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
RESIDUAL_MODES: tuple[str, ...] = ("standard", "full", "block")


class DepthQuery(nn.Module):
    """One sublayer's depth mixer: a pseudo-query ``w`` (zero init: uniform weights at step 0) and
    the weight ``g`` of the RMSNorm applied to the keys (init 1). Only ``w * g`` enters the logit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.norm_weight = nn.Parameter(torch.ones(dim))

    def forward(self) -> Tensor:
        return self.weight * self.norm_weight


@dataclass
class ResidualState:
    """What flows along depth for one forward pass (and, under pipeline parallelism, across stages).

    ``sources``: completed sources — standard: unused; Full: ``[v_0, v_1, ...]``; Block: the
    embedding and the block summaries ``[b_0, b_1, ...]``. ``partial``: the sum of the outputs of
    the current block so far (None at a block boundary). ``hidden``: the standard residual stream.
    """

    sources: list[Tensor] = field(default_factory=list)
    partial: Tensor | None = None
    hidden: Tensor | None = None
    # phase-1 results for sublayers first .. first+len(outs)-1 of the current block
    pending_first: int = -1
    pending_outs: list[Tensor | None] = field(default_factory=list)
    pending_lse: Tensor | None = None
    pending_queries: tuple[Tensor, ...] = ()  # their queries (phase 2 uses them again)
    pending_sources: int = 0  # how many sources phase 1 read (Full: later ones are merged by phase 2)
    pending_recompute: _BlockRecompute | None = None  # recompute mode: phase 1 again in backward
    # when not None, the queries by sublayer range, kept across calls (decoding: parameters are fixed)
    query_cache: dict[tuple[int, int], Tensor] | None = None
    # when not None, one dict per sublayer input (and the read-out): weights and source norms
    records: list[dict] | None = None


class Residual(nn.Module):
    """The residual path of ``num_sublayers`` sublayers of width ``dim``.

    mode: ``"standard"`` (h_l = v_0 + ... + v_{l-1}), ``"full"`` (softmax over every earlier output)
    or ``"block"`` (``num_blocks`` blocks of ``num_sublayers / num_blocks`` sublayers; a decoder also
    wants that block size even, so a block holds whole decoder layers — its config checks that).
    ``eps``: the key RMSNorm epsilon. ``full_group``: Full AttnRes runs phase 1 once per group of this
    many consecutive sublayers (over the outputs completed before the group) and merges each later
    output of the group by phase 2, one online-softmax step per output: the same softmax, with the
    sources read once per group instead of once per sublayer. 1: a direct softmax per sublayer;
    above 2 each merge beyond the first keeps one more ``[..., d]`` tensor for backward.
    ``recompute`` (Block only): when :meth:`input` is given the sublayer's norm, keep only the partial
    summary of each sublayer for backward (not its input ``h``, nor the norm's fp32 copy of it) and
    recompute phase 1 once per block in backward (``h`` = phase 2 of the recomputed phase-1 output and
    the partial, then the norm), so that Block AttnRes keeps no more activations than the standard
    residual apart from its sources. Bit-identical gradients; eager mode only (under ``torch.compile``
    and without gradients :meth:`input` takes the plain path).
    ``fuse_norm``: when :meth:`input` is given an RMS norm (a module with ``rms_eps``, such as
    :class:`attnres.model.norm.RMSNorm`) and the device has the kernel (CUDA), a sublayer's last phase-2
    step and its input norm run as one op (:func:`attnres.ops.phase2_norm`): ``h`` is never written, and
    backward keeps the phase-1 output instead of ``h`` and the norm's fp32 copy of it.
    """

    def __init__(
        self,
        dim: int,
        num_sublayers: int,
        mode: ResidualMode = "block",
        num_blocks: int = 8,
        eps: float = 1e-6,
        full_group: int = 2,
        recompute: bool = False,
        fuse_norm: bool = True,
    ) -> None:
        super().__init__()
        if mode not in RESIDUAL_MODES:
            raise ValueError(f"residual mode {mode!r} is unknown; valid modes: {', '.join(RESIDUAL_MODES)}")
        if num_sublayers < 1:
            raise ValueError(f"num_sublayers must be >= 1, got {num_sublayers}")
        if mode == "block" and (num_blocks < 1 or num_sublayers % num_blocks != 0):
            raise ValueError(
                f"num_blocks={num_blocks} must divide the {num_sublayers} sublayers "
                f"(valid: {', '.join(str(n) for n in block_counts(num_sublayers))})"
            )
        if full_group < 1:
            raise ValueError(f"full_group must be >= 1, got {full_group}")
        self.mode = mode
        self.dim = dim
        self.full_group = full_group
        self.recompute = recompute and mode == "block"
        self.fuse_norm = fuse_norm
        self.num_sublayers = num_sublayers
        self.num_blocks = num_blocks if mode == "block" else (num_sublayers if mode == "full" else 0)
        self.block_size = {"block": num_sublayers // max(num_blocks, 1), "full": 1, "standard": 0}[mode]
        self.eps = eps
        if mode != "standard":
            names = [str(i) for i in range(num_sublayers)] + ["out"]
            self.queries = nn.ModuleDict({n: DepthQuery(dim) for n in names})

    def extra_repr(self) -> str:
        extra = (
            f", num_blocks={self.num_blocks}, block_size={self.block_size}" if self.mode == "block" else ""
        )
        extra += ", recompute=True" if self.recompute else ""
        return f"mode={self.mode}, dim={self.dim}, num_sublayers={self.num_sublayers}{extra}"

    # ------------------------------------------------------------------ the interface

    def begin(
        self, embedding: Tensor, record: bool = False, query_cache: dict | None = None
    ) -> ResidualState:
        """Start a forward pass from the token embedding ``v_0 [B, T, d]``.

        ``query_cache``: a dict that keeps the depth queries (``w * g``) between calls, for decoding,
        where the parameters do not change; pass a new dict whenever they may have (it is not
        invalidated), and none when gradients must reach the queries."""
        state = ResidualState(records=[] if record else None, query_cache=query_cache)
        if self.mode == "standard":
            state.hidden = embedding
        else:
            state.sources.append(embedding)
        return state

    def input(self, state: ResidualState, i: int, norm: nn.Module | None = None) -> Tensor:
        """The input ``h_i [B, T, d]`` of sublayer ``i``; given the sublayer's input ``norm``,
        ``norm(h_i)``, merged with the residual path's last step in ``recompute`` mode (``norm``: a module
        called as ``norm(x)`` or ``norm(x, via=f)`` with ``f(x, weight)`` computing it, and with
        ``normalize(x, weight)``, such as :class:`attnres.model.norm.RMSNorm`)."""
        if norm is not None:
            if self._recomputes(state):
                return self._merged_norm(state, i, norm)
            if self.mode != "standard" and state.records is None:
                merge = self._fused_merge(norm, state.sources[0].device)
                if merge is not None:
                    return self._fused_input(state, i, norm, merge)
            return norm(self.input(state, i))
        if self.mode == "standard":
            return state.hidden
        h, lse, last, k = self._pending_merge(state, i)
        if last is not None:
            h, _ = ops.phase2(h, lse, last, state.pending_queries[k], self.eps)
        if state.records is not None:
            with_partial = self.mode == "block" and state.partial is not None
            self._record(state, i, state.sources + ([state.partial] if with_partial else []))
        return h

    def _pending_merge(self, state: ResidualState, i: int) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """Sublayer ``i``'s input short of its last phase-2 merge: ``(h, lse, last, k)``, with ``last`` the
        source still to merge under query ``state.pending_queries[k]`` (None: ``h`` is the input)."""
        # Block: phase 1 over the block summaries, then the partial summary. Full, in groups: phase 1 over
        # the outputs completed before the group (or before the first sublayer of it this module owns),
        # then one merge per output completed since.
        if self.mode == "full":
            h, lse, k = self._phase1_result(state, i, self.full_group)
            later = state.sources[state.pending_sources:]
            for v in later[:-1]:
                h, lse = ops.phase2(h, lse, v, state.pending_queries[k], self.eps)
            last = later[-1] if later else None
        else:
            if state.partial is None and i % self.block_size != 0:
                raise RuntimeError(f"sublayer {i} is inside a block but no partial summary was handed back")
            h, lse, k = self._phase1_result(state, i, self.block_size)
            last = state.partial
        return h, lse, last, k

    def _fused_input(self, state: ResidualState, i: int, norm: nn.Module, merge: _Merge) -> Tensor:
        """``norm(h_i)`` with the last phase-2 step (if any) and the norm as the one op ``merge``."""
        h, lse, last, k = self._pending_merge(state, i)
        if last is None:
            return norm(h)
        query = state.pending_queries[k]
        return norm(h, via=lambda x, weight: merge(x, lse, last, query, weight))

    def _fused_merge(self, norm: nn.Module, device: torch.device) -> _Merge | None:
        """The fused phase 2 + ``norm`` as ``merge(out, lse, partial, query, weight) -> y``, or None where
        it does not apply (``fuse_norm`` off, not an RMS norm, no kernel on this device)."""
        norm_eps = getattr(norm, "rms_eps", None)
        if not self.fuse_norm or norm_eps is None or not ops.fused_norm(device):
            return None
        return lambda o, lse, p, q, w: ops.phase2_norm(o, lse, p, q, w, self.eps, norm_eps)[0]

    def _phase1_result(self, state: ResidualState, i: int, group: int) -> tuple[Tensor, Tensor, int]:
        """Sublayer ``i``'s phase-1 ``(out, lse)`` and its index among the pending ones, running phase 1
        for ``i`` .. the end of its group of ``group`` sublayers when it has not run yet."""
        k = i - state.pending_first
        if state.pending_lse is None or not 0 <= k < len(state.pending_outs) or state.pending_outs[k] is None:
            self._phase1(state, i, min(i - i % group + group, self.num_sublayers))
            k = 0
        out, lse = state.pending_outs[k], state.pending_lse[k]
        state.pending_outs[k] = None  # let it die once used
        return out, lse, k

    def _recomputes(self, state: ResidualState) -> bool:
        return (
            self.recompute
            and state.records is None
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )

    def _merged_norm(self, state: ResidualState, i: int, norm: nn.Module) -> Tensor:
        out, lse, partial, k = self._pending_merge(state, i)  # (Block)
        query, holder = state.pending_queries[k], state.pending_recompute
        fused = self._fused_merge(norm, out.device)

        def merge(o: Tensor, lse_: Tensor, p: Tensor | None, q: Tensor, w: Tensor) -> Tensor:
            if p is None:
                return norm.normalize(o, w)
            if fused is not None:
                return fused(o, lse_, p, q, w)
            return norm.normalize(ops.phase2(o, lse_, p, q, self.eps)[0], w)

        def via(x: Tensor, weight: Tensor) -> Tensor:
            return _MergedNorm.apply(x, lse, partial, query, weight, holder, k, merge)

        return norm(out, via=via)

    def output(self, state: ResidualState, i: int, v: Tensor) -> None:
        """Hand back the output ``v_i [B, T, d]`` of sublayer ``i``."""
        if self.mode == "standard":
            state.hidden = state.hidden + v
            return
        # The stream keeps the embedding's dtype, as the standard residual's `h + v` promotes to it: under
        # autocast (bf16-mixed) the sublayers return bf16 while the embedding and summaries stay fp32.
        stream_dtype = state.sources[0].dtype
        if v.dtype != stream_dtype:
            v = v.to(stream_dtype)
        if self.mode == "full":  # every output is a source; the group's phase-1 results stay pending
            state.sources.append(v)
            return
        state.partial = v if state.partial is None else state.partial + v
        if (i + 1) % self.block_size == 0:  # the block is complete: its summary becomes a source
            state.sources.append(state.partial)
            state.partial = None
            state.pending_outs, state.pending_lse, state.pending_first = [], None, -1
            state.pending_queries, state.pending_recompute = (), None

    def readout(self, state: ResidualState) -> Tensor:
        """The final hidden state ``[B, T, d]`` (before the final norm)."""
        if self.mode == "standard":
            return state.hidden
        if state.partial is not None:
            raise RuntimeError(
                "readout called in the middle of a block: hand back every sublayer's output first"
            )
        if state.records is not None:
            self._record(state, self.num_sublayers, state.sources)
        out, _ = ops.depth_attention(state.sources, self._queries(state, -1, 0)[0], self.eps)
        return out

    # ------------------------------------------------------------------ helpers

    def _queries(self, state: ResidualState, first: int, end: int) -> Tensor:
        """The queries ``[S, d]`` of sublayers ``first .. end-1`` that this module owns (a pipeline stage
        may own fewer; ``first = -1``: the read-out's), in at least fp32, computed once per block
        (phase 2 reuses phase 1's rows) or taken from ``state.query_cache``."""
        key = (first, end)
        if state.query_cache is not None and key in state.query_cache:
            return state.query_cache[key]
        if first < 0:
            owned = [self.queries["out"]()]
        else:
            owned = []
            for j in range(first, end):
                if str(j) not in self.queries:
                    break
                owned.append(self.queries[str(j)]())
        q = torch.stack(owned)
        q = q.to(torch.promote_types(q.dtype, torch.float32))  # the kernels take fp32 queries as they are
        if state.query_cache is not None:
            state.query_cache[key] = q
        return q

    def _phase1(self, state: ResidualState, i: int, block_end: int) -> None:
        queries = self._queries(state, i, block_end)
        outs, lse = ops.phase1(state.sources, queries, self.eps)
        state.pending_first, state.pending_outs, state.pending_lse = i, list(outs), lse
        state.pending_queries = queries.unbind(0)
        state.pending_sources = len(state.sources)
        if self._recomputes(state):  # (Block only)
            state.pending_recompute = _BlockRecompute(list(state.sources), queries.detach(), self.eps)

    def _record(self, state: ResidualState, i: int, sources: list[Tensor]) -> None:
        name = "out" if i == self.num_sublayers else str(i)
        with torch.no_grad():
            q = self.queries[name]().detach()
            w = reference.depth_weights([s.detach() for s in sources], q, self.eps)  # [n, B, T]
            norms = torch.stack([reference.rms(s.detach(), 0.0).mean() for s in sources])
        state.records.append(
            {"sublayer": i, "weights": w.flatten(1).mean(1).cpu(), "source_norms": norms.cpu()}
        )

    def depth_weight_matrix(self, records: list[dict]) -> Tensor:
        """Mean depth-attention weights as a ``[num sources, num sublayers + 1]`` matrix (NaN where a
        sublayer does not attend to a source): columns are sublayers (the last is the read-out).
        In Block mode rows are ``b_0 .. b_N`` and a final row for the partial summary."""
        n_rows = (self.num_blocks + 1) + (1 if self.mode == "block" else 0)
        n_rows = self.num_sublayers + 1 if self.mode == "full" else n_rows
        m = torch.full((n_rows, len(records)), float("nan"))
        for c, r in enumerate(records):
            w = r["weights"]
            i = r["sublayer"]
            has_partial = self.mode == "block" and i < self.num_sublayers and i % self.block_size != 0
            if has_partial:
                m[: len(w) - 1, c] = w[:-1]
                m[-1, c] = w[-1]
            else:
                m[: len(w), c] = w
        return m


def block_counts(num_sublayers: int, even: bool = False) -> list[int]:
    """The valid ``num_blocks`` for a depth: its divisors (``even``: only those leaving an even block
    size, so that a block holds whole decoder layers)."""
    return [
        n
        for n in range(1, num_sublayers + 1)
        if num_sublayers % n == 0 and not (even and (num_sublayers // n) % 2)
    ]


class _BlockRecompute:
    """Phase 1 of one block again in backward, once, for the :class:`_MergedNorm` of its sublayers:
    the first of them to run backward (the block's last sublayer) recomputes every query's output, and
    each takes its own and lets it go. The sources are those phase 1 read (its backward keeps them)."""

    def __init__(self, sources: list[Tensor], queries: Tensor, eps: float) -> None:
        self.sources: list[Tensor] | None = sources
        self.queries, self.eps = queries, eps
        self.outs: list[Tensor | None] | None = None

    def take(self, k: int) -> Tensor:
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
    """``merge(out, lse, partial, query, weight)``: ``norm(h)`` with ``h`` = phase 2 of the block's phase-1
    output ``out`` (query ``k``) and the partial summary, or ``h = out`` at the block's first sublayer (no
    partial). Keeps the partial and small tensors for backward, not ``out`` or ``h``: backward takes
    ``out`` again from :meth:`_BlockRecompute.take` and replays ``merge`` (the same ops on the same values,
    so the gradients are those of the path without recompute, bit for bit)."""

    @staticmethod
    def forward(ctx, out, lse, partial, query, weight, holder, k, merge):
        ctx.holder, ctx.k, ctx.merge = holder, k, merge
        ctx.autocast = _autocast_state(out.device.type)
        ctx.save_for_backward(lse, partial, query, weight)
        return merge(out, lse, partial, query, weight)

    @staticmethod
    def backward(ctx, grad):
        lse, partial, query, weight = ctx.saved_tensors
        out = ctx.holder.take(ctx.k)
        leaves = [t if t is None else t.detach().requires_grad_() for t in (out, lse, partial, query, weight)]
        wants = [t is not None and n for t, n in zip(leaves, ctx.needs_input_grad[:5])]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            y = ctx.merge(*leaves)
        inputs = [t for t, want in zip(leaves, wants) if want]
        got = iter(torch.autograd.grad(y, inputs, grad, allow_unused=True))
        grads = [next(got) if want else None for want in wants]
        return (*grads, None, None, None)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
