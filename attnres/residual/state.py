"""What flows along depth: the state of one forward pass, and the lazy input a sublayer's norm finishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnres import ops
from attnres.residual.recompute import _BlockRecompute, _MergedNorm, merge_and_norm

if TYPE_CHECKING:
    from attnres.residual.block import _Pending


@dataclass(eq=False)
class ResidualState:
    """What flows along depth for one forward pass (and, under pipeline parallelism, across stages).

    ``sources``: the completed sources ``[B, T, d]`` each — standard: unused; Full: ``[v_0, v_1, ...]``;
    Block: the embedding and the block summaries ``[b_0, b_1, ...]``. ``partial``: the sum of the
    outputs of the current block so far (None at a block boundary). ``hidden``: the standard residual
    stream. These three are all a pipeline stage hands to the next.

    Optional, set by :meth:`Residual.begin`: ``query_cache`` (decoding: the depth queries by sublayer
    range, kept across calls) and ``records`` (one dict per sublayer input and the read-out: depth
    weights and source norms, :mod:`attnres.residual.diagnostics`).
    """

    sources: list[Tensor] = field(default_factory=list)
    partial: Tensor | None = None
    hidden: Tensor | None = None
    query_cache: dict[tuple[int, int], Tensor] | None = None
    records: list[dict] | None = None
    # the phase-1 results of the current block or group (Block / Full AttnRes only; not handed over:
    # a stage that receives the state runs phase 1 for its own sublayers)
    _pending: _Pending | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        """The device of the residual stream."""
        if self.hidden is not None:
            return self.hidden.device
        return (self.sources[0] if self.sources else self.partial).device


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

    def normalized(self, weight: Tensor, norm_eps: float) -> Tensor:
        """``rms_norm(h, weight [d], norm_eps) [..., d]``, in the dtype of the sources."""
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
        if self.last is None:
            return self.out
        return ops.phase2(self.out, self.lse, self.last, self.query, self.eps)[0]
