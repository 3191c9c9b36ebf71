"""The decoder's configuration: one typed dataclass and a registry of named presets.

``get_config("tiny", residual="full")`` builds a preset with overrides; every field is checked in
``__post_init__`` and a bad value raises ``ValueError`` naming the field and the valid values.
Parameter and FLOP counts are computed here, from the config alone (no model needed), so the
training loop can report MFU and ``attnres info`` can describe a 48B model without building it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from attnres.residual import RESIDUAL_MODES

TOKEN_MIXERS: tuple[str, ...] = ("hybrid", "kda", "mla")
KDA_CHUNK_SIZES: tuple[int, ...] = (16, 32, 64)
KDA_BACKENDS = ("auto", "torch", "fla")


def valid_num_blocks(num_sublayers: int) -> list[int]:
    """Block counts that divide ``num_sublayers`` into blocks of an even size (whole decoder layers)."""
    return [n for n in range(1, num_sublayers + 1) if num_sublayers % n == 0 and num_sublayers // n % 2 == 0]


@dataclass
class Config:
    """A Kimi-Linear-style decoder: KDA / MLA token mixers, dense or MoE SwiGLU channel mixers, and a
    pluggable residual path (standard, Full AttnRes, Block AttnRes).
    See Kimi Linear (Kimi Team 2025) and its released config (moonshotai/Kimi-Linear-48B-A3B).

    Each decoder layer holds two sublayers (token mixer, channel mixer), so the residual path has
    ``2 * num_layers`` sublayers.

    Each field's docstring is also its help in ``attnres fit --help`` (``--model.config.<field>``);
    ``configs/model/<preset>.yaml`` hold :data:`PRESETS` as whole ``model.config`` blocks.
    """

    # ---- identity and sizes
    name: str = "custom"
    """Preset name (informational)."""
    vocab_size: int = 264
    """Vocabulary size (embedding rows and LM-head outputs)."""
    max_seq_len: int = 256
    """Longest sequence the training loop feeds (the model has no positional table; used for FLOPs)."""
    dim: int = 128
    """Hidden size ``d``."""
    num_layers: int = 4
    """Decoder layers (each = token mixer + channel mixer)."""

    # ---- residual path
    residual: Literal["standard", "full", "block"] = "block"
    """Residual mode: ``standard`` (baseline sum), ``full`` (Full AttnRes), ``block`` (Block AttnRes)."""
    num_blocks: int | None = None
    """Blocks of Block AttnRes; must divide ``2 * num_layers`` into even-sized blocks. ``None``: 8 when
    valid, else the largest valid count below 8 (resolved at construction)."""
    residual_eps: float = 1e-6
    """Epsilon of the depth-attention key RMSNorm."""
    full_group: int = 2
    """Full AttnRes: sublayers per phase-1 group (phase 1 reads the completed outputs once per group,
    then each later output of the group is merged by a phase-2 step; the same softmax). 1: a direct
    softmax per sublayer; above 2, each merge beyond the first keeps one more activation for backward."""
    residual_recompute: bool = False
    """Block AttnRes: keep only each sublayer's partial summary for backward and recompute phase 1 once
    per block in backward (with phase 2 and the sublayer's input norm), so the residual path keeps no
    more activations than the standard one apart from the block summaries. Eager training only (plain
    path under ``torch.compile``); ignored by the other modes."""

    residual_fuse_norm: bool = True
    """Full and Block AttnRes on CUDA: run each sublayer's last phase-2 step and its input RMSNorm as one
    kernel each way (``attnres.ops.phase2_norm``: the sublayer input ``h`` is never written, and backward
    keeps the phase-1 output instead of ``h`` and the norm's fp32 copy). False: the separate ops (for
    comparisons; the results agree to rounding)."""

    # ---- token mixers
    token_mixer: Literal["hybrid", "kda", "mla"] = "hybrid"
    """``hybrid`` (KDA, MLA every ``full_attn_every``-th layer or at ``mla_layers``), ``kda`` or ``mla``."""
    full_attn_every: int = 4
    """Hybrid pattern: layer ``i`` is MLA when ``(i + 1) % full_attn_every == 0`` (3 KDA : 1 MLA for 4)."""
    mla_layers: list[int] | None = None
    """Hybrid pattern as explicit 0-based MLA layer indices (overrides ``full_attn_every``)."""
    kda_head_dim: int = 32
    """KDA key/value head dim (128 in Kimi Linear)."""
    kda_num_heads: int | None = None
    """KDA heads; ``None``: ``dim // kda_head_dim`` (then ``kda_head_dim`` must divide ``dim``)."""
    kda_conv_size: int = 4
    """Kernel of KDA's causal depthwise short convolutions."""
    kda_chunk_size: int = 16
    """Chunk length of the CPU chunkwise KDA (16, 32 or 64; fla on CUDA uses its own 64)."""
    kda_backend: str = "auto"
    """KDA kernels: ``auto`` (fla's Triton kernels on CUDA when fla is installed, else ours), ``torch``
    (our chunked PyTorch code everywhere: no Triton autotuning, which takes minutes per new shape on a
    fresh machine) or ``fla`` (always fla; an error where it cannot run)."""
    fla_fused: bool = True
    """Where fla runs (``kda_backend``), eager forwards also take fla's fused kernels around KDA (the
    in-kernel q/k norms, decay and beta sigmoid, the gated head norm), in the dense and shared-expert
    SwiGLU MLPs, the decoder's RMSNorms and its loss, as fla's own model does: fewer kernels and no fp32
    copies kept for the backward. ``false``: fla's KDA kernel alone, with the plain PyTorch code around it
    (what ``torch.compile`` traces either way); the same math up to rounding."""
    mla_num_heads: int | None = None
    """MLA heads; ``None``: ``dim // mla_v_head_dim`` (then ``mla_v_head_dim`` must divide ``dim``)."""
    mla_qk_nope_dim: int = 32
    """Per-head key/query part produced from the latent (128 in Kimi Linear)."""
    mla_qk_shared_dim: int = 16
    """Key part shared by all heads, straight from ``x`` (64 in Kimi Linear; the "rope" part, here NoPE)."""
    mla_v_head_dim: int = 32
    """Per-head value dim (128 in Kimi Linear)."""
    mla_kv_rank: int = 64
    """Rank of the compressed KV latent (512 in Kimi Linear)."""

    # ---- channel mixers
    moe: bool = True
    """MoE channel mixers (False: dense SwiGLU everywhere, a Llama-like baseline)."""
    mlp_dim: int = 384
    """Intermediate size of the dense SwiGLU MLP (``moe=False``, and the first dense layers)."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Routed experts per token."""
    num_shared_experts: int = 1
    """Always-on shared experts (their intermediate size is ``expert_dim`` each)."""
    expert_dim: int = 128
    """Intermediate size of one expert."""
    first_dense_layers: int = 1
    """The first layers use the dense MLP instead of MoE (``first_k_dense_replace``)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the renormalised routing weights (2.446 in Kimi Linear)."""
    router_bias_update_rate: float = 1e-3
    """Step of the auxiliary-loss-free balancing bias: ``bias += rate * sign(mean load - load)``."""
    aux_loss_coef: float = 0.0
    """Coefficient of the sequence-level balance loss (0: off)."""

    # ---- misc
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm of the decoder (PreNorms, final norm, KDA head norm, MLA latent norm)."""
    init_std: float | None = None
    """Std of the normal init of the embedding and every projection (None: ``sqrt(2 / (5 * dim))``, the
    "small init" of GPT-NeoX and litgpt's pre-training, :attr:`weight_init_std`); the projections that
    write into the residual path use ``init_std / sqrt(2 * num_layers)``. The width-aware default keeps
    each projection's gain ``std * sqrt(dim)`` at ~0.63 at every width; a fixed 0.02 shrinks it to 0.32
    at dim 256, which cost the standard residual 0.10 nats at the study's ``s`` (litgpt's GPT given that
    init: 0.30, most of which Block AttnRes hid; ``benchmarks/results/audit``)."""
    embed_init_std: float | None = None
    """Std of the input embedding's normal init (None: the init std). Under the standard residual the
    embedding is one term of the sum every sublayer reads, so its scale sets how much the token identity
    weighs against the sublayers' outputs."""
    tie_embeddings: bool = False
    """Share the embedding and the LM head (Kimi Linear: untied)."""

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, valid: str) -> ValueError:
            return ValueError(f"Config.{field}={value!r} is invalid; valid: {valid}")

        for f in ("vocab_size", "max_seq_len", "dim", "num_layers", "kda_head_dim", "kda_conv_size",
                  "mla_qk_nope_dim", "mla_v_head_dim", "mla_kv_rank", "mlp_dim", "full_attn_every"):
            if int(getattr(self, f)) < 1:
                raise bad(f, getattr(self, f), "an integer >= 1")
        if self.mla_qk_shared_dim < 0:
            raise bad("mla_qk_shared_dim", self.mla_qk_shared_dim, "an integer >= 0")
        if self.residual not in RESIDUAL_MODES:
            raise bad("residual", self.residual, " | ".join(RESIDUAL_MODES))
        if self.num_blocks is None:
            self.num_blocks = max(n for n in valid_num_blocks(self.num_sublayers) if n <= 8)
        if self.residual == "block":
            valid = valid_num_blocks(self.num_sublayers)
            if self.num_blocks not in valid:
                raise bad("num_blocks", self.num_blocks,
                          f"{valid} for {self.num_sublayers} sublayers ({self.num_layers} layers; "
                          "the block size must divide the sublayers and be even)")
        if self.token_mixer not in TOKEN_MIXERS:
            raise bad("token_mixer", self.token_mixer, " | ".join(TOKEN_MIXERS))
        if self.mla_layers is not None:
            self.mla_layers = [int(i) for i in self.mla_layers]
            wrong = [i for i in self.mla_layers if not 0 <= i < self.num_layers]
            if wrong or len(set(self.mla_layers)) != len(self.mla_layers):
                raise bad("mla_layers", self.mla_layers,
                          f"distinct 0-based layer indices in [0, {self.num_layers})")
        if self.kda_num_heads is None and self.dim % self.kda_head_dim != 0:
            raise bad("kda_head_dim", self.kda_head_dim,
                      f"a divisor of dim={self.dim} (or set kda_num_heads explicitly)")
        if self.mla_num_heads is None and self.dim % self.mla_v_head_dim != 0:
            raise bad("mla_v_head_dim", self.mla_v_head_dim,
                      f"a divisor of dim={self.dim} (or set mla_num_heads explicitly)")
        for f in ("kda_num_heads", "mla_num_heads"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise bad(f, getattr(self, f), "None or an integer >= 1")
        if self.kda_chunk_size not in KDA_CHUNK_SIZES:
            raise bad("kda_chunk_size", self.kda_chunk_size, " | ".join(map(str, KDA_CHUNK_SIZES)))
        if self.full_group < 1:
            raise bad("full_group", self.full_group, "an integer >= 1")
        if self.kda_backend not in KDA_BACKENDS:
            raise bad("kda_backend", self.kda_backend, " | ".join(KDA_BACKENDS))
        if self.moe:
            if self.num_experts < 1:
                raise bad("num_experts", self.num_experts, "an integer >= 1")
            if not 1 <= self.top_k <= self.num_experts:
                raise bad("top_k", self.top_k, f"1 .. num_experts={self.num_experts}")
            if self.num_shared_experts < 0:
                raise bad("num_shared_experts", self.num_shared_experts, "an integer >= 0")
            if self.expert_dim < 1:
                raise bad("expert_dim", self.expert_dim, "an integer >= 1")
            if self.routed_scaling_factor <= 0:
                raise bad("routed_scaling_factor", self.routed_scaling_factor, "a float > 0")
            if self.router_bias_update_rate < 0:
                raise bad("router_bias_update_rate", self.router_bias_update_rate, "a float >= 0")
            if self.aux_loss_coef < 0:
                raise bad("aux_loss_coef", self.aux_loss_coef, "a float >= 0")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise bad("first_dense_layers", self.first_dense_layers, f"0 .. num_layers={self.num_layers}")
        for f in ("rms_norm_eps", "residual_eps"):
            if not getattr(self, f) > 0:
                raise bad(f, getattr(self, f), "a float > 0")
        for f, default in (("init_std", "sqrt(2 / (5 dim))"), ("embed_init_std", "the init std")):
            if getattr(self, f) is not None and not getattr(self, f) > 0:
                raise bad(f, getattr(self, f), f"a float > 0 or null ({default})")

    # ------------------------------------------------------------------ derived shape

    @property
    def weight_init_std(self) -> float:
        """The init std in use: ``init_std``, or ``sqrt(2 / (5 * dim))`` when it is None."""
        return self.init_std if self.init_std is not None else math.sqrt(2 / (5 * self.dim))

    @property
    def num_sublayers(self) -> int:
        """Sublayers of the residual path: two per decoder layer."""
        return 2 * self.num_layers

    @property
    def kda_heads(self) -> int:
        return self.kda_num_heads if self.kda_num_heads is not None else self.dim // self.kda_head_dim

    @property
    def mla_heads(self) -> int:
        return self.mla_num_heads if self.mla_num_heads is not None else self.dim // self.mla_v_head_dim

    @property
    def fused_backend(self) -> str:
        """The backend of the modules around KDA (norms, SwiGLU MLPs, loss): ``kda_backend`` while
        ``fla_fused``, else ``torch`` (their plain code)."""
        return self.kda_backend if self.fla_fused else "torch"

    def is_mla(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) is a global MLA layer (else KDA)."""
        if self.token_mixer != "hybrid":
            return self.token_mixer == "mla"
        if self.mla_layers is not None:
            return layer in self.mla_layers
        return (layer + 1) % self.full_attn_every == 0

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has an MoE channel mixer (else the dense SwiGLU MLP)."""
        return self.moe and layer >= self.first_dense_layers

    def layer_kinds(self) -> list[tuple[str, str]]:
        """``[(token mixer, channel mixer)]`` per layer, e.g. ``("kda", "moe")``."""
        return [("mla" if self.is_mla(i) else "kda", "moe" if self.is_moe(i) else "dense")
                for i in range(self.num_layers)]

    def layer_plan(self, layers: list[int] | None = None) -> str:
        """A table of the layers (all, or the given indices): token mixer, channel mixer, parameters."""
        rows = ["layer  mixer  mlp     params"]
        kinds = self.layer_kinds()
        for i in range(self.num_layers) if layers is None else layers:
            mixer, mlp = kinds[i]
            n = (self.mla_params() if mixer == "mla" else self.kda_params()) + 2 * self.dim
            n += self.moe_params() if mlp == "moe" else 3 * self.dim * self.mlp_dim
            detail = f"{self.top_k}/{self.num_experts}+{self.num_shared_experts}" if mlp == "moe" else ""
            rows.append(f"{i:>5}  {mixer:<5}  {mlp:<5}  {_human(n):>7}  {detail}".rstrip())
        return "\n".join(rows)

    # ------------------------------------------------------------------ parameter counts

    def kda_params(self) -> int:
        d, h, k = self.dim, self.kda_heads, self.kda_head_dim
        hk = h * k
        proj = 3 * d * hk + 3 * hk * self.kda_conv_size  # q, k, v projections + their short convs
        decay = d * k + k * hk + hk + h  # f_a, f_b (rank = head dim), dt_bias, A_log
        gate = d * k + k * hk + hk  # g_a, g_b (+ bias)
        return proj + decay + gate + d * h + k + hk * d  # + beta proj, head norm, o_proj

    def mla_params(self) -> int:
        d, h = self.dim, self.mla_heads
        nope, sh, v, r = self.mla_qk_nope_dim, self.mla_qk_shared_dim, self.mla_v_head_dim, self.mla_kv_rank
        return d * h * (nope + sh) + d * (r + sh) + r + r * h * (nope + v) + h * v * d

    def expert_params(self) -> int:
        """One SwiGLU expert (gate, up, down)."""
        return 3 * self.dim * self.expert_dim

    def moe_params(self, active: bool = False) -> int:
        routed = (self.top_k if active else self.num_experts) * self.expert_params()
        return routed + self.num_shared_experts * self.expert_params() + self.num_experts * self.dim

    def num_params(self, active: bool = False) -> int:
        """Parameter count. ``active=True``: the parameters one token uses in a forward pass — the
        ``top_k`` routed experts of each MoE layer instead of all, and not the input embedding
        (a row lookup, no compute); the LM head counts. Equals ``Decoder.num_parameters(active)``."""
        total = 0
        for mixer, mlp in self.layer_kinds():
            total += self.mla_params() if mixer == "mla" else self.kda_params()
            total += self.moe_params(active) if mlp == "moe" else 3 * self.dim * self.mlp_dim
            total += 2 * self.dim  # the two PreNorm weights
        if self.residual != "standard":
            total += 2 * self.dim * (self.num_sublayers + 1)  # pseudo-query + key-norm weight per query
        total += self.dim  # final norm
        head = self.vocab_size * self.dim
        embedding = 0 if (active or self.tie_embeddings) else self.vocab_size * self.dim
        return total + head + embedding

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len`` (default
        ``max_seq_len``): ``6 * active params`` for the matmuls plus the sequence-mixing terms.

        MLA: per layer ``6 * heads * (qk_dim + v_dim) * seq_len`` (PaLM's convention: the full
        ``T x T`` score matrix, no causal halving). KDA (chunkwise, chunk ``C``): per layer and head
        ``3 * (6 * K * V + 2 * C * (K + V))`` — state read by ``q``, state read by ``k`` for the delta,
        rank-1 state write, and the intra-chunk ``q k^T`` / ``A v`` products. Depth attention is
        ``O(sources * d)`` per sublayer and left out (under 0.1 % at the sizes we train).
        """
        t = self.max_seq_len if seq_len is None else seq_len
        flops = 6.0 * self.num_params(active=True)
        qk = self.mla_qk_nope_dim + self.mla_qk_shared_dim
        k = self.kda_head_dim
        c = min(self.kda_chunk_size, t)
        for mixer, _ in self.layer_kinds():
            if mixer == "mla":
                flops += 6.0 * self.mla_heads * (qk + self.mla_v_head_dim) * t
            else:
                flops += 3.0 * self.kda_heads * (6 * k * k + 2 * c * (k + k))  # V = K
        return flops

    def replace(self, **overrides: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU trains this in minutes: bytes (256) + up to 8 special tokens.
    "tiny": dict(
        vocab_size=264, max_seq_len=256, dim=128, num_layers=4, num_blocks=4,
        kda_head_dim=32, mla_v_head_dim=32, mla_qk_nope_dim=32, mla_qk_shared_dim=16, mla_kv_rank=64,
        mlp_dim=384, num_experts=8, top_k=2, num_shared_experts=1, expert_dim=128, first_dense_layers=1,
        kda_chunk_size=16,
    ),
    # One GPU: ~240M total, ~90M active.
    "small": dict(
        vocab_size=32768, max_seq_len=2048, dim=768, num_layers=16, num_blocks=8,
        kda_head_dim=128, mla_num_heads=12, mla_qk_nope_dim=64, mla_qk_shared_dim=32, mla_v_head_dim=64,
        mla_kv_rank=256, mlp_dim=2048, num_experts=16, top_k=2, num_shared_experts=1, expert_dim=256,
        first_dense_layers=1, routed_scaling_factor=1.0, kda_chunk_size=64,
    ),
    # ~1B total, ~0.3B active (the paper's scaling family uses 8 of 64 experts; we keep 4 of 32).
    "medium": dict(
        vocab_size=32768, max_seq_len=4096, dim=1024, num_layers=24, num_blocks=8,
        kda_head_dim=128, mla_num_heads=16, mla_qk_nope_dim=64, mla_qk_shared_dim=32, mla_v_head_dim=64,
        mla_kv_rank=256, mlp_dim=4096, num_experts=32, top_k=4, num_shared_experts=1, expert_dim=384,
        first_dense_layers=1, routed_scaling_factor=1.0, kda_chunk_size=64,
    ),
    # Kimi-Linear-48B-A3B (moonshotai/Kimi-Linear-48B-A3B-Instruct config.json): 27 layers, hidden 2304,
    # KDA 32 heads x 128, MLA at 1-based layers 4, 8, 12, 16, 20, 24, 27 (32 heads, nope 128 + 64 shared,
    # v 128, kv_lora_rank 512, no q LoRA), 256 experts (8 active) of 1024 + 1 shared, first_k_dense_replace 1
    # with intermediate 9216, routed_scaling_factor 2.446, rms_norm_eps 1e-5, vocab 163840, untied.
    # 54 sublayers admit 1, 3, 9 or 27 blocks; 9 (blocks of 3 layers) is nearest the default 8.
    "kimi-linear-48b-a3b": dict(
        vocab_size=163840, max_seq_len=4096, dim=2304, num_layers=27, num_blocks=9,
        mla_layers=[3, 7, 11, 15, 19, 23, 26],
        kda_head_dim=128, kda_num_heads=32, mla_num_heads=32, mla_qk_nope_dim=128, mla_qk_shared_dim=64,
        mla_v_head_dim=128, mla_kv_rank=512, mlp_dim=9216, num_experts=256, top_k=8, num_shared_experts=1,
        expert_dim=1024, first_dense_layers=1, routed_scaling_factor=2.446, rms_norm_eps=1e-5,
        kda_chunk_size=64,
    ),
}


def get_config(name: str, **overrides: Any) -> Config:
    """The preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    return Config(name=name, **{**PRESETS[name], **overrides})
