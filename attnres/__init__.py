"""attnres: Attention Residuals (softmax attention over depth) for Kimi-Linear-style decoders."""

from attnres.ops import backend, depth_attention, phase1, phase2
from attnres.residual import RESIDUAL_MODES, DepthQuery, Residual, ResidualState

__version__ = "0.1.0"
__all__ = [
    "RESIDUAL_MODES",
    "DepthQuery",
    "Residual",
    "ResidualState",
    "backend",
    "depth_attention",
    "phase1",
    "phase2",
]
