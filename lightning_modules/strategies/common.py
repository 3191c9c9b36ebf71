"""What the attnres strategies share: dtype names for their typed arguments and the peak-memory log."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_modules.metrics import on_host

__all__ = ["DTypeName", "log_peak_memory", "to_dtype"]

DTypeName = Literal["float32", "bfloat16", "float16"]


def to_dtype(name: str | None) -> torch.dtype | None:
    """``torch.<name>`` (e.g. ``"bfloat16"`` -> ``torch.bfloat16``), None for None."""
    return None if name is None else getattr(torch, name)


def log_peak_memory(strategy: Any) -> None:
    """Log ``train/peak_mem_gib``: the most CUDA memory this rank has allocated so far (CUDA only)."""
    if strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(strategy.root_device) / 2**30
        strategy.lightning_module.log(
            "train/peak_mem_gib", on_host(peak), on_step=True, on_epoch=False, reduce_fx="max"
        )
