"""Reference math for depth attention: plain PyTorch, the ground truth for every op in ``csrc/``.

Notation (the Attention Residuals paper, Kimi Team 2026: Full and Block AttnRes). A *source* ``v`` is
a tensor ``[..., d]`` (``[B, T, d]`` or ``[N, d]``); all sources of one call share shape and dtype.
``rms(v) = sqrt(mean(v**2) + eps)`` over the last dim. A *query* is the product ``q = w * g`` of a
sublayer's pseudo-query ``w`` and its RMSNorm weight ``g``: the logit of source ``v`` is
``z = q . v / rms(v)``, so only the product enters (the gradient splits by the chain rule:
``dw = dq * g``, ``dg = dq * w``). Keys are normalised, values are the raw sources. Softmax and sums
run in fp32; outputs come back in the sources' dtype, log-sum-exps in fp32 (fp64 inputs compute and
return fp64 throughout).

Differentiable through autograd: these functions are also the backward reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["depth_attention", "depth_weights", "logits", "phase1", "phase2", "phase2_norm", "rms", "rms_norm"]


def _acc(t: Tensor) -> Tensor:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _no_autocast(t: Tensor):
    """Autocast would run the einsums (bmm) in bf16/fp16 whatever their fp32 inputs: switch it off."""
    return torch.autocast(t.device.type, enabled=False)


def rms(v: Tensor, eps: float) -> Tensor:
    """``[..., d] -> [...]``: root mean square over the last dim (fp32, or fp64 for fp64 inputs)."""
    return torch.sqrt(_acc(v).pow(2).mean(-1) + eps)


def logits(sources: Sequence[Tensor], queries: Tensor, eps: float) -> Tensor:
    """Logits ``z[s, i, ...] = q_s . v_i / rms(v_i)``: sources n x ``[..., d]``, queries ``[S, d]``
    -> ``[S, n, ...]`` fp32."""
    with _no_autocast(sources[0]):
        v = torch.stack([_acc(s) for s in sources])  # [n, ..., d]
        keys = v / rms(v, eps).unsqueeze(-1)
        return torch.einsum("n...d,sd->sn...", keys, queries.to(v.dtype))


def phase1(sources: Sequence[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Phase 1: S queries attend over the same n sources.

    sources: n x ``[..., d]``; queries: ``[S, d]``.
    Returns ``out [S, ..., d]`` (source dtype), the softmax-weighted sum of the sources per query,
    and ``lse [S, ...]`` (fp32), the log-sum-exp of the logits over the sources.
    """
    with _no_autocast(sources[0]):
        z = logits(sources, queries, eps)  # [S, n, ...]
        lse = torch.logsumexp(z, dim=1)
        weights = torch.exp(z - lse.unsqueeze(1))
        v = torch.stack([_acc(s) for s in sources])  # [n, ..., d]
        out = torch.einsum("sn...,n...d->s...d", weights, v)
        return out.to(sources[0].dtype), lse


def phase2(
    partial_out: Tensor, partial_lse: Tensor, partial: Tensor, query: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Phase 2: merge a phase-1 result with the partial summary ``p`` by one online-softmax step.

    partial_out: ``[..., d]`` (``o``, normalised over the completed sources), partial_lse: ``[...]``
    (``m``), partial: ``[..., d]`` (``p``), query: ``[d]``.
    ``z = q . p / rms(p)``, ``lse = log(e^m + e^z)``, ``h = e^(m - lse) o + e^(z - lse) p``.
    Returns ``(h [..., d], lse [...])``: exactly the direct softmax over the n+1 sources.
    """
    z = logits([partial], query.unsqueeze(0), eps)[0, 0]  # [...]
    m = partial_lse.to(z.dtype)
    lse = torch.logaddexp(m, z)
    a_o = torch.exp(m - lse).unsqueeze(-1)
    a_p = torch.exp(z - lse).unsqueeze(-1)
    out = a_o * _acc(partial_out) + a_p * _acc(partial)
    return out.to(partial.dtype), lse


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dim, computed in fp32 (fp64 for fp64
    inputs), returned in the dtype of ``x``: the decoder's RMSNorm."""
    with _no_autocast(x):
        xa = _acc(x)
        y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xa.dtype)
        return y.to(x.dtype)


def phase2_norm(
    partial_out: Tensor, partial_lse: Tensor, partial: Tensor, query: Tensor, weight: Tensor, eps: float,
    norm_eps: float,
) -> tuple[Tensor, Tensor]:
    """Phase 2 followed by the next sublayer's input RMSNorm: ``(rms_norm(h, weight, norm_eps), lse)``
    with ``(h, lse) = phase2(...)`` (``h`` in the partial's dtype, as phase 2 returns it)."""
    h, lse = phase2(partial_out, partial_lse, partial, query, eps)
    return rms_norm(h, weight, norm_eps), lse


def depth_attention(sources: Sequence[Tensor], query: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Direct softmax over depth for one query ``[d]``: sources n x ``[..., d]`` ->
    ``(out [..., d], lse [...])``."""
    out, lse = phase1(sources, query.unsqueeze(0), eps)
    return out[0], lse[0]


def depth_weights(sources: Sequence[Tensor], query: Tensor, eps: float) -> Tensor:
    """Softmax weights over the sources for one query: ``[n, ...]`` fp32 (for plots and analysis)."""
    return torch.softmax(logits(sources, query.unsqueeze(0), eps)[0], dim=0)
