"""Where fla's Triton kernels run: the config's ``kda_backend`` switch (``auto`` | ``torch`` | ``fla``),
shared by the KDA layer, the decoder's norms and SwiGLU MLPs, and its loss (each takes fla's kernels in
eager forwards where fla runs, as fla's own model does)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["fla_available", "fla_runs", "require_fla"]


def fla_available() -> bool:
    """Whether fla's KDA kernels can be imported (fla-core and triton installed)."""
    try:
        return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None
    except ValueError:  # an already imported module object without a spec (a test's stand-in for fla)
        return True


def require_fla() -> None:
    """Raise a ModuleNotFoundError that says what to install when fla's kernels cannot be imported."""
    if not fla_available():
        raise ModuleNotFoundError(
            "kda_backend='fla' needs fla's KDA kernels (fla-core==0.6.0 with triton, GPU only): "
            "pip install 'attnres[gpu]', or set model.config.kda_backend to auto or torch"
        )


def fla_runs(backend: str, installed: bool, device: torch.device) -> bool:
    """Whether a module with ``backend`` (``auto`` | ``torch`` | ``fla``, the config's ``kda_backend``) runs
    fla's kernels on ``device``; ``installed``: :func:`fla_available`, looked up once by the module (a module
    search per forward would be host time on the hot path). ``fla`` without fla installed raises."""
    if backend == "torch":
        return False
    if backend == "fla":
        if not installed:
            require_fla()  # raises, saying what to install
        return True
    return device.type == "cuda" and installed
