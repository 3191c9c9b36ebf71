"""Numbers logged during training that the Trainer does not give: MFU, depth-attention entropy,
router load balance, gradient norm per depth."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from attnres.hardware import PEAK_BF16_FLOPS, peak_flops  # noqa: F401 (re-exported)

# MFU uses the bf16 peak whatever the precision (fp32 runs report a lower MFU, as they should); on CPU
# MFU is not applicable and is not logged.
PEAK_FLOPS = PEAK_BF16_FLOPS


def on_host(value: float) -> Tensor:
    """A number for ``LightningModule.log`` in a training step, as a CPU tensor. Lightning turns a Python
    number into a tensor on the module's device (``torch.tensor(value, device=...)``): on a GPU a
    host-to-device copy that waits for every kernel queued so far, a host sync per logged number and step.
    A CPU tensor stays on the CPU."""
    return torch.tensor(float(value), dtype=torch.float32)


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
