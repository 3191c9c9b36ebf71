"""RMSNorm computed in fp32 (the decoder's PreNorms, final norm, KDA head norm, MLA latent norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.model.backends import fla_available, fla_runs
from attnres.ops import rms_norm
from attnres.residual import DepthInput

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, in fp32, returned in the input dtype.

    ``backend`` (the decoder passes its config's ``fused_backend``; default ``torch``): where fla runs
    (:func:`attnres.model.backends.fla_runs`), eager forwards take fla's Triton RMSNorm (one kernel each way,
    fp32 inside; it keeps ``x`` and the row's ``1 / rms`` for the backward, not an fp32 copy of ``x``), as
    fla's own model does; under ``torch.compile`` Inductor fuses the plain code instead. ``native``: torch's
    ``F.rms_norm`` on ``x`` as it comes (the plain code calls it on an fp32 copy of ``x``; torch's fused CUDA
    kernel accumulates in fp32 itself), everywhere: the norm a model written in plain torch has (the
    benchmark's ``torch-standard`` baseline rows)."""

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = backend
        self.fla_installed = backend not in ("torch", "native") and fla_available()  # looked up once

    def forward(self, x: Tensor | DepthInput) -> Tensor:
        """The norm of ``x [..., d]``. A :class:`DepthInput` (a sublayer input from the residual path,
        short of its last step) is finished here, merged with the norm, inside this module's forward so
        that FSDP has gathered ``weight``."""
        if isinstance(x, DepthInput):
            return x.normalized(self.weight, self.eps)
        if self.backend == "native":
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
        if fla_runs(self.backend, self.fla_installed, x.device) and not torch.compiler.is_compiling():
            from fla.modules.norm.layernorm import rms_norm as fla_rms_norm

            return fla_rms_norm(x, self.weight, None, eps=self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
