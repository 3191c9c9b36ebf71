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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["joint_linear"]


def joint_linear(x: Tensor, *linears: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(linear(x) for linear in linears)`` as one GEMM (same values up to the GEMM's summation
    order). ``x [..., in]``; every linear ``in -> out_i``; returns views ``[..., out_i]`` of one output."""
    if not linears:
        raise ValueError("joint_linear: give at least one nn.Linear")
    if len(linears) == 1:
        return (linears[0](x),)
    weight = torch.cat([lin.weight for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears])
    return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)
