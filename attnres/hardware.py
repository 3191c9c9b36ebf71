"""Hardware figures shared by the training metrics (MFU) and the benchmarks."""

from __future__ import annotations

import torch

__all__ = ["PEAK_BF16_FLOPS", "peak_flops"]

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
