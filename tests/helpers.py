"""Helpers shared by the CPU and GPU tests of packed documents (``tests/test_documents.py`` and
``tests/gpu/test_documents_fla_gpu.py``): where the documents of a packed window are, and the packed
window against each document run alone."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def documents_of(segment_ids: Tensor) -> list[tuple[int, slice]]:
    """``(row, slice)`` of every document (contiguous run of one id) of ``segment_ids [B, T]``."""
    out = []
    for b, row in enumerate(segment_ids.cpu()):
        for s in row.unique():
            idx = (row == s).nonzero().flatten()
            out.append((b, slice(int(idx[0]), int(idx[-1]) + 1)))
    return out


def packed_and_alone(
    model: nn.Module, ids: Tensor, segment_ids: Tensor, w: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The logits ``[B, T, V]`` of the packed window ``ids [B, T]`` and of each document run alone (placed
    where it sits in the window), and the parameter gradients of ``(packed logits * w).sum()``; on return the
    model's ``.grad`` hold the gradients of the same objective over the documents run alone."""
    packed = model(ids, segment_ids=segment_ids).logits
    (packed * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone = torch.zeros_like(packed)
    total = 0.0
    for b, sl in documents_of(segment_ids):
        logits = model(ids[b:b + 1, sl]).logits[0]
        alone[b, sl] = logits.detach()
        total = total + (logits * w[b, sl]).sum()
    total.backward()
    return packed.detach(), alone, grads
