"""RMSNorm computed in fp32 (the decoder's PreNorms, final norm, KDA head norm, MLA latent norm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnres.ops import rms_norm
from attnres.residual import DepthInput

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor | DepthInput) -> Tensor:
        """The norm of ``x [..., d]``. A :class:`DepthInput` (a sublayer input from the residual path,
        short of its last step) is finished here, merged with the norm, inside this module's forward so
        that FSDP has gathered ``weight``."""
        if isinstance(x, DepthInput):
            return x.normalized(self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
