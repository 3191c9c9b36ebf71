"""The shapes the end-to-end benchmark times: a :class:`Shape` is a model config (its residual mode set
per row), a batch and a sequence length.

``dense`` is the 0.95B Llama-like decoder of issue 8 (d 2048, 16 layers, 16 heads of 128, SwiGLU 5632,
vocab 32000, B 2, T 4096) built from our :class:`~attnres.model.Config` (see :func:`dense_config` for how
close our NoPE MLA comes to plain multi-head attention); ``medium`` is the Kimi-Linear-style preset
(KDA + MLA + MoE); ``kda-dense`` is the all-KDA dense decoder at fla's ``KDAForCausalLM`` shape (0.97B:
16 layers, d 2048, 16 KDA heads of 128, SwiGLU 5632, B 2, T 4096); ``small`` and the study's ``s`` and
``m`` at their training batches. ``quick`` swaps them for tiny shapes that run on a CPU in seconds (a
smoke test of every code path, not a measurement). :func:`residual_traffic` is what a shape's residual
path costs per step (depth-op calls and the fewest bytes they move).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnres.bench.peers import describe_fla_model, kda_dense_config
from attnres.model import Config, get_config, valid_num_blocks

__all__ = ["DENSE_NOTE", "STUDY_MODELS", "Shape", "default_shapes", "dense_config", "mha_equivalent_kv_rank",
           "residual_traffic", "study_config"]


def mha_equivalent_kv_rank(dim: int, heads: int, head_dim: int, multiple: int = 64) -> int:
    """The MLA latent rank ``r`` whose K/V projections (``d x r`` down, ``r x H(k + v)`` up) hold as many
    parameters, hence FLOPs per token, as plain MHA's ``2 x d x H x head_dim``, rounded to ``multiple``."""
    exact = 2 * dim * heads * head_dim / (dim + 1 + 2 * heads * head_dim)
    return max(multiple, int(round(exact / multiple)) * multiple)


def dense_config(
    dim: int = 2048, num_layers: int = 16, heads: int = 16, head_dim: int = 128, mlp_dim: int = 5632,
    vocab_size: int = 32000, seq_len: int = 4096, num_blocks: int = 8, kv_rank: int | None = None,
    residual: str = "standard",
) -> Config:
    """The issue's dense decoder from our Config: every layer MLA (``token_mixer="mla"``) + dense SwiGLU.

    Our MLA cannot express plain MHA exactly: keys and values come from a normalised low-rank latent
    (``kv_a -> RMSNorm -> kv_b``), and there is no rotary embedding (NoPE). The closest: 16 heads, query /
    key head dim 128 (``qk_nope 128``, no shared part), value head dim 128, and a latent rank chosen so
    the K/V projections have MHA's parameter count (:func:`mha_equivalent_kv_rank`: 1344 at d 2048), so
    the FLOPs per token and the total (0.95B) match the issue's model within 0.3 %.
    """
    return Config(
        name="dense", vocab_size=vocab_size, max_seq_len=seq_len, dim=dim, num_layers=num_layers,
        residual=residual, num_blocks=num_blocks, token_mixer="mla", moe=False, mlp_dim=mlp_dim,
        mla_num_heads=heads, mla_qk_nope_dim=head_dim, mla_qk_shared_dim=0, mla_v_head_dim=head_dim,
        mla_kv_rank=kv_rank if kv_rank is not None else mha_equivalent_kv_rank(dim, heads, head_dim),
        first_dense_layers=0,
    )


DENSE_NOTE = (
    "dense: plain MHA is not expressible by our NoPE MLA (K/V pass through a normalised low-rank latent); "
    "closest used: token_mixer=mla, 16 heads, qk_nope 128, qk_shared 0, v 128, kv_rank chosen so the K/V "
    "projections have MHA's parameter count (same FLOPs/token within 0.3 %); no RoPE."
)


@dataclass
class Shape:
    """One benchmark shape: a config (its ``residual`` is replaced per row), batch and sequence length.
    ``decode_context``: prompt length before the timed decode step; ``prefill_len``: prompt of the
    prefill rows; ``decode_batches`` / ``prefill_batches``: the batch sizes of those rows."""

    name: str
    config: Config
    batch: int
    seq_len: int
    decode_context: int = 512
    prefill_len: int = 2048
    decode_batches: tuple[int, ...] = (1, 64)
    prefill_batches: tuple[int, ...] = (1,)
    note: str = ""

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "residual"}
        d["params"] = self.config.num_params()
        d["active_params"] = self.config.num_params(active=True)
        d["flops_per_token"] = self.config.flops_per_token(self.seq_len)
        peer = describe_fla_model(self.config)
        if peer is not None:  # fla's KDAForCausalLM at this shape: its KDAConfig and parameter count
            d["fla_model"] = peer
        return d


def default_shapes(quick: bool, num_blocks: int = 8) -> dict[str, Shape]:
    """``dense`` and ``medium`` (the issue's shapes), or their tiny CPU stand-ins when ``quick`` (4 layers,
    so ``num_blocks`` is lowered to the nearest valid count, 4)."""
    if quick:
        n = max(v for v in valid_num_blocks(8) if v <= max(num_blocks, 1))
        dense = dense_config(dim=64, num_layers=4, heads=2, head_dim=32, mlp_dim=128, vocab_size=264,
                             seq_len=32, num_blocks=n, kv_rank=32)
        medium = get_config("tiny", num_blocks=n, max_seq_len=32, dim=64, kda_head_dim=16,
                            mla_v_head_dim=16, mla_qk_nope_dim=16, mla_qk_shared_dim=8, mla_kv_rank=32,
                            expert_dim=32, mlp_dim=128)
        # 4 KDA heads of 64: fla's kernels have autotune results for it in the shipped archive
        # (lightning_modules/autotune), so the GPU test of this shape starts fast
        kda = kda_dense_config(dim=256, num_layers=4, heads=4, head_dim=64, mlp_dim=512, vocab_size=264,
                               seq_len=32, num_blocks=n, chunk_size=16)
        small = dict(decode_context=8, prefill_len=16, decode_batches=(1, 4))
        return {
            "dense": Shape("dense", dense, 2, 32, **small, note="quick (CPU smoke) stand-in for dense"),
            "medium": Shape("medium", medium, 2, 32, **small, note="quick (CPU smoke) stand-in for medium"),
            "kda-dense": Shape("kda-dense", kda, 2, 32, **small,
                               note="quick (CPU smoke) stand-in for kda-dense"),
        }
    medium = get_config("medium", num_blocks=num_blocks)
    small = get_config("small", num_blocks=num_blocks, max_seq_len=2048)
    return {
        "dense": Shape("dense", dense_config(num_blocks=num_blocks), 2, 4096, note=DENSE_NOTE),
        "medium": Shape("medium", medium, 2, 4096, note="the medium preset (Kimi-Linear style: KDA/MLA/MoE)"),
        "kda-dense": Shape("kda-dense", kda_dense_config(num_blocks=num_blocks), 2, 4096,
                           note="all-KDA dense decoder at fla's KDAForCausalLM shape (peer impl fla-model)"),
        "small": Shape("small", small, 16, 2048,
                       note="the small preset at configs/model/small.yaml's batch (16 x 2048 tokens)"),
        **{name: Shape(name, study_config(name, num_blocks), 32, 1024,
                       note=f"the study's {name} (configs/study/model/{name}.yaml, vocab 8192), its batch")
           for name in ("s", "m")},
    }


STUDY_MODELS = Path(__file__).resolve().parents[2] / "configs" / "study" / "model"


def study_config(name: str, num_blocks: int = 8, vocab_size: int = 8192) -> Config:
    """The model of the study's size ``name`` (its YAML's ``model.config`` fields) as a Config;
    ``kda_backend`` is left to pick fla where it runs."""
    import yaml

    fields = yaml.safe_load((STUDY_MODELS / f"{name}.yaml").read_text())["model"]["config"]
    fields = {k: v for k, v in fields.items() if k != "kda_backend"}
    return Config(**{**fields, "vocab_size": vocab_size, "num_blocks": num_blocks})


def residual_traffic(config: Config, batch: int, seq_len: int, itemsize: int = 2) -> dict[str, Any]:
    """What the residual path costs per training step as :mod:`attnres.residual` runs it (unfused):
    depth-op calls per forward and the fewest bytes they move (each input read once, each output
    written once; backward counted as twice the forward), plus the bytes of the stored sources (what
    the memory target allows). ``X`` = one ``[B, T, d]`` activation."""
    x = batch * seq_len * config.dim * itemsize
    L = config.num_sublayers
    mode = config.residual
    if mode == "standard":
        calls = {"add": L}
        fwd_x = 3 * L  # h = h + v: read two, write one
        sources = 0
        stored_partials = 0
    elif mode == "full":
        G = config.full_group
        groups = [(f, min(f + G, L)) for f in range(0, L, G)]
        # phase 1 of the group starting at sublayer f reads v_0 .. v_f (f + 1 sources) and writes one
        # output per sublayer of the group; sublayer f + j then merges j outputs by phase 2 (3 X each)
        phase1_x = sum(f + 1 + (e - f) for f, e in groups)
        phase2 = sum(j for f, e in groups for j in range(e - f))
        calls = {"phase1": len(groups), "phase2": phase2, "readout": 1}
        fwd_x = phase1_x + 3 * phase2 + (L + 1) + 1
        sources = L + 1  # v_0 .. v_L
        stored_partials = sum(max(0, j - 1) for f, e in groups for j in range(e - f))  # chained merges
    else:
        S = L // config.num_blocks
        N = L // S
        # phase 1 of block n (n = 1..N) reads the n completed sources once and writes one output per query
        phase1_x = sum(n + S for n in range(1, N + 1))
        phase2 = L - N  # every sublayer but the first of its block merges the partial summary
        adds = L - N  # partial = partial + v inside a block
        calls = {"phase1": N, "phase2": phase2, "partial_add": adds, "readout": 1}
        fwd_x = phase1_x + 3 * phase2 + 3 * adds + (N + 1) + 1
        sources = N + 1  # b_0 .. b_N
        stored_partials = phase2  # each phase-2 call saves its partial summary for backward
    step_bytes = 3 * fwd_x * x  # forward + a backward of about twice the forward
    return {
        "activation_bytes": x,
        "calls_per_forward": calls,
        "calls_per_step": 2 * sum(calls.values()),
        "fwd_bytes": fwd_x * x,
        "step_bytes": step_bytes,
        "source_bytes": sources * x,
        "saved_partial_bytes": stored_partials * x,
    }
