"""Hardware figures shared by the training metrics (MFU) and the benchmarks, and the torch release the
version gates of the model and residual paths compare against."""

from __future__ import annotations

import re

import torch

__all__ = ["PEAK_BF16_FLOPS", "TORCH_RELEASE", "peak_flops", "torch_at_least"]

# (major, minor) of the running torch as plain ints, parsed once: a gate read inside code that Dynamo
# traces must not build a TorchVersion there (torch 2.11's Dynamo cannot trace its str.__new__; H100,
# session 27), while a comparison of int tuples folds to a constant
# (a pre-release or nightly of 2.13 counts as 2.13; an unparsable version as (0, 0): every gate closed)
_RELEASE = re.match(r"(\d+)\.(\d+)", torch.__version__)
TORCH_RELEASE: tuple[int, int] = (int(_RELEASE[1]), int(_RELEASE[2])) if _RELEASE else (0, 0)


def torch_at_least(release: tuple[int, int]) -> bool:
    """Whether the running torch is ``release`` (major, minor) or newer; safe to call under torch.compile."""
    return tuple(release) <= TORCH_RELEASE


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by substring of
# ``torch.cuda.get_device_name``; the first match wins, so longer names come first. MFU uses the
# bf16 peak whatever the precision (fp32 runs report a lower MFU, as they should). On CPU MFU is
# not applicable and is not logged.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
