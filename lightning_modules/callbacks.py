"""Callbacks: the NaN guard, throughput/MFU, the progress bars and the depth plots (the checkpoint
plugin, :class:`AtomicCheckpointIO`, is in :mod:`lightning_modules.checkpoint`)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules import metrics, plots
from lightning_modules.checkpoint import AtomicCheckpointIO  # noqa: F401  (imported from here too)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss (raised before the backward pass of that step; with
    ``NaNGuard(defer=True)`` once the device's flag has reached the host, at the latest at the end of the
    next step, the bad step's own update skipped)."""


class NonFiniteGradientError(RuntimeError):
    """Training stopped after ``NaNGuard.max_consecutive_bad_steps`` optimizer steps in a row had
    NaN/inf gradients (none of them updated the parameters)."""


class OnHost:
    """Device tensors copied into pinned host memory without blocking the host (CPU tensors: cloned).
    :meth:`ready` asks without waiting; :meth:`values` waits, if need be, for the GPU to have made them
    (a CUDA event: no device-wide sync, and nothing ``torch.cuda.set_sync_debug_mode`` reports)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event = None
        if tensors[0].is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors):
                host.copy_(t.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensors[0].device))  # the stream of the copies
        else:
            self._host = [t.detach().clone() for t in tensors]

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host


class NaNGuard(L.Callback):
    """Keeps non-finite values out of the weights, deciding on every rank together.

    * A NaN/inf **loss** stops training (:class:`NonFiniteLossError`) before its backward pass and
      optimizer step, so no checkpoint with poisoned weights is written; the last good checkpoint
      stays as it was.
    * NaN/inf **gradients** (checked after the backward, and after fp16's unscaling, before
      clipping and the optimizer step) skip that step: every gradient is dropped, so AdamW changes
      nothing (no update, no weight decay, no moment update) and the MoE router bias stays; the step
      counter and the learning-rate schedule still advance, as with GradScaler's skips. A warning
      names the step; ``max_consecutive_bad_steps`` such steps in a row stop training
      (:class:`NonFiniteGradientError`). Under fp16 mixed precision the GradScaler skips these steps
      itself and halves its loss scale; they count here too (a few at the start are normal).

    Under ``PipelineParallelStrategy`` both checks run too: the loss is the one the last stage
    broadcasts to every rank, each rank checks its own stages' gradients, and the decision is
    all-reduced over all ranks. There the schedule has already run the backward passes when the loss
    is checked; the optimizer step is still prevented.

    ``defer=True`` (``configs/trainer/gpu.yaml``): the same decisions without a host sync in the step,
    in one process whose optimizer is a fused AdamW without a GradScaler (else the guard works as above). The
    checks stay on the device: the fused kernel skips the update itself when the step's loss or
    gradients are not finite (its ``found_inf``, as GradScaler uses it; the step count is kept) and the
    MoE router bias keeps still (``LanguageModel`` reads ``step_finite``). The flags travel to the host
    without blocking it (:class:`OnHost`); the host acts on them once the GPU has made them, at the
    latest at the end of the next step, when that step's work is already queued (so the GPU never
    waits for the host), and then warns, counts or stops as above: a NaN loss stops training a step
    later (or at the end), its own update skipped, so no checkpoint holds poisoned weights either.

    Args:
        max_consecutive_bad_steps: stop at this many optimizer steps in a row with non-finite
            gradients (1: at the first one; a finite step resets the count).
        check_gradients: the gradient check (one max-norm over all gradients, and without ``defer`` one
            host sync per step; turn it off to save that time when the loss check is enough).
        defer: decide on the device and read the decision without blocking (see above).
    """

    def __init__(self, max_consecutive_bad_steps: int = 10, check_gradients: bool = True,
                 defer: bool = False) -> None:
        if max_consecutive_bad_steps < 1:
            raise ValueError(f"max_consecutive_bad_steps must be >= 1, got {max_consecutive_bad_steps}")
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.check_gradients = check_gradients
        self.defer = defer
        self.consecutive_bad_steps = 0
        self.skipped_steps: list[int] = []  # global steps whose update was skipped
        self._loss_finite: torch.Tensor | None = None
        self._pending: list[tuple[int, OnHost]] = []  # deferred steps, oldest first: step, (loss ok, ok)

    def _deferred(self, trainer: L.Trainer) -> bool:
        """Whether this step decides on the device: ``defer``, one process (several ranks decide together
        on the host, as above: the device-side decision across ranks is not tested yet), one fused AdamW
        and no GradScaler."""
        if not self.defer or trainer.world_size > 1 or len(trainer.optimizers) != 1:
            return False
        opt = trainer.optimizers[0]
        return bool(opt.defaults.get("fused")) and getattr(trainer.precision_plugin, "scaler", None) is None

    def _settle(self, trainer: L.Trainer, wait_before: float) -> None:
        """Act on the deferred decisions the GPU has made, oldest first, waiting for those of steps
        before ``wait_before``."""
        while self._pending:
            step, flags = self._pending[0]
            if step >= wait_before and not flags.ready():
                return
            self._pending.pop(0)
            loss_ok, step_ok = flags.values()
            if not bool(loss_ok):
                self._pending.clear()
                raise NonFiniteLossError(
                    f"the training loss was not finite (NaN/inf) at step {step} (lr {_lr(trainer):.3g}); "
                    f"that step's update was skipped and training stopped. {_loss_advice(trainer)}")
            self._after_step(trainer, step, bool(step_ok), local=False)

    def _forget(self) -> None:
        """Drop the deferred decisions in flight (a guard reused for another fit starts afresh)."""
        self._pending.clear()
        self._loss_finite = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._forget()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._forget()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._settle(trainer, wait_before=-1)  # only what is already on the host

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # this step's work is queued: waiting for an earlier step's flags leaves the GPU busy
        self._settle(trainer, wait_before=trainer.global_step - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, wait_before=float("inf"))

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._deferred(trainer):  # every micro-batch of the optimizer step (gradient accumulation)
            finite = torch.isfinite(loss.detach()).all()
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
            return
        finite = local = bool(torch.isfinite(loss.detach()).all())
        # every rank must stop together: a rank that raised alone would leave the others waiting in
        # the gradient all-reduce forever (a collective per step, one boolean)
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        raise NonFiniteLossError(
            f"the training loss is {loss.item()} at step {trainer.global_step} (lr {_lr(trainer):.3g})"
            f"{'' if not local else ' on this rank but not finite on another'}; "
            f"training stopped before this step's update. {_loss_advice(trainer)}"
        )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self._deferred(trainer) and self._loss_finite is not None:
            loss_ok = self._loss_finite
            ok = loss_ok & finite_grads(pl_module.parameters()) if self.check_gradients else loss_ok
            optimizer.found_inf = (~ok).float()  # the fused AdamW kernel skips the update when it is 1
            pl_module.step_finite = ok
            self._pending.append((trainer.global_step, OnHost(loss_ok, ok)))
            self._loss_finite = None
            return
        if not self.check_gradients:
            return
        finite = local = grads_are_finite(pl_module.parameters())
        if trainer.world_size > 1:  # every rank skips together (FSDP and PP ranks hold different grads)
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive_bad_steps = 0
            return
        pl_module.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
        self._after_step(trainer, trainer.global_step, False, local)

    def _after_step(self, trainer: L.Trainer, step: int, finite: bool, local: bool) -> None:
        """Count a step with non-finite gradients (``finite`` False; ``local``: this rank's were finite),
        warn, or stop at ``max_consecutive_bad_steps``; a finite step resets the count."""
        if finite:
            self.consecutive_bad_steps = 0
            return
        self.consecutive_bad_steps += 1
        self.skipped_steps.append(step)
        where = " (on another rank)" if local else ""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fp16 = "; the fp16 GradScaler lowers its loss scale" if scaler is not None else ""
        n, limit = self.consecutive_bad_steps, self.max_consecutive_bad_steps
        if n >= limit:
            raise NonFiniteGradientError(
                f"non-finite (NaN/inf) gradients{where} at {n} optimizer steps in a row, the last at step "
                f"{step} (lr {_lr(trainer):.3g}); none of them updated the weights (NaNGuard"
                f".max_consecutive_bad_steps={limit}); training stopped. Last good checkpoint: "
                f"{_last_checkpoint(trainer)}. Try a lower model.lr, a longer model.warmup_steps, "
                "gradient clipping (trainer.gradient_clip_val) or bf16 instead of fp16, then resume with "
                "--ckpt_path."
            )
        rank_zero_warn(
            f"NaNGuard: non-finite (NaN/inf) gradients{where} at step {step}: this step's update is "
            f"skipped{fp16} ({n} in a row; training stops at {limit})"
        )


def finite_grads(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Whether every gradient element is finite, as a 0-dim bool tensor on the gradients' device (this
    rank's: DTensor gradients are checked by their local shard): the max-norm is NaN/inf exactly when an
    element is, and cannot overflow as a sum of squares can."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf")))


def grads_are_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """:func:`finite_grads` read on the host (one host sync)."""
    return bool(finite_grads(parameters))


def _loss_advice(trainer: L.Trainer) -> str:
    """What to do after a non-finite loss stopped training."""
    return (f"Last good checkpoint: {_last_checkpoint(trainer)}. Try a lower model.lr, a longer "
            "model.warmup_steps or gradient clipping (trainer.gradient_clip_val), then resume with "
            "--ckpt_path.")


def _lr(trainer: L.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")


def _last_checkpoint(trainer: L.Trainer) -> str:
    return getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"


class ThroughputMonitor(L.Callback):
    """Logs ``train/tokens_per_s`` (all ranks), ``train/mfu`` (model FLOPs utilisation against the
    device's peak from :data:`metrics.PEAK_FLOPS`) and ``train/peak_memory_gb`` (the most the caching
    allocator has reserved so far, GiB); the last two not on CPU, where they do not apply.
    Time is measured from batch start to batch end, so data loading between batches is excluded
    and validation is not counted. On CUDA the interval is taken between two CUDA events on the
    step's stream and read one step later (each step's numbers are logged at the end of the next, the
    last step's at the end of training): the monitor never waits for the device, so the host keeps
    queueing work ahead of it (a ``synchronize`` at each batch start and end cost the Lightning step
    ~7 % against a hand-written loop on the H200)."""

    def __init__(self) -> None:
        self._t0: Any = 0.0
        self._pending: tuple[Any, Any, torch.Size] | None = None  # a CUDA step: start, end, token ids' shape
        self.tokens_per_s = float("nan")
        self.mfu: float | None = None
        self.history: list[float] = []  # tokens/s of every step

    @property
    def median_mfu(self) -> float | None:
        return None if self.mfu is None else self.median_tokens_per_s * self._mfu_per_token_s

    @property
    def median_tokens_per_s(self) -> float:
        h = sorted(self.history)
        return h[len(h) // 2] if h else float("nan")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type != "cuda":
            dt = time.perf_counter() - self._t0
            self._record(trainer, pl_module, batch["input_ids"].shape, dt, log=True)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        previous, self._pending = self._pending, (self._t0, end, batch["input_ids"].shape)
        if previous is not None:
            self._record_events(trainer, pl_module, previous, log=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # the last step: counted, not logged (no logging after training)
            self._record_events(trainer, pl_module, self._pending, log=False)
            self._pending = None

    def _record_events(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: tuple[Any, Any, torch.Size], log: bool
    ) -> None:
        start, end, shape = step
        end.synchronize()  # an earlier step: done, or about to be, while this step's work stays queued
        self._record(trainer, pl_module, shape, start.elapsed_time(end) / 1e3, log)

    def _record(
        self, trainer: L.Trainer, pl_module: L.LightningModule, shape: torch.Size, dt: float, log: bool
    ) -> None:
        tokens = shape.numel() * data_parallel_size(trainer)  # the ranks of one pipeline share a batch
        self.tokens_per_s = tokens / max(dt, 1e-9)
        self.history.append(self.tokens_per_s)
        peak = metrics.peak_flops(pl_module.device)
        if peak is not None:
            self._mfu_per_token_s = pl_module.flops_per_token(shape[1]) / (peak * trainer.world_size)
            self.mfu = self.tokens_per_s * self._mfu_per_token_s
        if not log:
            return
        # numbers as CPU tensors: Lightning would copy each to the GPU, a host sync each (metrics.on_host)
        pl_module.log("train/tokens_per_s", metrics.on_host(self.tokens_per_s), on_step=True, on_epoch=False)
        if self.mfu is not None:
            pl_module.log("train/mfu", metrics.on_host(self.mfu), on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            reserved = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
            pl_module.log("train/peak_memory_gb", metrics.on_host(reserved), on_step=True, on_epoch=False)


def data_parallel_size(trainer: L.Trainer) -> int:
    """Ranks that read different batches: the world size, except under pipeline parallelism, where
    the stages of one pipeline read the same batch (the strategy's sampler replicas)."""
    kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kw.get("num_replicas", trainer.world_size))


class DepthPlots(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training: runs the model with
    ``return_stats`` on a fixed validation batch, logs the depth-attention entropy and router load
    balance, and writes the depth-attention heatmap, the magnitude-vs-depth and the
    gradient-norm-vs-depth plots to ``<run dir>/plots`` (and to TensorBoard when it is a logger).

    Args:
        every_n_steps: how often (optimizer steps); 0 = only at the end of training.
        plots: write PNGs (False: log the scalars only).
        keep_history: also keep a copy of every plot named by its step (``*_step000100.png``).
    """

    def __init__(self, every_n_steps: int = 100, plots: bool = True, keep_history: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.plots = plots
        self.keep_history = keep_history
        self._grads: dict[str, float] = {}
        self._last_step = -1
        self.written: list[Path] = []

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step + 1  # the step this update completes
        if self._due(trainer, step) or step == trainer.max_steps:
            self._grads = metrics.grad_norms_by_depth(pl_module.model.named_parameters())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and self._due(trainer, step):
            self._run(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0:
            self._run(trainer, pl_module, trainer.global_step)

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        dm = trainer.datamodule
        n = min(dm.val_batch_size, 8)
        items = [dm.val_set[i] for i in range(min(n, len(dm.val_set)))]
        return {k: torch.stack([it[k] for it in items]).to(pl_module.device) for k in items[0]}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._last_step = step
        model = pl_module.model
        if getattr(model, "embed", None) is None or getattr(model, "lm_head", None) is None:
            return  # a pipeline stage holds part of the decoder: no full forward to take statistics from
        stats = pl_module.depth_stats(self._batch(trainer, pl_module))
        if trainer.is_global_zero:
            # straight to the loggers, once (self.log from this hook would repeat the value at every
            # later logging step); at the step Lightning gives the batch that just ran
            scalars = summary_scalars(stats)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=max(step - 1, 0))
        log_dir = trainer.log_dir  # a collective under DDP (broadcast from rank 0): every rank asks
        if not (self.plots and trainer.is_global_zero):
            return
        out_dir = Path(log_dir or trainer.default_root_dir) / "plots"
        written = write_plots(stats, self._grads, out_dir, f"step {step}")
        if self.keep_history:
            for p in written:
                shutil.copyfile(p, p.with_name(f"{p.stem}_step{step:06d}.png"))
        self.written = written
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                import matplotlib.image as mpimg

                for p in written:
                    img = mpimg.imread(p)[..., :3]
                    logger.experiment.add_image(f"plots/{p.stem}", img, step, dataformats="HWC")
        rank_zero_info(f"plots (step {step}): {out_dir}")


def summary_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """Scalars from :meth:`LanguageModel.depth_stats`: depth-attention entropy (normalised to [0, 1])
    and router load balance (max/mean expert load, worst and mean over MoE layers)."""
    out: dict[str, float] = {}
    if stats.get("matrix") is not None:
        out["depth/attention_entropy"] = metrics.normalized_depth_entropy(torch.as_tensor(stats["matrix"]))
    loads = stats.get("router_load") or []
    if loads:
        balance = [metrics.load_balance(torch.as_tensor(x)) for x in loads]
        out["moe/load_balance_max"] = max(balance)
        out["moe/load_balance_mean"] = sum(balance) / len(balance)
    return out


def write_plots(stats: dict[str, Any], grads: dict[str, float], out_dir: Path, title: str) -> list[Path]:
    """Write whichever plots the stats allow into ``out_dir``; returns their paths."""
    written = []
    if stats.get("matrix") is not None:
        written.append(
            plots.depth_heatmap(
                stats["matrix"],
                stats["mode"],
                out_dir / "depth_attention.png",
                f"depth attention ({stats['mode']} AttnRes), {title}",
            )
        )
    if stats.get("output_rms") is not None:
        written.append(
            plots.magnitudes(
                stats["output_rms"],
                stats["hidden_rms"],
                out_dir / "magnitudes.png",
                f"magnitude vs depth ({stats['mode']}), {title}",
            )
        )
    if grads:
        written.append(
            plots.grad_norms(grads, out_dir / "grad_norms.png", f"gradient norm vs depth, {title}")
        )
    return written
