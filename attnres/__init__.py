"""attnres: Attention Residuals (softmax attention over depth) for Kimi-Linear-style decoders."""

from attnres.ops import backend, depth_attention, phase1, phase2
from attnres.residual import (
    RESIDUAL_MODES,
    BlockAttnRes,
    DepthInput,
    DepthQuery,
    FullAttnRes,
    Residual,
    ResidualState,
    StandardResidual,
    make_residual,
)

__version__ = "0.1.0"
__all__ = [
    "RESIDUAL_MODES",
    "BlockAttnRes",
    "DepthInput",
    "DepthQuery",
    "FullAttnRes",
    "Residual",
    "ResidualState",
    "StandardResidual",
    "backend",
    "depth_attention",
    "make_residual",
    "phase1",
    "phase2",
]
