"""Numbers logged during training that the Trainer does not give: MFU, depth-attention entropy,
router load balance, gradient norm per depth."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by substring of
# ``torch.cuda.get_device_name``; the first match wins, so longer names come first. MFU uses the
# bf16 peak whatever the precision (fp32 runs report a lower MFU, as they should). On CPU MFU is
# not applicable and is not logged.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
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
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def depth_entropy(matrix: Tensor) -> Tensor:
    """Entropy (nats) of each column of a depth-attention matrix ``[sources, sublayers + 1]``
    (NaN entries: sources a column does not attend to) -> ``[sublayers + 1]``. Uniform weights over
    ``n`` sources give ``log n``; a one-hot column gives 0."""
    p = torch.nan_to_num(matrix.double(), nan=0.0)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(0)
    return ent.float()


def normalized_depth_entropy(matrix: Tensor) -> float:
    """Mean over columns of entropy / log(number of sources attended), in [0, 1] (1 = uniform).
    Columns with a single source are left out."""
    n = (~matrix.isnan()).sum(0)
    ent = depth_entropy(matrix)
    keep = n > 1
    if not keep.any():
        return float("nan")
    return float((ent[keep] / n[keep].double().log()).mean())


def load_balance(load: Tensor) -> float:
    """max / mean of the tokens routed to each expert (1 = perfectly balanced)."""
    load = load.double()
    return float(load.max() / load.mean().clamp_min(1e-12))


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def grad_norms_by_depth(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the gradient of each sublayer, keyed ``"<layer>.<part>"`` where ``part`` is the first
    name component after ``layers.<i>.`` with a ``_norm`` suffix dropped, so a sublayer's PreNorm counts
    with it (``3.attn`` = ``layers.3.attn.*`` + ``layers.3.attn_norm.*``), in depth order (the token
    mixer ``attn`` before the channel mixer ``mlp``). Parameters outside ``layers.<i>`` and without a
    gradient are skipped."""
    sq: dict[tuple[int, str], float] = {}
    for name, p in named_parameters:
        if p.grad is None:
            continue
        m = _LAYER.search(name)
        if m is None:
            continue
        part = name[m.end() :].split(".", 1)[0].removesuffix("_norm")
        key = (int(m.group(1)), part)
        sq[key] = sq.get(key, 0.0) + float(p.grad.detach().float().pow(2).sum())
    order = {"attn": 0, "mlp": 1}
    keys = sorted(sq, key=lambda k: (k[0], order.get(k[1], 2), k[1]))
    return {f"{i}.{part}": math.sqrt(sq[(i, part)]) for i, part in keys}
