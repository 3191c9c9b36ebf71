"""Multi-head Latent Attention (MLA), NoPE: Kimi Linear's global-attention layers.

``x -> q [H, nope + shared]``; ``x -> kv_a -> (latent c [r], shared key part k_s [shared])``;
``RMSNorm(c) -> kv_b -> per head (k_nope [nope], v [v])``; keys ``[k_nope, k_s]`` (``k_s`` is the
same for every head); causal softmax attention with scale ``1 / sqrt(nope + shared)``. No rotary
embedding anywhere: position comes from the causal mask and the KDA layers' recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.model.documents import DocumentMask
from attnres.model.norm import RMSNorm
from attnres.model.projections import joint_linear

__all__ = ["MultiHeadLatentAttention"]


class MultiHeadLatentAttention(nn.Module):
    """MLA with a compressed KV latent: ``[B, T, dim] -> [B, T, dim]``.

    ``cache``: a dict for this layer, filled and extended in place. It stores, per past token, the
    normalised latent ``[B, P, r]`` and the shared key part ``[B, P, shared]`` — not the expanded
    per-head keys and values. That is ``r + shared`` numbers per token and layer (576 at the 48B shape)
    instead of ``H * (nope + shared + v)`` (10240): the point of MLA. The price is re-expanding the
    cached latent through ``kv_b`` at every step; absorbing ``kv_b`` into the query and output
    projections would avoid it, an inference optimisation we leave out for readability.

    ``documents`` (packed training windows, :class:`attnres.model.documents.DocumentMask`): attention
    within each document only, through SDPA with the mask's block-diagonal causal boolean mask. Why not
    flex attention: SDPA with a boolean mask runs the same code on CPU (where the tests compare against
    documents run alone) and CUDA (the memory-efficient kernel), with and without ``torch.compile``;
    flex attention would skip the fully masked blocks (fewer FLOPs with many short documents) but needs
    ``torch.compile`` and a block mask built per batch. MLA is one layer in four; measure before
    switching.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_nope_dim: int, qk_shared_dim: int, v_head_dim: int,
        kv_rank: int, norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_heads, self.nope, self.shared, self.v_dim = num_heads, qk_nope_dim, qk_shared_dim, v_head_dim
        self.kv_rank = kv_rank
        self.q_proj = nn.Linear(dim, num_heads * (qk_nope_dim + qk_shared_dim), bias=False)
        self.kv_a_proj = nn.Linear(dim, kv_rank + qk_shared_dim, bias=False)
        self.kv_a_norm = RMSNorm(kv_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_rank, num_heads * (qk_nope_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, dim, bias=False)
        self.scale = (qk_nope_dim + qk_shared_dim) ** -0.5

    def forward(self, x: Tensor, cache: dict | None = None, documents: DocumentMask | None = None) -> Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        if documents is not None and (cache is not None or documents.attn_mask is None):
            raise ValueError("MultiHeadLatentAttention: documents need no cache (training windows) and a "
                             "DocumentMask built with attention=True")
        q, kv_a = joint_linear(x, self.q_proj, self.kv_a_proj)  # one GEMM for both
        q = q.unflatten(-1, (H, self.nope + self.shared)).transpose(1, 2)  # [B, H, T, dq]
        latent, k_shared = kv_a.split([self.kv_rank, self.shared], dim=-1)
        latent = self.kv_a_norm(latent)
        past = 0
        if cache is not None:
            if "latent" in cache:
                past = cache["latent"].shape[1]
                latent = torch.cat([cache["latent"], latent], dim=1)
                k_shared = torch.cat([cache["k_shared"], k_shared], dim=1)
            # k_shared is a column view of the joint projection: a copy, or the cache would keep all of it
            cache["latent"], cache["k_shared"] = latent.detach(), k_shared.detach().contiguous()
        S = latent.shape[1]  # past + T keys
        kv = self.kv_b_proj(latent).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_shared.unsqueeze(1).expand(B, H, S, self.shared)], dim=-1)
        if documents is not None:  # [B, 1, T, T]: same document and causal
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.attn_mask, scale=self.scale)
        elif past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))
