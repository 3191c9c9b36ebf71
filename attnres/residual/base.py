"""The interface every residual path implements, driven by the decoder one sublayer at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from torch import Tensor, nn

from attnres.residual.state import DepthInput, ResidualState

ResidualMode = Literal["standard", "full", "block"]
RESIDUAL_MODES: tuple[str, ...] = ("standard", "full", "block")


class Residual(nn.Module, ABC):
    """The residual path of ``num_sublayers`` sublayers of width ``dim``::

        state = residual.begin(embedding)             # v_0, [B, T, d]
        for i, (norm, mixer) in enumerate(sublayers):  # i = 0 .. L-1 (two per decoder layer)
            v = mixer(norm(residual.input(state, i)))   # the input h_i, through the sublayer's norm
            residual.output(state, i, v)                # hand back its output v_i [B, T, d]
        x = residual.readout(state)                     # to the final norm and the LM head

    ``mode`` names the subclass (:data:`RESIDUAL_MODES`); ``num_blocks`` and ``block_size`` describe
    where the completed sources are taken (0 for the standard residual, ``num_sublayers`` blocks of 1
    for Full AttnRes); ``recompute`` tells whether :meth:`input` defers work to backward.
    """

    mode: str
    recompute: bool = False

    def __init__(self, dim: int, num_sublayers: int, num_blocks: int, block_size: int) -> None:
        super().__init__()
        if num_sublayers < 1:
            raise ValueError(f"num_sublayers must be >= 1, got {num_sublayers}")
        self.dim = dim
        self.num_sublayers = num_sublayers
        self.num_blocks = num_blocks
        self.block_size = block_size

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_sublayers={self.num_sublayers}"

    @abstractmethod
    def begin(
        self, embedding: Tensor, record: bool = False, query_cache: dict | None = None
    ) -> ResidualState:
        """Start a forward pass from the token embedding ``v_0 [B, T, d]``. ``record``: keep the
        depth weights of every input (:mod:`attnres.residual.diagnostics`); ``query_cache``: a dict
        that keeps the depth queries between calls (decoding: the parameters do not change; pass a new
        dict whenever they may have, and none when gradients must reach the queries)."""

    @abstractmethod
    def input(self, state: ResidualState, i: int) -> Tensor | DepthInput:
        """The input ``h_i [B, T, d]`` of sublayer ``i``, or a :class:`DepthInput` that the sublayer's
        RMS norm finishes (the path's last step fused with the norm, or recomputed in backward)."""

    @abstractmethod
    def output(self, state: ResidualState, i: int, v: Tensor) -> None:
        """Hand back the output ``v_i [B, T, d]`` of sublayer ``i``."""

    @abstractmethod
    def readout(self, state: ResidualState) -> Tensor:
        """The final hidden state ``[B, T, d]`` (before the final norm)."""
