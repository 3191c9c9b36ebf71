"""Full and Block AttnRes: each sublayer's input is a softmax over depth of the completed sources.

The depth mixer's parameters (one pseudo-query and one RMSNorm weight per sublayer, plus the
read-out's) sit in ``queries``, a ``ModuleDict`` keyed by sublayer index (and ``"out"``), so a
pipeline stage can drop the entries of the sublayers it does not own and names stay stable.

Both run two phases. Phase 1 reads the completed sources once for the queries of several sublayers
(Block: the rest of the block; Full: a group of ``full_group``); each sublayer then merges its
phase-1 result with what completed since, one online-softmax step per source (phase 2). The last of
these steps is left to the sublayer's norm (:class:`DepthInput`) where it can be fused with it or
recomputed in backward. The sources are read where they are: nothing is stacked per call.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnres import ops
from attnres.hardware import torch_at_least
from attnres.residual import diagnostics
from attnres.residual.base import Residual
from attnres.residual.state import DepthInput, ResidualState, _BlockRecompute, phase2_in_torch

# Under torch.compile the pending add (BlockAttnRes._defers_add) is state that Dynamo traces across the
# sublayers. torch 2.13 traces it (tests/test_residual.py, on the CPU); on torch 2.11 (H100, session 26) the
# first version, which set ResidualState.partial through a property setter, left the partial summary unset
# in the graph (Dynamo stored the assignment as a plain attribute). The version now (set_partial) traces there
# (session 27), but its compiled results are not yet checked on a 2.11 GPU (tests/test_ops_cuda.py's fp32
# comparison): below this version a compiled forward adds at once, as before.
DEFERRED_ADD_COMPILE_MIN_TORCH = (2, 13)
# looked up once (a plain bool for Dynamo)
_DEFERRED_ADD_COMPILES = torch_at_least(DEFERRED_ADD_COMPILE_MIN_TORCH)


class DepthQuery(nn.Module):
    """One sublayer's depth mixer: a pseudo-query ``w [d]`` (zero init: uniform weights at step 0) and
    the weight ``g [d]`` of the RMSNorm applied to the keys (init 1). Only ``w * g`` enters the logit."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.norm_weight = nn.Parameter(torch.ones(dim))

    def forward(self) -> Tensor:
        return self.weight * self.norm_weight


@dataclass(eq=False)
class _Pending:
    """Phase 1's results for sublayers ``first .. first + len(outs) - 1`` of the current block or group:
    their outputs ``[B, T, d]`` (None once used), ``lse [S, B, T]`` and queries ``[d]`` (phase 2 uses
    them again), how many sources phase 1 read (Full: later ones are merged by phase 2), and, in
    ``recompute`` mode, what phase 1 needs to run again in backward."""

    first: int
    outs: list[Tensor | None]
    lse: Tensor
    queries: tuple[Tensor, ...]
    num_sources: int
    recompute: _BlockRecompute | None


class _AttnRes(Residual):
    """What Full and Block AttnRes share: the queries, phase 1 and the read-out.

    The stream keeps the embedding's dtype, as the standard residual's ``h + v`` promotes to it:
    under autocast (bf16-mixed) the sublayers return bf16 while the embedding and the summaries stay
    fp32, so :meth:`output` casts ``v`` (inline in each mode: a helper call there would be one more
    frame for Dynamo where the decoder's layer loop falls back to eager)."""

    def __init__(
        self, dim: int, num_sublayers: int, num_blocks: int, block_size: int, eps: float, fuse_norm: bool
    ) -> None:
        super().__init__(dim, num_sublayers, num_blocks, block_size)
        self.eps = eps
        self.fuse_norm = fuse_norm
        names = [str(i) for i in range(num_sublayers)] + ["out"]
        self.queries = nn.ModuleDict({n: DepthQuery(dim) for n in names})

    # ------------------------------------------------------------------ the interface

    def begin(
        self, embedding: Tensor, record: bool = False, query_cache: dict | None = None
    ) -> ResidualState:
        return ResidualState(sources=[embedding], query_cache=query_cache, records=[] if record else None)

    def input(self, state: ResidualState, i: int) -> Tensor | DepthInput:
        """``h_i [B, T, d]``; a :class:`DepthInput` where the last merge goes into the sublayer's norm:
        ``fuse_norm`` on a device with the fused kernel (CUDA), or ``recompute`` (Block, eager, with
        gradients). When recording, always ``h_i`` (the plain path)."""
        if state.records is not None:
            return self._recorded_input(state, i)
        recompute = self._recomputes()
        deferred = state.add_pending  # Block: the last output's add is left to this input's kernel
        out, lse, last, k = self._merge_all_but_last(state, i, recompute)
        fused = self.fuse_norm and ops.fused_norm(out.device)
        query = state._pending.queries[k]
        if deferred:
            return DepthInput(out, lse, None, query, self.eps, fused, None, k, deferred=state)
        if recompute or (fused and last is not None):
            holder = state._pending.recompute if recompute else None
            return DepthInput(out, lse, last, query, self.eps, fused, holder, k)
        return out if last is None else ops.phase2(out, lse, last, query, self.eps)[0]

    def readout(self, state: ResidualState) -> Tensor:
        if state.partial is not None:
            raise RuntimeError(
                "readout called in the middle of a block: hand back every sublayer's output first"
            )
        if state.records is not None:
            diagnostics.record(self, state, self.num_sublayers, state.sources)
        out, _ = ops.depth_attention(state.sources, self._queries(state, -1, 0)[0], self.eps)
        return out

    # ------------------------------------------------------------------ what Full and Block do apart

    @abstractmethod
    def _merge_all_but_last(
        self, state: ResidualState, i: int, recompute: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """Sublayer ``i``'s input short of its last phase-2 merge: ``(out, lse, last, k)``, with ``last``
        the source still to merge under the ``k``-th pending query (None: ``out`` is the input)."""

    def _recomputes(self) -> bool:
        """Whether this call's phase 1 is kept for a recompute in backward (Block's ``recompute``)."""
        return False

    # ------------------------------------------------------------------ helpers

    def _recorded_input(self, state: ResidualState, i: int) -> Tensor:
        """``h_i`` by the plain path, with its depth weights recorded."""
        out, lse, last, k = self._merge_all_but_last(state, i, recompute=False)
        if last is not None:
            out, _ = ops.phase2(out, lse, last, state._pending.queries[k], self.eps)
        seen = state.sources + ([state.partial] if state.partial is not None else [])
        diagnostics.record(self, state, i, seen)
        return out

    def _phase1_result(
        self, state: ResidualState, i: int, group: int, recompute: bool
    ) -> tuple[Tensor, Tensor, int]:
        """Sublayer ``i``'s phase-1 ``(out [B, T, d], lse [B, T])`` and its index among the pending ones,
        running phase 1 for ``i`` .. the end of its group of ``group`` sublayers when it has not run yet."""
        pending = state._pending
        k = -1 if pending is None else i - pending.first
        if pending is None or not 0 <= k < len(pending.outs) or pending.outs[k] is None:
            pending = self._phase1(state, i, min(i - i % group + group, self.num_sublayers), recompute)
            k = 0
        out, lse = pending.outs[k], pending.lse[k]
        pending.outs[k] = None  # let it die once used
        return out, lse, k

    def _phase1(self, state: ResidualState, i: int, end: int, recompute: bool) -> _Pending:
        queries = self._queries(state, i, end)
        outs, lse = ops.phase1(state.sources, queries, self.eps)
        holder = _BlockRecompute(list(state.sources), queries.detach(), self.eps) if recompute else None
        state._pending = _Pending(i, list(outs), lse, queries.unbind(0), len(state.sources), holder)
        return state._pending

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


class FullAttnRes(_AttnRes):
    """Full AttnRes: sublayer ``i`` attends over every earlier output ``v_0 .. v_i`` (``eps``: the key
    RMSNorm epsilon).

    ``full_group``: phase 1 runs once per group of this many consecutive sublayers (over the outputs
    completed before the group) and each later output of the group is merged by phase 2, one
    online-softmax step per output: the same softmax, with the sources read once per group instead of
    once per sublayer. 1: a direct softmax per sublayer; above 2 each merge beyond the first keeps one
    more ``[B, T, d]`` tensor for backward. ``fuse_norm``: see :class:`BlockAttnRes`.
    """

    mode = "full"

    def __init__(
        self, dim: int, num_sublayers: int, eps: float = 1e-6, full_group: int = 2, fuse_norm: bool = True
    ) -> None:
        if full_group < 1:
            raise ValueError(f"full_group must be >= 1, got {full_group}")
        super().__init__(dim, num_sublayers, num_sublayers, 1, eps, fuse_norm)
        self.full_group = full_group

    def _merge_all_but_last(
        self, state: ResidualState, i: int, recompute: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        # phase 1 over the outputs completed before the group (or before the first sublayer of it this
        # module owns), then one merge per output completed since
        out, lse, k = self._phase1_result(state, i, self.full_group, recompute)
        query = state._pending.queries[k]
        later = state.sources[state._pending.num_sources:]
        for v in later[:-1]:
            out, lse = ops.phase2(out, lse, v, query, self.eps)
        return out, lse, (later[-1] if later else None), k

    def output(self, state: ResidualState, i: int, v: Tensor) -> None:
        if v.dtype != state.sources[0].dtype:  # the stream's dtype (see _AttnRes)
            v = v.to(state.sources[0].dtype)
        state.sources.append(v)  # the group's phase-1 results stay pending


class BlockAttnRes(_AttnRes):
    """Block AttnRes: ``num_blocks`` blocks of ``num_sublayers / num_blocks`` sublayers; sublayer ``i``
    attends over the embedding, the summaries (sums) of the completed blocks and the partial summary of
    its own block (a decoder also wants the block size even, so that a block holds whole decoder
    layers: its config checks that). ``eps``: the key RMSNorm epsilon.

    At the first sublayer of a block (or the first one a stage owns) phase 1 reads the completed
    sources once for the queries of all remaining sublayers of the block; each sublayer then merges its
    phase-1 result with the partial summary in phase 2.

    ``fuse_norm``: where the device has the kernel (CUDA), a sublayer's phase-2 step and its input
    RMSNorm run as one op (:func:`attnres.ops.phase2_norm`): ``h`` is never written, and backward keeps
    the phase-1 output instead of ``h`` and the norm's fp32 copy of it.
    ``recompute``: keep only the partial summary of each sublayer for backward and run phase 1 again
    once per block in backward (:mod:`attnres.residual.state`), so that Block AttnRes keeps no more
    activations than the standard residual apart from its sources. Bit-identical gradients; eager mode
    only (under ``torch.compile``, without gradients or while recording, :meth:`input` takes the plain
    path).
    """

    mode = "block"

    def __init__(
        self, dim: int, num_sublayers: int, num_blocks: int = 8, eps: float = 1e-6, recompute: bool = False,
        fuse_norm: bool = True,
    ) -> None:
        if num_blocks < 1 or num_sublayers % num_blocks != 0:
            divisors = [n for n in range(1, num_sublayers + 1) if num_sublayers % n == 0]
            raise ValueError(
                f"num_blocks={num_blocks} must divide the {num_sublayers} sublayers "
                f"(valid: {', '.join(map(str, divisors))})"
            )
        super().__init__(dim, num_sublayers, num_blocks, num_sublayers // num_blocks, eps, fuse_norm)
        self.recompute = recompute

    def extra_repr(self) -> str:
        extra = ", recompute=True" if self.recompute else ""
        return f"{super().extra_repr()}, num_blocks={self.num_blocks}, block_size={self.block_size}{extra}"

    def _recomputes(self) -> bool:
        return self.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _defers_add(self, state: ResidualState, i: int, v: Tensor) -> bool:
        """Whether sublayer ``i``'s output is added to the partial summary by the next sublayer's input,
        in its phase-2 + norm kernel (:func:`attnres.ops.phase2_norm_add`): inside a block, where that
        input takes the fused path (``fuse_norm`` on a device with the kernels, no ``recompute``, not
        recording) and ``v`` has the stream's dtype (bf16 weights; under autocast it is narrower); under
        torch.compile only from :data:`DEFERRED_ADD_COMPILE_MIN_TORCH` on, and not where phase 2 runs as torch
        code (:func:`~attnres.residual.state.phase2_in_torch`)."""
        return (
            (i + 1) % self.block_size != 0 and self.fuse_norm and v.dtype == state.sources[0].dtype
            and state.records is None and not self._recomputes() and ops.fused_add(v.device)
            and not phase2_in_torch() and (_DEFERRED_ADD_COMPILES or not torch.compiler.is_compiling())
        )

    def _merge_all_but_last(
        self, state: ResidualState, i: int, recompute: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        # phase 1 over the block summaries, then the partial summary (with an add pending: the summary
        # before it, which input() does not use then)
        if state._partial is None and i % self.block_size != 0:
            raise RuntimeError(f"sublayer {i} is inside a block but no partial summary was handed back")
        out, lse, k = self._phase1_result(state, i, self.block_size, recompute)
        return out, lse, state._partial, k

    def output(self, state: ResidualState, i: int, v: Tensor) -> None:
        dtype = state.sources[0].dtype  # the stream's (see _AttnRes)
        if torch.promote_types(dtype, v.dtype) != dtype:  # wider than the stream: rounded to it first
            v = v.to(dtype)
        # a narrower v (bf16 under autocast) is added by promotion, one kernel (a cast first would write
        # and read v in fp32 once more: 2 fp32 [B, T, d] passes per sublayer)
        if state.partial is None:
            state.set_partial(v.to(dtype))
        elif self._defers_add(state, i, v):
            state.defer_add(v)
        else:
            state.set_partial(state.partial + v)
        if (i + 1) % self.block_size == 0:  # the block is complete: its summary becomes a source
            state.sources.append(state.partial)
            state.set_partial(None)
            state._pending = None

