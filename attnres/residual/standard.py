"""The standard residual: ``h_l = v_0 + v_1 + ... + v_{l-1}``, the baseline AttnRes replaces."""

from __future__ import annotations

from torch import Tensor

from attnres.residual.base import Residual
from attnres.residual.state import ResidualState


class StandardResidual(Residual):
    """The running sum of the embedding and every sublayer output (no parameters)."""

    mode = "standard"

    def __init__(self, dim: int, num_sublayers: int) -> None:
        super().__init__(dim, num_sublayers, num_blocks=0, block_size=0)

    def begin(
        self, embedding: Tensor, record: bool = False, query_cache: dict | None = None
    ) -> ResidualState:
        return ResidualState(hidden=embedding, query_cache=query_cache, records=[] if record else None)

    def input(self, state: ResidualState, i: int) -> Tensor:
        return state.hidden

    def output(self, state: ResidualState, i: int, v: Tensor) -> None:
        state.hidden = state.hidden + v

    def readout(self, state: ResidualState) -> Tensor:
        return state.hidden
