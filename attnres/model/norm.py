"""RMSNorm computed in fp32 (the decoder's PreNorms, final norm, KDA head norm, MLA latent norm)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / rms(x) * weight`` over the last dim, in fp32, returned in the dtype of ``x``."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, via: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """The norm of ``x``; ``via(x, weight)``, when given, computes it instead (the residual path's
        recompute mode merges its last step into the norm: called here, inside this module's forward,
        so that FSDP has gathered ``weight``)."""
        return rms_norm(x, self.weight, self.eps) if via is None else via(x, self.weight)

    @property
    def rms_eps(self) -> float:
        """The epsilon of this plain fp32 ``x / rms(x) * weight``: its presence tells the residual path
        that it may fuse this norm into its last phase-2 step (:func:`attnres.ops.phase2_norm`)."""
        return self.eps

    def normalize(self, x: Tensor, weight: Tensor) -> Tensor:
        """This norm with ``weight`` in place of its parameter (for code that recomputes it, such as
        the residual path's ``recompute`` mode, which differentiates with respect to ``weight``)."""
        return rms_norm(x, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
