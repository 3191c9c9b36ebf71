"""The progress `attnres fit` shows: Lightning's rich and tqdm bars with the training loss read without a
host sync, or plain lines for runs whose output goes to a file (``--progress_bar rich|tqdm|log``)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from lightning_modules.callbacks import OnHost, ThroughputMonitor

__all__ = ["LogLines", "RichLossBar", "TQDMLossBar"]


class _HostLoss:
    """Shows the training loss without ever waiting for the GPU.

    Lightning converts every ``prog_bar`` metric to a number whenever the bar refreshes, i.e. after
    every step: an ``.item()``, which waits until the GPU has finished the step just queued, so the GPU
    idles while the host prepares the next one (and the NaN guard's device-side decision gains nothing).
    :class:`~lightning_modules.module.LanguageModel` therefore logs ``train/loss`` without ``prog_bar``
    and keeps the tensor (``last_train_loss``); this bar copies it to pinned host memory without
    blocking and shows the newest copy the GPU has finished (up to 8 steps late while the GPU is behind
    the host; on a CPU, the step's own). Lightning still reads the logged metrics back every
    ``trainer.log_every_n_steps`` steps, for the loggers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copies: list[OnHost] = []  # oldest first
        self._shown: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None and not self.is_disabled:
            self._copies.append(OnHost(loss))
        self._take(wait=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._copies.clear()
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(wait=True)
        super().on_train_end(trainer, pl_module)

    def _take(self, wait: bool) -> None:
        """Show the newest copy the GPU has made (``wait``: the newest; 8 behind: wait for the oldest)."""
        while self._copies and (wait or len(self._copies) > 8 or self._copies[0].ready()):
            (value,) = self._copies.pop(0).values()
            self._shown = value.item()  # host memory: no device sync

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if self._shown is not None:
            items["train/loss"] = self._shown
        return items


class RichLossBar(_HostLoss, RichProgressBar):
    """Lightning's ``RichProgressBar`` showing the training loss without a host sync (:class:`_HostLoss`)."""


class TQDMLossBar(_HostLoss, TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` showing the training loss without a host sync (:class:`_HostLoss`)."""


class LogLines(_HostLoss, ProgressBar):
    """The progress as plain lines, for runs whose output goes to a file (``--progress_bar log``): how
    long the first step took (compilation, fla's autotuning and the data's start-up show there), then every
    ``every`` optimizer steps (default ``trainer.log_every_n_steps``) the step, the training loss (without
    a host sync, :class:`_HostLoss`), tokens/s, the time so far and an estimate of the time left, and
    each validation's loss and duration."""

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        self.every = every
        self._enabled = True
        self._t0 = self._first = self._val_t0 = 0.0
        self._steps0 = self._said = -1

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, text: str) -> None:
        if self._enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0, self._first, self._steps0, self._said = time.perf_counter(), 0.0, trainer.global_step, -1
        end = f" to {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        self._say(f"training from step {trainer.global_step}{end}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, now = trainer.global_step, time.perf_counter()
        if step == self._said or step == self._steps0:  # an accumulation micro-batch: no new step yet
            return
        if not self._first:
            self._first, self._said = now, step
            self._say(f"step {step}: the first step took {now - self._t0:.1f} s "
                      "(compilation, autotuning and data start-up included)")
            return
        if step % (self.every or max(trainer.log_every_n_steps, 1)):
            return
        self._said = step
        loss = "-" if self._shown is None else f"{self._shown:.4f}"
        monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        rate = f"  {monitor.tokens_per_s:,.0f} tok/s" if monitor is not None and monitor.history else ""
        left = ""
        if trainer.max_steps and trainer.max_steps > step:  # at the pace since the first step
            per_step = (now - self._first) / max(step - self._steps0 - 1, 1)
            left = f"  ~{(trainer.max_steps - step) * per_step:.0f} s left"
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        self._say(f"step {step}{total}  loss {loss}{rate}  elapsed {now - self._t0:.0f} s{left}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")  # validation has ended: reading it waits for nothing
        shown = "-" if loss is None else f"{float(loss):.4f}"
        self._say(f"validation at step {trainer.global_step}: val/loss {shown} "
                  f"({time.perf_counter() - self._val_t0:.1f} s)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        loss = "" if self._shown is None else f", last loss {self._shown:.4f}"
        self._say(f"done: step {trainer.global_step} after {time.perf_counter() - self._t0:.0f} s{loss}")
