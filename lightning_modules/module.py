"""``LanguageModel``: the Lightning side of the decoder (optimizer, schedule, metrics, checkpoints).

The model itself (:class:`attnres.model.Decoder`) is plain PyTorch; this module builds it from one
typed :class:`attnres.model.Config`, so ``--model.config.residual full`` or ``model: {config:
{num_blocks: 2}}`` in a YAML file change the architecture and ``attnres fit --help`` lists every field
with its docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torchmetrics.text import Perplexity

from attnres.errors import UsageError
from attnres.model import Config, Decoder, ModelOutput, get_config
from lightning_modules import metrics
from lightning_modules.tokenizer import check_same_tokenizer


@dataclass
class LRSchedule:
    """Multiplier of the peak learning rate at optimizer step ``step``: linear warmup over
    ``warmup`` steps, then ``cosine`` decay to ``min_ratio`` at ``total``, ``wsd`` (warmup-stable-decay:
    constant, then linear to ``min_ratio`` over the last ``decay_fraction`` of ``total``) or ``constant``.
    A dataclass, so ``LambdaLR`` checkpoints it."""

    warmup: int
    total: int
    kind: str = "cosine"
    min_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = self.total - max(1, round(self.decay_fraction * self.total))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        return 1.0 - (1 - self.min_ratio) * progress


class LanguageModel(L.LightningModule):
    """A Kimi-Linear-style MoE decoder with standard, Full or Block AttnRes residuals.

    Args:
        config: the decoder (:class:`attnres.model.Config`, or a dict of its fields as checkpoints
            store it); on the command line each field is ``--model.config.<field>``.
            ``configs/model/<preset>.yaml`` hold every preset as a whole ``model.config`` block, so
            ``-c model/small`` picks a size; in Python, ``LanguageModel(get_config("small"))``.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay, applied to matrices only (not to norms, biases,
            pseudo-queries or, unless ``decay_embeddings``, the embedding). With ``tie_embeddings``
            the shared embedding/LM-head matrix is decayed as the untied LM head would be.
        decay_embeddings: apply weight decay to the token embedding too (an untied one: the tied
            matrix is always decayed).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        schedule: ``cosine`` (to ``min_lr_ratio * lr``), ``wsd`` (warmup-stable-decay) or ``constant``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay_fraction: ``wsd`` only: share of the steps spent decaying.
        schedule_steps: length of the schedule in optimizer steps (default: ``trainer.max_steps``).
        compile: ``true``: the whole model under ``torch.compile`` (the fastest step; the first step
            compiles for a minute or more); ``regional``: each layer's token mixer and channel mixer
            compiled in place, one graph per kind of sublayer reused by every layer of that kind
            (``Decoder.compile_regions``: fewer and smaller graphs to compile; the residual path stays eager);
            ``reduce-overhead``: the whole model compiled with torch's ``mode="reduce-overhead"``: its
            forward and backward replayed as CUDA graphs, one launch each instead of one per kernel
            (for launch-bound models: small shapes, the study's sizes; on a CPU the same as ``true``);
            ``nested``: the whole model in one graph with each kind of sublayer (KDA, MLA, dense MLP, the
            MoE's experts on a GPU) a nested compile region, compiled once and called by every layer of
            that kind (``Decoder.compile_nested``: the first step compiles in about half of ``true``'s
            time on a CPU at 8 layers; the residual path, norms and head stay in the graph); ``false``:
            eager.
    """

    def __init__(
        self,
        config: Config,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        decay_embeddings: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        schedule: Literal["cosine", "wsd", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 0.2,
        schedule_steps: int | None = None,
        compile: bool | Literal["regional", "reduce-overhead", "nested"] = False,
    ) -> None:
        super().__init__()
        if compile not in (True, False, "regional", "reduce-overhead", "nested"):
            raise ValueError(f"compile={compile!r}: use true (the whole model), regional (each layer's "
                             "mixers), reduce-overhead (the whole model as CUDA graphs), nested (the whole "
                             "model, each kind of sublayer compiled once) or false (eager)")
        check_optimizer_args(
            lr, weight_decay, betas, warmup_steps, min_lr_ratio, decay_fraction, schedule_steps
        )
        self.config = as_config(config)
        # the config as a dict of its fields: checkpoints stay loadable with
        # torch.load(weights_only=True), and `hparams.yaml` reads like `model.config` in a YAML
        self.save_hyperparameters(ignore=["config"])
        self.save_hyperparameters({"config": dataclasses.asdict(self.config), **self.hparams})
        self.model = Decoder(self.config)
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        # kept out of the module tree (no second copy of the parameter names in the state dict)
        self.__dict__["_compiled"] = (
            torch.compile(self.model) if compile is True
            else torch.compile(self.model, mode="reduce-overhead") if compile == "reduce-overhead"
            else self.model.compile_nested() if compile == "nested" else None)
        if compile == "regional":
            self.model.compile_regions()
        self._rng_to_restore: dict | None = None
        self.step_finite: Tensor | None = None  # this step's update ran (set by a deferring NaNGuard)
        self.last_train_loss: Tensor | None = None  # the last training step's loss (for the progress bar)

    # ------------------------------------------------------------------ model

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, segment_ids: Tensor | None = None,
        **kwargs: Any,
    ):
        """The decoder on ``input_ids [B, T]`` (compiled when ``compile``, unless other keyword arguments
        ask for the eager model); ``segment_ids [B, T]``: packed documents (``data.packing: documents``)."""
        fn = self._compiled if self._compiled is not None and not kwargs else self.model
        if fn is self._compiled and self.hparams.compile == "reduce-overhead":
            return self._graphed(input_ids, labels, segment_ids)
        # decoding (a cache) or statistics: compiled regions too run eagerly
        with self.model.eager_regions() if kwargs else contextlib.nullcontext():
            return fn(input_ids, labels=labels, segment_ids=segment_ids, **kwargs)

    def _graphed(self, input_ids: Tensor, labels: Tensor | None, segment_ids: Tensor | None) -> ModelOutput:
        """One call of the CUDA-graphed model (``compile: reduce-overhead``). A replay writes its outputs
        into the same memory as the previous one, so each call starts a new step for torch's CUDA-graph
        trees, and the two scalars that outlive the step (the losses: logged, shown by the progress
        bar) are copied out; the logits are used within the step."""
        torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled(input_ids, labels=labels, segment_ids=segment_ids)
        return dataclasses.replace(
            out, loss=None if out.loss is None else out.loss.clone(),
            aux_loss=None if out.aux_loss is None else out.aux_loss.clone())

    def flops_per_token(self, seq_len: int) -> float:
        return self.config.flops_per_token(seq_len)

    def configure_model(self) -> None:
        """Parallelism is applied from outside the model, by the strategy's ``parallelize(model)``
        (``lightning_modules/strategies``: ``FSDP2Strategy`` shards, ``PipelineParallelStrategy`` splits
        the stages in its ``setup`` instead); Lightning's own ``ModelParallelStrategy``, which has no such
        method, gets FSDP2 with its defaults. Other strategies: nothing."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lightning_modules.strategies import shard_data_parallel

        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "parallelize"):
            strategy.parallelize(self.model)
        elif isinstance(strategy, ModelParallelStrategy):
            shard_data_parallel(self.model, strategy.device_mesh)

    def setup(self, stage: str) -> None:
        """Start-up checks against the data (before any step): sequence length and vocabulary."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is above the model's max_seq_len={self.config.max_seq_len} "
                f"(preset {self.config.name}); lower --data.seq_len or raise --model.config.max_seq_len"
            )
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and tok.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer/vocabulary mismatch: the tokenizer has {tok.vocab_size} ids but the model's "
                f"vocab_size is {self.config.vocab_size}; build it with Config(vocab_size={tok.vocab_size}) "
                "(`attnres fit` sets model.config.vocab_size from data.tokenizer)"
            )

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch["input_ids"], batch["labels"], batch.get("segment_ids"))
        loss = out.loss + out.aux_loss
        self.log_train_step(out.loss, out.aux_loss, batch["input_ids"].shape[0])
        return loss

    def log_train_step(self, loss: Tensor, aux_loss: Tensor, batch_size: int) -> None:
        """Log one training step: ``train/loss`` (the language-model loss, a 0-dim tensor),
        ``train/aux_loss`` (the MoE balance loss, when it is on) and ``train/lr``. Also called by a
        strategy that runs the step itself (``PipelineParallelStrategy``)."""
        # not prog_bar: Lightning would read it back at every bar refresh, a host sync a step; the bars
        # `attnres fit` adds show last_train_loss without one (progress.RichLossBar, TQDMLossBar)
        self.log("train/loss", loss, batch_size=batch_size)
        self.last_train_loss = loss.detach()
        if self.config.moe and self.config.aux_loss_coef > 0:
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
        lr = metrics.on_host(self.trainer.optimizers[0].param_groups[0]["lr"])  # a number would be a sync
        self.log("train/lr", lr, batch_size=batch_size)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        self._step_and_balance(epoch, batch_idx, optimizer, optimizer_closure)
        # free the gradients now: Lightning zeroes them between the next training_step and its backward,
        # so they would otherwise live through the next forward, where the activations peak (one model's
        # gradients more at the peak; a hand-written loop frees them here too)
        optimizer.zero_grad(set_to_none=True)

    def _step_and_balance(self, *args: Any) -> None:
        """Lightning's optimizer step, then the MoE router's aux-loss-free balancing step."""
        moes = self.model.moe_layers()
        if not moes:
            return super().optimizer_step(*args)
        scaler = self._grad_scaler()
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(*args)
        # the aux-loss-free balancing step, from the loads of this step's forwards (all ranks; the
        # all-reduce runs whatever the step did, every rank must join it), only when the optimizer
        # updated the parameters: a skipped step's loads are dropped with it
        if self.trainer.world_size > 1:
            for m in moes.values():
                m.tokens_per_expert.copy_(self.trainer.strategy.reduce(m.tokens_per_expert, reduce_op="sum"))
        step_finite, self.step_finite = self.step_finite, None  # set by a deferring NaNGuard
        if step_finite is not None:  # decided on the device: the bias moves only if the update ran
            self.model.update_router_bias(enabled=step_finite)
        elif self._step_was_skipped(scaler, scale):
            for m in moes.values():
                m.tokens_per_expert.zero_()
        else:
            self.model.update_router_bias()

    def _step_was_skipped(self, scaler: Any, scale_before: float | None) -> bool:
        """Whether the optimizer step that just ran left the parameters as they were: fp16's GradScaler
        found inf/NaN gradients (it lowers its scale then; it does not call ``optimizer.step``, or, for
        a fused AdamW, the kernel skips the update), or every gradient was dropped (what
        :class:`~lightning_modules.callbacks.NaNGuard` does to skip a step: AdamW then changes
        nothing). Both decisions are the same on every rank."""
        if scaler is not None and scaler.get_scale() < scale_before:
            return True
        return all(p.grad is None for p in self.model.parameters())

    def _eval_step(self, batch: dict[str, Tensor], prefix: str, ppl: Perplexity) -> Tensor:
        out = self(batch["input_ids"], batch["labels"], batch.get("segment_ids"))
        bs = batch["input_ids"].shape[0]
        ppl.update(out.logits.float(), batch["labels"])
        self.log(f"{prefix}/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log(f"{prefix}/ppl", ppl, prog_bar=True, batch_size=bs)
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_ppl)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sequence mean negative log-likelihood ``[B]`` (nats per token)."""
        logits = self(batch["input_ids"], segment_ids=batch.get("segment_ids")).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
        mask = (batch["labels"] != -100).float()
        return {"nll": (nll * mask).sum(1) / mask.sum(1).clamp_min(1)}

    # ------------------------------------------------------------------ optimizer

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices; none on norms, biases, the pseudo-queries (and
        their key-norm weights) and, unless ``decay_embeddings``, the embedding.

        A parameter registered under several names appears once, in the group of the name that
        decays: the one such parameter is the matrix ``tie_embeddings`` shares between ``embed`` and
        ``lm_head``, which so gets the untied LM head's decay (as in GPT-2 and nanoGPT), whatever
        ``decay_embeddings`` says. (``named_parameters()`` alone would list it as ``embed.weight``
        only and leave the head undecayed.)"""
        names: dict[int, list[str]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                names.setdefault(id(p), []).append(name)
                params[id(p)] = p
        decay, no_decay = [], []
        for key, p in params.items():
            (decay if any(self._decays(n, p) for n in names[key]) else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _decays(self, name: str, p: torch.nn.Parameter) -> bool:
        return not (
            p.ndim < 2
            or "norm" in name
            or name.endswith("bias")
            or "residual.queries." in name
            or (name.startswith("embed.") and not self.hparams.decay_embeddings)
        )

    def _grad_scaler(self) -> Any:
        """fp16's GradScaler when the precision plugin runs one, else ``None`` (bf16, fp32)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        # fused AdamW on CUDA, except where it cannot be clipped: with fp16's GradScaler the fused
        # kernel unscales the gradients itself, after any clipping (Lightning refuses that pair)
        clipped = bool(self.trainer.gradient_clip_val)
        fused = self.device.type == "cuda" and not (clipped and self._grad_scaler() is not None)
        opt = torch.optim.AdamW(self.param_groups(), lr=h.lr, betas=tuple(h.betas), fused=fused)
        total = h.schedule_steps or self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        fn = LRSchedule(h.warmup_steps, total, h.schedule, h.min_lr_ratio, h.decay_fraction)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except that a fused optimizer is clipped when no GradScaler runs.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that "handles unscaling"
        (fused AdamW), also under bf16, where nothing is scaled: the gradients are the true ones and
        clipping them before the step is exact. Then the plugin's base-class clipping runs (a
        strategy's own ``clip_grad_by_norm``, e.g. the pipeline's norm over all stages, still applies)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and self._grad_scaler() is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the tokenizer (so ``attnres generate`` needs only the checkpoint) and the RNG states
        (so a resumed run continues the uninterrupted one exactly)."""
        extra: dict[str, Any] = {
            "rng": {
                "python": random.getstate(),
                "numpy": _numpy_state_to_tensors(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "config": self.config.__dict__.copy(),
        }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "tokenizer"):
            extra["tokenizer"] = dm.tokenizer.to_dict()
            extra["tokenizer_fingerprint"] = dm.tokenizer.fingerprint
            extra["seq_len"] = dm.seq_len
        checkpoint["attnres"] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("attnres", {})
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "tokenizer") and "tokenizer_fingerprint" in extra:
            check_same_tokenizer(dm.tokenizer.fingerprint, extra["tokenizer_fingerprint"], "the checkpoint")
        self._rng_to_restore = extra.get("rng")

    def on_fit_start(self) -> None:
        """Before the first step: seed Triton's cache with the shipped KDA autotune results, give every fla
        kernel's key they do not cover the nearest tuned configuration (``warmup.prepare_kda_autotune``),
        and say, one line each, what will make the first step long (fla's autotuning, torch.compile)."""
        from lightning.pytorch.utilities import rank_zero_info

        from lightning_modules.warmup import first_step_notices, prepare_kda_autotune

        done = prepare_kda_autotune(self.device) or {}  # {} off CUDA or without fla
        seeded, pinned = done.get("seeded", 0), bool(done.get("pinned"))
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        dtype = (torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision
                 else torch.float32)
        for note in first_step_notices(self.model, self.device, self.hparams.compile, seeded, pinned, dtype):
            rank_zero_info(note)

    def on_train_start(self) -> None:
        # restored here, after the resumed run's sanity check, i.e. right before the next step
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ analysis

    @torch.no_grad()
    def depth_stats(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """One forward with ``return_stats`` in eval mode on ``batch``: ``{"mode", "loss", "matrix"
        [sources, sublayers + 1] (None for standard), "output_rms" [L], "hidden_rms" [L + 1],
        "router_load" [[E] per MoE layer]}`` as NumPy/lists."""
        was_training = self.training
        self.eval()
        try:
            out = self.model(batch["input_ids"], labels=batch["labels"], segment_ids=batch.get("segment_ids"),
                             return_stats=True)
        finally:
            self.train(was_training)
        s = out.stats
        w = s.get("depth_weights")
        return {
            "mode": self.config.residual,
            "loss": float(out.loss),
            "matrix": None if w is None else w.float().numpy(),
            "output_rms": s["output_rms"].float().tolist(),
            "hidden_rms": s["hidden_rms"].float().tolist(),
            "router_load": [s["router_load"][k].float() for k in sorted(s["router_load"])],
        }

    def depth_diagnostics(
        self, batch: dict[str, Tensor], forward_context: Any = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """:meth:`depth_stats` of ``batch`` and the gradient L2 norm of every sublayer from one backward
        of its mean loss (keys ``"<layer>.<attn|mlp>"``). ``forward_context`` (e.g. a bf16 autocast)
        wraps the two forwards; the model's gradients are replaced."""
        with forward_context if forward_context is not None else contextlib.nullcontext():
            stats = self.depth_stats(batch)
            self.train()
            self.model.zero_grad(set_to_none=True)
            out = self.model(batch["input_ids"], labels=batch["labels"], segment_ids=batch.get("segment_ids"))
        out.loss.backward()
        return stats, metrics.grad_norms_by_depth(self.model.named_parameters())


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    # checkpoints stay loadable with torch.load(weights_only=True): no NumPy arrays inside
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(d: dict[str, Any]) -> tuple:
    return (d["kind"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def check_optimizer_args(
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
    schedule_steps: int | None,
) -> None:
    """The optimizer and schedule arguments, checked before the model is built (AdamW would only reject
    some of them at the first step, without naming the argument)."""
    rules = [
        (lr > 0 and math.isfinite(lr), "model.lr", lr, "> 0 (e.g. 3e-3)"),
        (weight_decay >= 0, "model.weight_decay", weight_decay, ">= 0 (0: no decay)"),
        (all(0 <= b < 1 for b in betas), "model.betas", list(betas), "in [0, 1) (e.g. [0.9, 0.95])"),
        (warmup_steps >= 0, "model.warmup_steps", warmup_steps, ">= 0"),
        (0 <= min_lr_ratio <= 1, "model.min_lr_ratio", min_lr_ratio, "in [0, 1]"),
        (0 < decay_fraction <= 1, "model.decay_fraction", decay_fraction, "in (0, 1]"),
        (schedule_steps is None or schedule_steps >= 1, "model.schedule_steps", schedule_steps, ">= 1"),
    ]
    for ok, key, value, rule in rules:
        if not ok:
            raise UsageError(f"--{key} {value}: must be {rule}")


def as_config(config: Config | dict[str, Any] | None) -> Config:
    """The model's :class:`Config` from what ``LanguageModel(config=...)`` was given: a ``Config``, a
    dict of its fields (a checkpoint's ``hyper_parameters["config"]``, a YAML ``model.config`` block
    read by hand), or ``None`` (the ``tiny`` preset). A bad field raises ``ValueError`` naming
    ``model.config.<field>`` and the valid values."""
    if config is None:
        return get_config("tiny")
    if isinstance(config, Config):
        return config
    fields = [f.name for f in dataclasses.fields(Config)]
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
        raise ValueError(f"model.config: unknown Config field(s) {unknown}; valid: {', '.join(fields)}")
    try:
        return Config(**config)
    except ValueError as exc:
        raise ValueError(config_error(exc)) from exc


def config_error(exc: ValueError) -> str:
    """A :class:`Config` validation message (``Config.num_blocks=3 is invalid; ...``) as the key a user
    sets it with: ``model.config.num_blocks``."""
    return str(exc).replace("Config.", "model.config.", 1)
