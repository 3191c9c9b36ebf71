"""The residual path of a PreNorm decoder: standard, Full AttnRes or Block AttnRes (one class each).

One interface (:class:`Residual`), driven by the decoder::

    state = residual.begin(embedding)           # v_0, [B, T, d]
    for i, (norm, mixer) in enumerate(sublayers):
        v = mixer(norm(residual.input(state, i)))
        residual.output(state, i, v)            # v_i, [B, T, d]
    x = residual.readout(state)                 # to the final norm and the LM head

:func:`make_residual` builds the one a config's ``residual`` names. Modules: ``state`` (the public
:class:`ResidualState`, the lazy :class:`DepthInput`, the fused last merge + norm and Block AttnRes'
recompute in backward), ``standard``, ``block`` (Full and Block AttnRes and their two-phase
bookkeeping), ``diagnostics`` (recorded depth weights).
"""

from __future__ import annotations

from attnres.residual.base import RESIDUAL_MODES, Residual, ResidualMode
from attnres.residual.block import BlockAttnRes, DepthQuery, FullAttnRes
from attnres.residual.diagnostics import depth_weight_matrix
from attnres.residual.standard import StandardResidual
from attnres.residual.state import DepthInput, ResidualState

__all__ = [
    "RESIDUAL_MODES",
    "BlockAttnRes",
    "DepthInput",
    "DepthQuery",
    "FullAttnRes",
    "Residual",
    "ResidualMode",
    "ResidualState",
    "StandardResidual",
    "depth_weight_matrix",
    "make_residual",
]


def make_residual(
    mode: ResidualMode | str, dim: int, num_sublayers: int, num_blocks: int = 8, eps: float = 1e-6, *,
    full_group: int = 2, recompute: bool = False, fuse_norm: bool = True,
) -> Residual:
    """The residual path ``mode`` (``"standard"``, ``"full"`` or ``"block"``) of ``num_sublayers``
    sublayers of width ``dim``. ``num_blocks`` (Block), ``eps`` (the key RMSNorm epsilon, AttnRes),
    ``full_group`` (Full), ``recompute`` (Block) and ``fuse_norm`` (AttnRes) go to the modes that use
    them: :class:`StandardResidual`, :class:`FullAttnRes`, :class:`BlockAttnRes`."""
    if mode == "standard":
        return StandardResidual(dim, num_sublayers)
    if mode == "full":
        return FullAttnRes(dim, num_sublayers, eps, full_group=full_group, fuse_norm=fuse_norm)
    if mode == "block":
        return BlockAttnRes(dim, num_sublayers, num_blocks, eps, recompute=recompute, fuse_norm=fuse_norm)
    raise ValueError(f"residual mode {mode!r} is unknown; valid modes: {', '.join(RESIDUAL_MODES)}")
