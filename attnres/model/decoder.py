"""The Kimi-Linear-style decoder with a pluggable residual path.

``embedding -> layers -> residual read-out -> final RMSNorm -> LM head``. Each decoder layer holds two
sublayers, a PreNorm token mixer (KDA or MLA) and a PreNorm channel mixer (dense SwiGLU or MoE);
sublayer ``2l`` and ``2l + 1`` of the residual path (:func:`attnres.residual.make_residual`), which
decides what each sublayer reads (the standard running sum, Full AttnRes or Block AttnRes)::

    v = mixer(norm(residual.input(state, i)))   # the norm finishes the residual path's last step
    residual.output(state, i, v)

Layers live in an ``nn.ModuleDict`` keyed by ``str(index)``: a pipeline stage deletes the layers it
does not own and parameter names stay those of the full model. Nothing here knows about Lightning
or parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.model.backends import fla_available, fla_runs
from attnres.model.config import Config
from attnres.model.documents import DocumentMask
from attnres.model.kda import KimiDeltaAttention, ShortConv
from attnres.model.mla import MultiHeadLatentAttention
from attnres.model.moe import MoE, SwiGLU, cuda_autocast_dtype, output_init_std
from attnres.model.norm import RMSNorm
from attnres.residual import (
    DepthInput,
    DepthQuery,
    Residual,
    ResidualState,
    depth_weight_matrix,
    make_residual,
)

__all__ = ["Decoder", "DecoderCache", "DecoderLayer", "ModelOutput", "lm_loss"]

# ``attnres export`` / :meth:`Decoder.save_pretrained`: a folder of these two files
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PRETRAINED_FORMAT = "attnres-decoder-v1"


@dataclass
class DecoderCache:
    """Decoding state (detached: inference only) of every layer, keyed like ``Decoder.layers``: KDA
    ``{"state", "conv"}``, MLA ``{"latent", "k_shared"}``. AttnRes keeps no state of past positions (it
    mixes across depth within one token); ``residual_queries`` keeps its depth queries ``w * g`` (fixed
    while decoding: computed at the first call, then reused by every step when gradients are off)."""

    layers: dict[str, dict] = field(default_factory=dict)
    seq_len: int = 0
    residual_queries: dict = field(default_factory=dict)


@dataclass
class ModelOutput:
    """logits ``[B, T, V]`` (None for a decoder without a head: a pipeline stage before the last);
    loss: mean cross-entropy over ``labels != -100`` (:func:`lm_loss`; when labels are given;
    the MoE balance loss is *not* included); aux_loss: sum of the MoE sequence balance losses (0 when
    off); state: the :class:`ResidualState` after the last layer, for a decoder without a head (what it
    hands to the next pipeline stage), else None; cache: the updated :class:`DecoderCache` (when one
    was passed); stats (``return_stats``):
    ``depth_weights [sources, sublayers + 1]`` (NaN where a sublayer does not see a source; None for
    the standard residual), ``output_rms [L]`` (RMS of each sublayer output ``v_i``), ``hidden_rms
    [L + 1]`` (RMS of each sublayer input ``h_i`` and, last, the read-out), ``router_load``
    ``{layer: [E]}`` (fraction of routed slots per expert)."""

    logits: Tensor | None
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    cache: DecoderCache | None = None
    stats: dict | None = None
    state: ResidualState | None = None


@dataclass
class StatsRecorder:
    """Per-forward diagnostics collected by :meth:`Decoder.run_layers`."""

    in_rms: list[Tensor] = field(default_factory=list)
    out_rms: list[Tensor] = field(default_factory=list)
    loads: dict[int, Tensor] = field(default_factory=dict)

    def add(self, h: Tensor | DepthInput, v: Tensor) -> None:
        """The RMS of a sublayer's input ``h`` (before its norm) and of its output ``v``, ``[B, T, d]``
        each (a forward that records gets ``h`` itself from the residual path, never a DepthInput)."""
        self.in_rms.append(_rms(h if isinstance(h, Tensor) else h.tensor()))
        self.out_rms.append(_rms(v))


# Inductor options of a model with nested regions (Decoder.compile_nested): with buffer reuse on, Inductor
# (torch 2.13 on a CPU) reuses a buffer that a reused region's backward still reads, and the gradients of the
# layers before the last come out wrong (the loss right); tests/test_model.py checks them against eager
NESTED_INDUCTOR_OPTIONS: dict[str, Any] = {"allow_buffer_reuse": False}


def _region_call(kind: str) -> Callable:
    def call(module: nn.Module, x: Tensor) -> Any:
        return module.mix(x) if kind == "moe" else module(x)

    return call


# The ``torch.compiler.nested_compile_region`` of each kind of sublayer (``kda``, ``mla``, ``dense``:
# ``region(module, x) = module(x)``; ``moe``: ``region(moe, flat) = moe.mix(flat)``), one function per kind
# shared by every layer: under ``torch.compile`` each kind is traced and compiled once and called per layer
# (its parameters are the call's inputs); run eagerly, the function is called as is. Made here, not while
# Dynamo traces (it cannot trace their creation).
NESTED_REGIONS: dict[str, Callable] = {
    kind: torch.compiler.nested_compile_region(_region_call(kind)) for kind in ("kda", "mla", "dense", "moe")
}


class DecoderLayer(nn.Module):
    """PreNorm token mixer + PreNorm channel mixer (two sublayers of the residual path)."""

    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        c = config
        self.index = index
        self.mixer_kind = "mla" if c.is_mla(index) else "kda"
        self.mlp_kind = "moe" if c.is_moe(index) else "dense"
        self.attn_norm = RMSNorm(c.dim, c.rms_norm_eps, c.fused_backend)
        if self.mixer_kind == "mla":
            self.attn = MultiHeadLatentAttention(c.dim, c.mla_heads, c.mla_qk_nope_dim, c.mla_qk_shared_dim,
                                                 c.mla_v_head_dim, c.mla_kv_rank, c.rms_norm_eps)
        else:
            self.attn = KimiDeltaAttention(c.dim, c.kda_heads, c.kda_head_dim, c.kda_conv_size,
                                           c.kda_chunk_size, c.rms_norm_eps, backend=c.kda_backend,
                                           fused=c.fla_fused)
        self.mlp_norm = RMSNorm(c.dim, c.rms_norm_eps, c.fused_backend)
        if self.mlp_kind == "moe":
            self.mlp = MoE(c.dim, c.num_experts, c.top_k, c.expert_dim, c.num_shared_experts,
                           c.routed_scaling_factor, c.router_bias_update_rate, c.aux_loss_coef,
                           backend=c.fused_backend)
        else:
            self.mlp = SwiGLU(c.dim, c.mlp_dim, backend=c.fused_backend)
        self.nested = False  # the mixers run as nested compile regions (Decoder.compile_nested)

    def token_mixer(
        self, x: Tensor, cache: dict | None = None, documents: DocumentMask | None = None
    ) -> Tensor:
        """Sublayer ``2 * index`` after its norm: ``attn_norm(h) [B, T, d] -> [B, T, d]``
        (:func:`run_sublayer` applies the norm); ``documents``: packed documents, mixed apart."""
        if self.nested and cache is None and documents is None:
            return NESTED_REGIONS[self.mixer_kind](self.attn, x)
        return self.attn(x, cache, documents)

    def channel_mixer(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sublayer ``2 * index + 1`` after its norm: ``mlp_norm(h) [B, T, d] -> ([B, T, d], MoE aux loss
        or None)``."""
        if self.mlp_kind == "moe":
            autocast = cuda_autocast_dtype(x)
            nest = self.nested and self.mlp.mix_region_runs(x.device, autocast or x.dtype, autocast)
            return self.mlp(x, region=NESTED_REGIONS["moe"] if nest else None)
        return (NESTED_REGIONS["dense"](self.mlp, x) if self.nested else self.mlp(x)), None

    def sublayers(self) -> tuple[tuple[int, Callable, RMSNorm], ...]:
        """``(sublayer index, function, its input norm)`` of the token mixer and the channel mixer."""
        i = 2 * self.index
        return (i, self.token_mixer, self.attn_norm), (i + 1, self.channel_mixer, self.mlp_norm)


class Decoder(nn.Module):
    """The decoder of ``config``: ``forward(input_ids [B, T]) -> ModelOutput``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(c, i) for i in range(c.num_layers)})
        self.residual = make_residual(
            c.residual, c.dim, c.num_sublayers, c.num_blocks, c.residual_eps, full_group=c.full_group,
            recompute=c.residual_recompute, fuse_norm=c.residual_fuse_norm,
        )
        self.norm = RMSNorm(c.dim, c.rms_norm_eps, c.fused_backend)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.regions_compiled = False  # compile_regions() ran
        self.fla_installed = c.fused_backend != "torch" and fla_available()  # looked up once (host time)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer, so a model built on the meta device and
        materialised with ``to_empty`` is complete after this call: Normal(0, std) for projections and
        (unless ``embed_init_std``) the embedding, with std ``Config.weight_init_std`` (``init_std``, by
        default ``sqrt(2 / (5 dim))``), ``std / sqrt(2 * num_layers)`` for the projections that write
        into the residual path (attention ``o_proj``, MLP / expert down), zero biases, norms at 1, KDA
        decay and short convs at their own inits, pseudo-queries at 0 (uniform depth weights), router bias
        and load counts at 0."""
        c = self.config
        std = c.weight_init_std
        out_std = output_init_std(std, c.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std if c.embed_init_std is None else c.embed_init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, DepthQuery):
                nn.init.zeros_(module.weight)
                nn.init.ones_(module.norm_weight)
            elif isinstance(module, ShortConv):
                module.reset_parameters()
        for layer in self.layers.values():
            nn.init.normal_(layer.attn.o_proj.weight, std=out_std)
            if isinstance(layer.attn, KimiDeltaAttention):
                layer.attn.reset_decay()
            if isinstance(layer.mlp, MoE):
                layer.mlp.reset_parameters(std, out_std)
                if layer.mlp.shared is not None:
                    nn.init.normal_(layer.mlp.shared.down_proj.weight, std=out_std)
            else:
                nn.init.normal_(layer.mlp.down_proj.weight, std=out_std)

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor | ResidualState, labels: Tensor | None = None, *, segment_ids: Tensor | None = None,
        cache: DecoderCache | None = None, return_stats: bool = False,
    ) -> ModelOutput:
        """x: ``input_ids [B, T]``, or, for a decoder pruned to a later pipeline stage (no ``embed``), the
        :class:`ResidualState` the previous stage handed on. labels ``[B, T]`` already aligned (position
        ``t`` predicts ``labels[t]``; ``-100`` is ignored); segment_ids ``[B, T]`` (int): packed documents,
        one contiguous run of equal ids each (:mod:`attnres.model.documents`): no token mixer reads across
        a change of id, so each document's logits are those of the document run alone; cache: a
        :class:`DecoderCache` to decode with (updated in place; an empty one starts a sequence; not
        with ``segment_ids``).

        A decoder pruned to some of its ``layers`` (``attnres.parallel.keep_layers``) runs its part: it
        starts from ``x`` as given when it has no embedding, and without a head (``lm_head`` None) it
        stops after its layers and returns the state (``ModelOutput.state``, ``logits`` None)."""
        stats = StatsRecorder() if return_stats else None
        handed = isinstance(x, ResidualState)
        if handed and (cache is not None or return_stats):
            raise ValueError("Decoder: a ResidualState input (a pipeline stage) takes no decoding cache "
                             "and no return_stats; run the whole decoder on input_ids for those")
        if handed == (self.embed is not None):
            raise ValueError("Decoder: pass input_ids [B, T] to a decoder with its embedding, and the "
                             "ResidualState of the previous pipeline stage to one without (keep_layers)")
        documents = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("Decoder: segment_ids (packed documents) and a decoding cache do not mix; "
                                 "decode one document per sequence without segment_ids")
            if not handed and segment_ids.shape != x.shape:
                raise ValueError(f"Decoder: segment_ids {list(segment_ids.shape)} must have input_ids' "
                                 f"shape {list(x.shape)}")
            documents = self.document_mask(segment_ids)
        state = x if handed else self.begin(x, record=return_stats, cache=cache)
        aux_loss = self.run_layers(state, cache=cache, stats=stats, documents=documents)
        if self.lm_head is None:
            return ModelOutput(logits=None, aux_loss=aux_loss, state=state)
        h = self.residual.readout(state)
        logits = self.finish(h)
        if cache is not None:
            cache.seq_len += x.shape[1]
        loss = None
        if labels is not None:
            fused = fla_runs(self.config.fused_backend, self.fla_installed, logits.device)
            loss = lm_loss(logits, labels, fused=fused and not torch.compiler.is_compiling())
        report = None
        if stats is not None:
            report = {
                "depth_weights": self._depth_weights(state),
                "output_rms": torch.stack(stats.out_rms).cpu(),
                "hidden_rms": torch.stack(stats.in_rms + [_rms(h)]).cpu(),
                "router_load": stats.loads,
            }
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, cache=cache, stats=report)

    def begin(
        self, input_ids: Tensor, record: bool = False, cache: DecoderCache | None = None
    ) -> ResidualState:
        """Embed ``input_ids [B, T]`` and start the residual path (``record``: keep depth weights;
        ``cache``: decoding, whose depth queries are reused while gradients are off). The first of
        :meth:`forward`'s three steps (then :meth:`run_layers`, :meth:`finish`)."""
        queries = cache.residual_queries if cache is not None and not torch.is_grad_enabled() else None
        return self.residual.begin(self.embed(input_ids), record=record, query_cache=queries)

    def document_mask(self, segment_ids: Tensor) -> DocumentMask:
        """The :class:`DocumentMask` of ``segment_ids [B, T]`` with what this module's layers consume: the
        MLA mask when it holds an MLA layer, ``cu_seqlens`` when a KDA layer runs fla on this device."""
        mixers = [layer.attn for layer in self.layers.values()]
        attention = any(isinstance(m, MultiHeadLatentAttention) for m in mixers)
        varlen = any(isinstance(m, KimiDeltaAttention) and m.uses_fla(segment_ids.device) for m in mixers)
        return DocumentMask.build(segment_ids, attention=attention, varlen=varlen)

    def run_layers(
        self, state: ResidualState, cache: DecoderCache | None = None, stats: StatsRecorder | None = None,
        documents: DocumentMask | None = None,
    ) -> Tensor:
        """Run the layers this module holds (in index order) on ``state``; returns the sum of their MoE
        balance losses (a 0-dim fp32 tensor). ``documents``: packed documents (:meth:`document_mask`)."""
        aux_loss = torch.zeros((), device=state.device)
        for key in sorted(self.layers, key=int):
            layer, i = self.layers[key], int(key)
            layer_cache = cache.layers.setdefault(key, {}) if cache is not None else None
            (ia, mixer, attn_norm), (im, mlp, mlp_norm) = layer.sublayers()
            run_sublayer(self.residual, state, ia, mixer, attn_norm, layer_cache, documents, stats=stats)
            aux = run_sublayer(self.residual, state, im, mlp, mlp_norm, stats=stats)
            if aux is not None:
                aux_loss = aux_loss + aux
                if stats is not None:
                    stats.loads[i] = layer.mlp.last_load.detach().cpu()
        return aux_loss

    def finish(self, x: Tensor) -> Tensor:
        """The read-out ``x [B, T, d]`` (``residual.readout(state)``) through the final norm and the LM
        head: logits ``[B, T, V]``."""
        return self.lm_head(self.norm(x))

    def _depth_weights(self, state: ResidualState) -> Tensor | None:
        if self.config.residual == "standard":
            return None
        return depth_weight_matrix(self.residual, state.records)

    # ------------------------------------------------------------------ MoE balancing

    def moe_layers(self) -> dict[str, MoE]:
        """The MoE channel mixers by layer key (for all-reducing their ``tokens_per_expert``)."""
        return {k: layer.mlp for k, layer in self.layers.items() if isinstance(layer.mlp, MoE)}

    @torch.no_grad()
    def update_router_bias(self, enabled: Tensor | None = None) -> None:
        """Apply the accumulated expert loads to every MoE router bias and reset them (call after each
        optimizer step; a no-op without MoE). ``enabled``: a 0-dim bool tensor, whether the step updated
        the weights (decided on the device; see ``MoE.update_bias``)."""
        for moe in self.moe_layers().values():
            moe.update_bias(enabled=enabled)

    # ------------------------------------------------------------------ description

    def num_parameters(self, active: bool = False) -> int:
        """Parameters of this module (a pipeline stage counts its own). ``active``: per token — the
        ``top_k`` routed experts of each MoE layer instead of all, and no input embedding (lookup)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        if not self.config.tie_embeddings:
            total -= self.embed.weight.numel()
        for moe in self.moe_layers().values():
            per_expert = (moe.w_gate.numel() + moe.w_up.numel() + moe.w_down.numel()) // moe.num_experts
            total -= (moe.num_experts - moe.top_k) * per_expert
        return total

    def layer_plan(self) -> str:
        """The per-layer table (token mixer, channel mixer) of this module's layers."""
        return self.config.layer_plan([int(k) for k in self.layers])

    # ------------------------------------------------------------------ weights on disk

    def save_pretrained(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` (every parameter and persistent buffer, a tied embedding once)
        and ``config.json`` (``{"format", "config": the Config fields, **extra}``) into ``directory``
        (created); :meth:`from_pretrained` reads them back. Returns the directory."""
        from safetensors.torch import save_model

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"format": PRETRAINED_FORMAT, "config": dataclasses.asdict(self.config), **(extra or {})}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Decoder:
        """The decoder of a folder written by ``attnres export`` (:meth:`save_pretrained`):
        ``config.json`` gives the :class:`Config`, ``model.safetensors`` the weights (every key must
        match). Plain PyTorch and safetensors: no Lightning. Returns the model in eval mode on
        ``device``; ``model(input_ids [B, T]).logits [B, T, V]``."""
        from safetensors.torch import load_model

        d = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"{d / name} not found: from_pretrained reads a folder written by "
                    f"`attnres export --ckpt <checkpoint> --output {d}`"
                )
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(meta.get("config", {})) - fields)
        if meta.get("format") != PRETRAINED_FORMAT or unknown:
            why = f"unknown Config field(s) {unknown}" if unknown else f"format {meta.get('format')!r}"
            raise ValueError(
                f"{d / CONFIG_FILE}: {why}, expected format {PRETRAINED_FORMAT!r} with Config fields; "
                "export it again with this version's `attnres export`"
            )
        model = cls(Config(**meta["config"]))
        load_model(model, str(d / WEIGHTS_FILE), strict=True, device=str(device))
        return model.to(device).eval()

    # ------------------------------------------------------------------ compilation

    def compile_regions(self, **options: Any) -> Decoder:
        """Regional compilation: compile each layer's token mixer and channel mixer in place
        (``nn.Module.compile(**options)``), leaving the residual path, the norms, the embedding and the
        head eager. Dynamo compiles one graph per kind of sublayer (KDA, MLA, MoE, dense MLP) and reuses
        it for every layer of that kind, so the first step compiles a handful of small graphs instead
        of the whole model. The parameter names (and checkpoints) stay those of the eager model.
        :meth:`generate` runs eagerly. Returns ``self``."""
        for layer in self.layers.values():
            layer.attn.compile(**options)
            layer.mlp.compile(**options)
        self.regions_compiled = True
        return self

    def compile_nested(self, **options: Any) -> Callable:
        """Hierarchical compilation: ``torch.compile`` of the whole model (one graph: residual path, norms,
        head) in which each layer's token mixer and channel mixer (on a GPU, the MoE's experts) is a
        nested compile region, one per kind of sublayer (:data:`NESTED_REGIONS`): each kind is traced and
        compiled once instead of once per layer (on a CPU, 8 layers, the first step took 0.54x the whole
        model's compile time). Token mixers called with a decoding cache or packed documents run inline
        (with packed documents most of the saving is lost); the channel mixers, per token, stay regions;
        the MoE's experts are a region only where :meth:`MoE.mix_region_runs` says (grouped GEMMs, and a
        torch whose regions hold its autograd functions).
        Compiles with :data:`NESTED_INDUCTOR_OPTIONS`; ``options``: more ``torch.compile`` arguments (a
        ``mode`` becomes its Inductor options, e.g. ``reduce-overhead``'s CUDA graphs). Returns the
        compiled callable (the module itself stays eager)."""
        for layer in self.layers.values():
            layer.nested = True
        if options.get("backend", "inductor") == "inductor":
            from torch._inductor import list_mode_options

            mode = options.pop("mode", None)
            options["options"] = {**(list_mode_options(mode) if mode else {}), **NESTED_INDUCTOR_OPTIONS,
                                  **options.get("options", {})}
        return torch.compile(self, **options)

    def eager_regions(self) -> contextlib.AbstractContextManager:
        """A context in which regions compiled by :meth:`compile_regions` run eagerly (decoding, whose
        shapes change every call, and other calls the training step does not make)."""
        return torch.compiler.set_stance("force_eager") if self.regions_compiled else contextlib.nullcontext()

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        top_p: float | None = None, greedy: bool = False, eos_id: int | None = None,
    ) -> Tensor:
        """Extend ``input_ids [B, T]`` by up to ``max_new_tokens`` tokens with cached decoding:
        one prefill, then one token per step (KDA recurrent + conv state, MLA latent cache).
        Sampling: greedy (argmax), or softmax at ``temperature`` restricted to the ``top_k`` most likely
        tokens and/or the smallest set of probability ``>= top_p``. After ``eos_id`` a sequence keeps
        emitting ``eos_id``; generation stops early once every sequence has. Returns
        ``[B, T + new]``. Runs in eval mode (restored after)."""
        was_training = self.training
        self.eval()
        try:
            with self.eager_regions():
                cache = DecoderCache()
                logits = self(input_ids, cache=cache).logits[:, -1]
                done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                new: list[Tensor] = []
                for step in range(max_new_tokens):
                    token = sample(logits, temperature, top_k, top_p, greedy)
                    if eos_id is not None:
                        token = torch.where(done, torch.full_like(token, eos_id), token)
                        done |= token == eos_id
                    new.append(token)
                    if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                        break
                    logits = self(token[:, None], cache=cache).logits[:, -1]
            return torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids
        finally:
            self.train(was_training)


def lm_loss(logits: Tensor, labels: Tensor, fused: bool = False) -> Tensor:
    """Mean next-token cross-entropy (in fp32) of ``logits [B, T, V]`` against ``labels [B, T]`` over
    ``labels != -100``: the decoder's loss, and the pipeline's loss function on its last stage.
    ``fused``: fla's Triton cross-entropy (the decoder's eager forward where fla runs, as fla's model
    does): the same fp32 math inside one kernel, which keeps only the logits and each row's log-sum-exp
    for the backward, not fp32 copies of the logits and the log-probabilities (2 x 4 bytes per logit)."""
    if fused:
        from fla.modules.fused_cross_entropy import cross_entropy_loss

        losses, _ = cross_entropy_loss(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return losses.sum() / (labels != -100).sum()  # 0 for an ignored label; no host sync
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def sample(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    greedy: bool = False,
) -> Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]``."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def run_sublayer(
    residual: Residual, state: ResidualState, i: int, fn: Callable, norm: RMSNorm, *args,
    stats: StatsRecorder | None = None,
) -> Tensor | None:
    """Sublayer ``i`` on ``state``: ``fn(norm(h_i), *args)`` (``fn``: a :class:`DecoderLayer` mixer) with
    ``h_i`` from the residual path (which may leave its last step to ``norm``), its output ``[B, T, d]``
    handed back. Returns the MoE aux loss or None. ``stats``: also record the RMS of ``h_i`` and of the
    output."""
    h = residual.input(state, i)
    result = fn(norm(h), *args)
    v, extra = result if isinstance(result, tuple) else (result, None)
    residual.output(state, i, v)
    if stats is not None:
        stats.add(h, v)
    return extra


def _rms(x: Tensor) -> Tensor:
    with torch.no_grad():
        return x.detach().float().pow(2).mean().sqrt()
