"""Several projections of one input as one GEMM.

A layer that projects the same ``x`` by several ``nn.Linear`` (KDA's q, k, v, decay, beta and gate
inputs; MLA's query and latent; SwiGLU's gate and up) would run one GEMM per projection, read ``x`` (and,
under autocast, cast it) once per projection, and in backward write one ``[..., d]`` input gradient per
projection and add them up. :func:`joint_linear` concatenates the weights along the output dimension at
each call (a copy the size of the weights, not of the activations), runs one ``F.linear`` and splits
its output: one GEMM, one read and cast of ``x``, and in backward one input-gradient GEMM over the
gradients of the parts put side by side. The modules keep their own ``nn.Linear`` (checkpoints, init,
optimizer groups and FSDP unchanged). The parts are column slices of one ``[..., sum(out)]`` tensor,
strided views that PyTorch's ops, Inductor and fla's kernels read in place.

The joint output's rows are padded to a multiple of ``ALIGN`` columns (zero weight rows, computed and
dropped): Triton specialises an integer argument divisible by 16 and only then vectorises loads along a
row, so a row stride such as KDA's 3 x 1024 + 128 + 8 + 128 = 3336 at `medium` made fla's short conv read
its q, k, v views element by element (H100, eager `medium` step: its forward 12.2 ms against 5.8 ms on
contiguous inputs in session 22; 5.77 ms with the padding in session 23).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ALIGN", "joint_linear"]

ALIGN = 16  # columns: the joint output's row stride is a multiple of this (16 bf16 = 32 bytes)


def joint_linear(x: Tensor, *linears: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(linear(x) for linear in linears)`` as one GEMM (same values up to the GEMM's summation
    order). ``x [..., in]``; every linear ``in -> out_i``; returns views ``[..., out_i]`` of one output,
    whose rows are ``sum(out_i)`` rounded up to a multiple of :data:`ALIGN`. Put wide parts first: a
    part starting at a column that is a multiple of 8 starts 16-byte aligned in bf16."""
    if not linears:
        raise ValueError("joint_linear: give at least one nn.Linear")
    if len(linears) == 1:
        return (linears[0](x),)
    widths = [lin.out_features for lin in linears]
    pad = -sum(widths) % ALIGN
    first = linears[0].weight
    weights = [lin.weight for lin in linears] + ([first.new_zeros(pad, first.shape[1])] if pad else [])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears] + ([first.new_zeros(pad)] if pad else []))
    parts = F.linear(x, torch.cat(weights), bias).split(widths + ([pad] if pad else []), dim=-1)
    return parts[:len(linears)]
