"""The peers from outside the project that the benchmarks time ours against, in the same process.

* **fla's op in our decoder** (:class:`FlaResidual`, :func:`use_fla_residual`): fla-core 0.6.0's
  ``fla.ops.attnres.fused_attnres`` in place of our two-phase ops, one direct softmax over every source
  per sublayer (``attnres bench e2e``, impl ``fla``);
* **fast-attnres** 2.1.0 (:func:`load_fast_attnres`): its ``attnres(values, query)`` as a peer in the op
  benchmark and, through :class:`FlaResidual`, in the decoder (impl ``fast-attnres``). Its package is also
  named ``attnres``, so it cannot be installed beside ours: install it into a directory of its own and
  name it with ``ATTNRES_FAST_ATTNRES_DIR``; it is loaded from there as the module ``fast_attnres``;
* **the op baselines** (:func:`op_baselines`): flash-attn-res 0.1.12's phase 1 and fla's
  ``fused_attnres`` per block (``attnres bench ops --device cuda``);
* **fla's own model** (issue 24, item 2): ``KDAForCausalLM`` (flash-linear-attention 0.6,
  transformers) at the shape of our decoder, with and without its ``attnres_block_size``
  (``attnres bench e2e``, impl ``fla-model``).

The matching shape (``kda-dense``, :func:`kda_dense_config`): every layer KDA, dense SwiGLU MLPs. fla's
model mixes in attention layers only through ``KDAConfig.attn``, which builds fla's ``Attention`` (RoPE
MHA/GQA, not MLA) on ``flash_attn``, which our GPU image does not have; so the peer is pure KDA
(``attn=None``) and so is our side (``token_mixer="kda"``, ``moe=False``). At d 2048, 16 heads of 128,
conv 4, vocab 32000 this is fla's default ``KDAConfig`` (whose ``hidden_ratio`` 4 gives intermediate 5632)
at 16 layers instead of 24.

Block size. fla's ``attnres_block_size`` counts sublayers (two per layer): sublayer ``j`` (``2 i`` the
attention of layer ``i``, ``2 i + 1`` its MLP) starts a new block when ``j % attnres_block_size == 0``,
and 1 is Full AttnRes. Ours: ``num_blocks`` blocks over the ``2 L`` sublayers, so
``attnres_block_size = 2 L / num_blocks`` (an even integer: our ``valid_num_blocks``); ``full`` is 1.
Both then see the same sources at every sublayer (the embedding, the completed block sums, the partial
sum of the current block) and read out over the embedding and the block sums.

Parameters. :func:`fla_kda_num_params` counts fla's model from its modeling code; at the matching shape it
equals our ``Config.num_params()`` exactly (the KDA layer has the same projections, low-rank gate
and decay of rank ``head_dim``, gate bias, per-head output norm, bias-free short convs; two PreNorm
weights per layer; an untied head; per AttnRes query a projection and a key-norm weight).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from attnres.model import Config, Decoder
from attnres.residual import BlockAttnRes, FullAttnRes, ResidualState

__all__ = [
    "FLA_MODEL_NOTE",
    "FlaModel",
    "FlaResidual",
    "build_fla_model",
    "describe_fla_model",
    "fla_block_size",
    "fla_kda_num_params",
    "fla_model_kwargs",
    "fla_model_mismatch",
    "fla_model_status",
    "fla_status",
    "kda_dense_config",
    "op_baselines",
    "use_fla_residual",
]

FLA_MODEL_NOTE = (
    "kda-dense vs fla's KDAForCausalLM (flash-linear-attention 0.6): same layers, hidden size, KDA heads x "
    "head dim, short-conv size, MLP width, vocab, untied head; parameter counts equal. Not matched: "
    "fla's KDAConfig.attn layers (RoPE MHA on flash-attn, not installed, and not MLA): pure KDA both sides; "
    "fla computes the decay gate, q/k L2 norm and beta sigmoid inside chunk_kda, ours in PyTorch before "
    "chunk_kda; fla's short convs run its Triton causal_conv1d, ours F.conv1d; fla's output norm is "
    "FusedRMSNormGated (norm x sigmoid gate in one kernel), ours RMSNorm then the gate in fp32; fla's "
    "defaults fuse_norm (residual add + RMSNorm), fuse_swiglu (SwiGLU + down projection) and, in training, "
    "fuse_cross_entropy -> FusedLinearCrossEntropyLoss (no [B, T, V] logits), ours materialises fp32 logits; "
    "fla shifts labels inside (T - 1 targets per row), ours takes aligned labels (T); fla's AttnRes is one "
    "fused_attnres softmax over the explicit sources per sublayer with the PreNorm folded in, ours two-phase "
    "(phase 1 per block, phase 2 merge + norm); fla's depth-key RMSNorm eps is its norm_eps (set to our "
    "rms_norm_eps), ours residual_eps; init differs (fla: Normal(0, initializer_range = our init std) "
    "everywhere, ours scales the output projections by 1/sqrt(2L)): no effect on step time."
)


def kda_dense_config(
    dim: int = 2048, num_layers: int = 16, heads: int = 16, head_dim: int = 128, mlp_dim: int = 5632,
    vocab_size: int = 32000, seq_len: int = 4096, num_blocks: int = 8, conv_size: int = 4,
    chunk_size: int = 64, residual: str = "standard",
) -> Config:
    """Our decoder at fla's ``KDAForCausalLM`` shape: every layer KDA (``heads x head_dim``, short convs of
    ``conv_size``), dense SwiGLU of ``mlp_dim``, untied head; ``chunk_size`` is our CPU path's only."""
    return Config(
        name="kda-dense", vocab_size=vocab_size, max_seq_len=seq_len, dim=dim, num_layers=num_layers,
        residual=residual, num_blocks=num_blocks, token_mixer="kda", moe=False, mlp_dim=mlp_dim,
        kda_head_dim=head_dim, kda_num_heads=heads, kda_conv_size=conv_size, kda_chunk_size=chunk_size,
        first_dense_layers=0, tie_embeddings=False,
    )


def fla_model_mismatch(cfg: Config) -> str | None:
    """None when fla's ``KDAForCausalLM`` can be built at ``cfg``'s shape, else why not."""
    if cfg.token_mixer != "kda":
        return (f"fla's KDAForCausalLM has no MLA layers (its attention layers are RoPE MHA on flash-attn): "
                f"needs token_mixer=kda, shape has {cfg.token_mixer}")
    if cfg.moe:
        return "fla's KDAForCausalLM has dense MLPs only: needs moe=false"
    return None


def fla_block_size(cfg: Config) -> int | None:
    """fla's ``attnres_block_size`` for ``cfg.residual``: None (standard), 1 (full), or the sublayers per
    block, ``2 * num_layers / num_blocks`` (block)."""
    if cfg.residual == "standard":
        return None
    if cfg.residual == "full":
        return 1
    return cfg.num_sublayers // cfg.num_blocks


def fla_model_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``fla.models.KDAConfig`` arguments of ``cfg``'s shape (residual mode included). fla's fusion
    switches are left at its defaults (on), as its users run it."""
    why = fla_model_mismatch(cfg)
    if why is not None:
        raise ValueError(why)
    return dict(
        hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers, num_heads=cfg.kda_heads,
        head_dim=cfg.kda_head_dim, expand_v=1.0, num_v_heads=None, use_short_conv=True,
        conv_size=cfg.kda_conv_size, intermediate_size=cfg.mlp_dim, hidden_act="swish",
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.weight_init_std, max_position_embeddings=cfg.max_seq_len, attn=None,
        attn_mode="chunk", attnres_block_size=fla_block_size(cfg), use_cache=False,
    )


def fla_kda_num_params(kw: Mapping[str, Any]) -> int:
    """Parameters of fla 0.6's ``KDAForCausalLM(KDAConfig(**kw))``, counted from its modeling code
    (``fla/models/kda/modeling_kda.py``, ``fla/layers/kda.py``, ``fla/modules/mlp.py``)."""
    d, L, H, K = kw["hidden_size"], kw["num_hidden_layers"], kw.get("num_heads", 16), kw.get("head_dim", 128)
    HV = kw.get("num_v_heads") or H
    V = int(K * kw.get("expand_v", 1.0))  # head_v_dim
    key, value, gate = H * K, HV * V, HV * K
    conv = kw.get("conv_size", 4) if kw.get("use_short_conv", True) else 0
    kda = (
        2 * d * key + d * value  # q_proj, k_proj, v_proj
        + (2 * key + value) * conv  # q/k/v ShortConvolution: depthwise nn.Conv1d, conv_bias=False
        + d * V + V * gate  # f_proj: Linear(d, head_v_dim), Linear(head_v_dim, gate_dim)
        + d * HV + HV + gate  # b_proj, A_log [HV], dt_bias [gate_dim]
        + d * V + V * value + value  # g_proj: Linear(d, head_v_dim), Linear(head_v_dim, value_dim, bias)
        + V  # o_norm: FusedRMSNormGated(head_v_dim) weight
        + value * d  # o_proj
    )
    inter = kw.get("intermediate_size")
    if inter is None:  # GatedMLP's rule: 2/3 of hidden_ratio * d, up to a multiple of 256
        inter = int(d * (kw.get("hidden_ratio") or 4) * 2 / 3)
        inter = 256 * ((inter + 255) // 256)
    layer = kda + 3 * d * inter + 2 * d  # + attn_norm, mlp_norm
    # per layer attn_res_proj, attn_res_norm, mlp_res_proj, mlp_res_norm; the model's res_proj, res_norm
    attnres = (4 * d * L + 2 * d) if kw.get("attnres_block_size") is not None else 0
    vocab = kw.get("vocab_size", 32000) * d
    return L * layer + attnres + d + vocab * (1 if kw.get("tie_word_embeddings", False) else 2)


def describe_fla_model(cfg: Config, modes: tuple[str, ...] = ("standard", "block", "full")) -> dict | None:
    """For a shape's JSON: per residual mode fla's ``KDAConfig`` arguments, its parameter count (analytic,
    :func:`fla_kda_num_params`) and ours (``Config.num_params``); None when no fla model matches."""
    if fla_model_mismatch(cfg) is not None:
        return None
    out: dict[str, Any] = {"note": FLA_MODEL_NOTE}
    for mode in modes:
        c = cfg.replace(residual=mode)
        kw = fla_model_kwargs(c)
        out[mode] = {"kda_config": kw, "params_analytic": fla_kda_num_params(kw),
                     "ours_params": c.num_params()}
    return out


def fla_model_status() -> str | None:
    """None when fla's ``KDAForCausalLM`` can run here, else why not."""
    if not torch.cuda.is_available():
        return "fla's KDAForCausalLM runs fla's Triton kernels: needs CUDA"
    try:
        from fla.models.kda import KDAConfig, KDAForCausalLM  # noqa: F401
    except Exception as exc:  # not installed, or transformers missing / of another major version
        return (f"fla.models not importable (needs flash-linear-attention 0.6 and transformers): "
                f"{type(exc).__name__}: {exc}")[:300]
    return None


@dataclass
class PeerOutput:
    """What the benchmark's training step reads from a model: ``loss`` and ``aux_loss`` (scalars)."""

    loss: Tensor
    aux_loss: Tensor


class FlaModel(nn.Module):
    """fla's ``KDAForCausalLM`` behind our ``Decoder``'s training call: ``forward(input_ids [B, T],
    labels [B, T]) -> .loss, .aux_loss`` (fla's transformers-style ``.loss``; no balance loss: 0)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> PeerOutput:
        loss = self.model(input_ids=input_ids, labels=labels, use_cache=False).loss
        return PeerOutput(loss=loss, aux_loss=torch.zeros((), device=loss.device, dtype=loss.dtype))


def build_fla_model(cfg: Config, device: torch.device | str, dtype: torch.dtype) -> FlaModel:
    """fla's ``KDAForCausalLM`` at ``cfg``'s shape and residual mode, built on ``device`` in ``dtype``."""
    from fla.models.kda import KDAConfig, KDAForCausalLM

    with torch.device(device):
        model = KDAForCausalLM(KDAConfig(**fla_model_kwargs(cfg)))
    return FlaModel(model.to(dtype=dtype))


# ----------------------------------------------------------------------------- fla's op in our decoder


class FlaResidual:
    """The residual path with fla's ``fused_attnres`` in place of our two-phase ops, mixed into
    :class:`FullAttnRes` / :class:`BlockAttnRes` (:func:`use_fla_residual` picks): each sublayer input
    (and the read-out) is one direct softmax over the explicit list of its sources — Full: every earlier
    output; Block: the block summaries plus the partial summary. Same parameters (``queries``), same
    math: fla's logit is ``w . RMSNorm_g(v)`` = ``(w * g) . v / rms(v)``.

    ``attnres_fn``: a function with ``fla.ops.attnres.fused_attnres``'s signature
    ``(query [d], residuals: list of [..., d], rms_weight [d], rms_eps=...) -> [..., d]``; default fla's.
    """

    def __init__(self, *args: Any, attnres_fn: Callable[..., Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if attnres_fn is None:
            from fla.ops.attnres import fused_attnres as attnres_fn
        self.attnres_fn = attnres_fn

    def _mix(self, sources: list[Tensor], name: str) -> Tensor:
        q = self.queries[name]
        return self.attnres_fn(q.weight, sources, q.norm_weight, rms_eps=self.eps)

    def input(self, state: ResidualState, i: int) -> Tensor:
        sources = state.sources + ([state.partial] if state.partial is not None else [])
        return self._mix(sources, str(i))

    def readout(self, state: ResidualState) -> Tensor:
        if state.partial is not None:
            raise RuntimeError("readout called in the middle of a block: hand back every sublayer's output")
        return self._mix(state.sources, "out")


class _FlaFullAttnRes(FlaResidual, FullAttnRes):
    pass


class _FlaBlockAttnRes(FlaResidual, BlockAttnRes):
    pass


def use_fla_residual(model: Decoder, attnres_fn: Callable[..., Tensor] | None = None) -> Decoder:
    """Replace ``model.residual`` in place by a :class:`FlaResidual` with the same parameters (the
    standard residual, which has none of fla's ops, stays)."""
    old = model.residual
    if old.mode == "standard":
        return model
    if old.mode == "full":
        new = _FlaFullAttnRes(old.dim, old.num_sublayers, old.eps, attnres_fn=attnres_fn)
    else:
        new = _FlaBlockAttnRes(old.dim, old.num_sublayers, old.num_blocks, old.eps, attnres_fn=attnres_fn)
    p = next(old.parameters(), None)
    if p is not None:
        new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(old.state_dict())
    model.residual = new
    return model


def fla_status() -> str | None:
    """None when fla's ``fused_attnres`` can run here, else why not."""
    if not torch.cuda.is_available():
        return "fla's fused_attnres is a Triton kernel: needs CUDA"
    try:
        from fla.ops.attnres import fused_attnres  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton/torch mismatch inside fla
        return f"fla.ops.attnres not importable: {type(exc).__name__}: {exc}"[:300]
    return None


# ----------------------------------------------------------------------------- fast-attnres

FAST_ATTNRES_ENV = "ATTNRES_FAST_ATTNRES_DIR"


def load_fast_attnres(path: str | Path | None = None) -> ModuleType:
    """fast-attnres's package, loaded from ``path`` (default ``$ATTNRES_FAST_ATTNRES_DIR``: a directory
    made by ``pip install --no-deps --target DIR fast-attnres==2.1.0``, holding ``attnres/__init__.py``)
    under the module name ``fast_attnres``, so that ``import attnres`` stays ours. Raises ImportError
    saying what to do when it is not there."""
    if "fast_attnres" in sys.modules:
        return sys.modules["fast_attnres"]
    where = path if path is not None else os.environ.get(FAST_ATTNRES_ENV)
    init = Path(where) / "attnres" / "__init__.py" if where else None
    if init is None or not init.is_file():
        raise ImportError(
            f"fast-attnres not found{f' in {where}' if where else ''}: its package is also named attnres, "
            "so install it apart (pip install --no-deps --target DIR fast-attnres==2.1.0) and set "
            f"{FAST_ATTNRES_ENV}=DIR")
    spec = importlib.util.spec_from_file_location("fast_attnres", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fast_attnres"] = module  # its relative imports resolve under this name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fast_attnres"]
        raise
    return module


def fast_attnres_fn(module: ModuleType | None = None) -> Callable[..., Tensor]:
    """fast-attnres's ``attnres(values, query, eps=)`` with fla's ``fused_attnres`` signature
    ``(query [d], residuals, rms_weight [d], rms_eps=)`` (what :class:`FlaResidual` calls): its keys are
    RMS-normalised sources without a weight, so the norm's weight is folded into the query, as ours does."""
    fa = (module or load_fast_attnres()).attnres

    def fn(query: Tensor, residuals: list[Tensor], rms_weight: Tensor, rms_eps: float = 1e-6) -> Tensor:
        return fa(list(residuals), (query * rms_weight).to(residuals[0].dtype), eps=rms_eps)

    return fn


def fast_attnres_status() -> str | None:
    """None when fast-attnres can run here, else why not."""
    if not torch.cuda.is_available():
        return "fast-attnres's kernels are CUDA (Triton): needs CUDA"
    try:
        load_fast_attnres()
    except Exception as exc:  # noqa: BLE001 - not installed, or a Triton/torch mismatch inside it
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


# ----------------------------------------------------------------------------- the op baselines


def op_baselines() -> dict[str, Callable | None]:
    """The installed op baselines: ``far`` (flash-attn-res's ``phase_1_batched_attention_triton_op``:
    sources stacked ``[n, B, T, d]``, queries ``[S, d]``), ``fla`` (``fused_attnres``, one query) and ``fa``
    (fast-attnres's ``attnres(values, query)``, one query, bf16; :func:`load_fast_attnres`);
    None for one that is not installed (or does not import)."""
    found: dict[str, Callable | None] = {"far": None, "fla": None, "fa": None}
    if os.environ.get(FAST_ATTNRES_ENV) and fast_attnres_status() is None:
        found["fa"] = load_fast_attnres().attnres
    try:
        from flash_attn_res import phase_1_batched_attention_triton_op

        found["far"] = phase_1_batched_attention_triton_op
    except Exception:  # noqa: BLE001 - optional benchmark dependency
        pass
    try:
        from fla.ops.attnres import fused_attnres

        found["fla"] = fused_attnres
    except Exception:  # noqa: BLE001
        pass
    return found
