"""``attnres fit|validate|test|predict``: the LightningCLI of :class:`LanguageModel` and
:class:`TextDataModule`.

Configs compose left to right: ``attnres fit -c configs/default.yaml -c configs/model/small.yaml
--trainer.max_steps 100``. Always on: atomic checkpoints (``last.ckpt`` every
``checkpoint.every_n_train_steps`` steps and at the end), the NaN guard (``nan_guard.*``), tokens/s
and MFU, the depth plots (``plots.*``), CSV logs (and TensorBoard when installed) under
``<trainer.default_root_dir>/<run_name>/version_<n>/``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from attnres.errors import RaiseOnParseError, UsageError, debug_mode
from lightning_modules.callbacks import DepthPlots, NaNGuard, NonFiniteLossError, ThroughputMonitor
from lightning_modules.checkpoint import AtomicCheckpointIO, load_checkpoint, stale_temp_files
from lightning_modules.configs import CONFIG_FLAGS, available, resolve_args
from lightning_modules.data import TextDataModule
from lightning_modules.module import LanguageModel, as_config
from lightning_modules.progress import LogLines, RichLossBar, TQDMLossBar
from lightning_modules.tokenizer import check_same_tokenizer, load_tokenizer

# `attnres fit ...` passes sys.argv[1:] as `args` (sys.argv itself must stay as it is: DDP re-launches
# the command from it), which LightningCLI would warn about
warnings.filterwarnings("ignore", message="LightningCLI.s args parameter is intended")
# `--help` shows each `model.config.<field>`'s attribute docstring (attnres.model.Config documents its
# fields that way, not in an Args: section)
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two
    ``every_n_train_steps`` (e.g. at ``max_steps``), so the last state is always resumable, and at
    the start of ``fit`` removes the temporary files of saves that a kill interrupted (one line says
    which)."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # resuming this directory's last.ckpt (a run moved or copied: the restored state's dirpath
        # differs, so Lightning forgets its last_model_path and would write last-v1.ckpt beside it)
        own = os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        ckpt = trainer.ckpt_path
        if ckpt and self.dirpath and not self.last_model_path and Path(ckpt).resolve() == Path(own).resolve():
            self.last_model_path = own

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not trainer.is_global_zero or not self.dirpath or "://" in str(self.dirpath):
            return
        stale = stale_temp_files(self.dirpath)
        if stale:
            size = sum(p.stat().st_size for p in stale)
            for p in stale:
                p.unlink(missing_ok=True)
            rank_zero_info(
                f"removed {len(stale)} temporary checkpoint file(s) of an interrupted save "
                f"({size / 2**20:.1f} MiB) from {self.dirpath}: {', '.join(p.name for p in stale)}"
            )

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# `trainer.max_steps` when nothing bounds the run (no max_steps, max_epochs or max_time): Lightning's own
# fallback is 1000 epochs, days of CPU time; 1000 steps of the default tiny model on the stdlib corpus
# is about 4M tokens (batch 16 x 256), minutes to tens of minutes on a CPU
DEFAULT_MAX_STEPS = 1000
# `torch_threads` when no config sets it (see default_threads): on CPU, 1 below this model width, else
# at most this many threads
SMALL_DIM = 512
MAX_DEFAULT_THREADS = 4


class AttnResParser(RaiseOnParseError, LightningArgumentParser):
    """The LightningCLI parser whose errors are one-line :class:`attnres.errors.ParseError`s."""

    refused = {
        "optimizer": "the model builds AdamW with weight-decay groups itself; set --model.lr, "
        "--model.weight_decay, --model.betas or --model.decay_embeddings",
        "lr_scheduler": "the model builds its warmup + decay schedule itself; set --model.schedule "
        "(cosine, wsd, constant), --model.warmup_steps, --model.min_lr_ratio or --model.schedule_steps",
    }


class AttnResCLI(LightningCLI):
    """LightningCLI with the attnres defaults and start-up checks (see the module docstring).

    ``--optimizer``/``--lr_scheduler`` are not offered (``auto_configure_optimizers=False``):
    :meth:`LanguageModel.configure_optimizers` builds AdamW with per-parameter weight-decay groups and
    the warmup/cosine/WSD schedule, which a replacement would silently drop; set them with
    ``--model.lr``, ``--model.weight_decay``, ``--model.betas``, ``--model.schedule`` and friends."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 1234)
        kwargs.setdefault("parser_class", AttnResParser)
        kwargs.setdefault("auto_configure_optimizers", False)
        self.resume: Resume | None = None  # fit --ckpt_path of a run under default_root_dir/run_name
        trainer_defaults = {"default_root_dir": "runs"}
        super().__init__(
            LanguageModel, TextDataModule, args=args, run=run, trainer_defaults=trainer_defaults, **kwargs
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=str,
            default="attnres",
            help="runs go to <trainer.default_root_dir>/<run_name>/version_<n>",
        )
        parser.add_argument(
            "--progress_bar",
            type=Literal["rich", "tqdm", "log"],
            default="rich",
            help="'rich' (Lightning's RichProgressBar) or 'tqdm' (its TQDMProgressBar), each showing "
            "train/loss without waiting for the GPU (the newest value it has finished), or 'log': plain "
            "lines for output that goes to a file (the first step's time, then every "
            "trainer.log_every_n_steps steps the loss, tokens/s, time so far and left; each validation)",
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="intra-op CPU threads (torch.set_num_threads); 1 avoids OpenMP spin-waiting "
            "on a busy machine, where small models otherwise slow down many times over. Default: "
            f"1 on CPU for models narrower than {SMALL_DIM}, else min(physical cores, "
            f"{MAX_DEFAULT_THREADS}); torch's own on GPU",
        )
        parser.add_lightning_class_args(NaNGuard, "nan_guard")  # before the plots: it drops bad gradients
        parser.add_lightning_class_args(FinalCheckpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 100}
        )
        parser.add_lightning_class_args(DepthPlots, "plots")
        # the model's vocabulary is the tokenizer's: a preset's own vocab_size (32768 for small) would
        # not match the data, so it is derived, not set
        parser.link_arguments("data.tokenizer", "model.config.vocab_size", compute_fn=tokenizer_vocab_size)

    # ------------------------------------------------------------------ start-up checks

    def _sub(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._sub()
        check_trainer_args(cfg.trainer)
        # the Config is built (and its fields checked) here, so a bad field stops before any data is
        # prepared, named as it is set: model.config.<field>
        as_config(cfg.model.config.as_dict())
        self._bounded = self.subcommand in (None, "fit") and bound_the_run(cfg.trainer)
        import torch

        threads = cfg.get("torch_threads")
        if not threads:
            threads = default_threads(cfg.trainer.get("accelerator"), cfg.model.config.dim)
        torch.set_num_threads(threads)
        root, run_name = cfg.trainer.default_root_dir or "runs", cfg.run_name
        if cfg.get("ckpt_path") == "last":  # Lightning's "last" looks in the new run's empty version dir
            cfg.ckpt_path = str(latest_checkpoint(root, run_name, cfg.checkpoint.dirpath))
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry") and "://" not in ckpt_path and not (
            Path(ckpt_path).is_dir()  # a sharded (DCP) checkpoint: the strategy checks it
        ):  # before any data is prepared: a damaged or wrong checkpoint stops here, in one line
            raw = load_checkpoint(ckpt_path)
            check_checkpoint_tokenizer(raw, ckpt_path, load_tokenizer(cfg.data.tokenizer).fingerprint)
            if self.subcommand in (None, "fit"):
                step = int(raw.get("global_step", 0))
                check_steps_left(ckpt_path, step, cfg.trainer.max_steps)
                self.resume = Resume.of(ckpt_path, step, root, run_name)
            del raw
        if self.subcommand in (None, "fit"):
            check_writable(cfg.trainer.default_root_dir or ".", "--trainer.default_root_dir")
            if cfg.checkpoint.dirpath:
                check_writable(cfg.checkpoint.dirpath, "--checkpoint.dirpath")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True):
            root = cfg.get("default_root_dir") or "runs"
            name = self._get(self.config, "run_name")
            # a resumed run logs on in its own version directory: one curve, one metrics.csv
            csv = ContinuedCSVLogger(root, name, self.resume) if self.resume else CSVLogger(root, name=name)
            loggers: list = [csv]
            if _tensorboard_available():
                loggers.append(
                    TensorBoardLogger(root, name=name, version=csv.version, default_hp_metric=False)
                )
            kwargs["logger"] = loggers
        plugins = cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        cbs = cfg.get("callbacks") or []
        cbs = list(cbs) if isinstance(cbs, list) else [cbs]
        # the `nan_guard:` section is the guard (configs saved before it existed list one in
        # trainer.callbacks); the throughput monitor first, so its batch-end clock stops before other
        # callbacks' work (plots)
        callbacks = [ThroughputMonitor()] + [c for c in cbs if not isinstance(c, NaNGuard)]
        if cfg.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kind = self._get(self.config, "progress_bar")
            callbacks.append({"rich": RichLossBar, "tqdm": TQDMLossBar, "log": LogLines}[kind]())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        if getattr(self, "_bounded", False) and self.trainer.is_global_zero:
            sys.stderr.write(
                f"attnres fit: no trainer.max_steps, max_epochs or max_time given: stopping after "
                f"{DEFAULT_MAX_STEPS} steps (set --trainer.max_steps)\n"
            )

    # ------------------------------------------------------------------ after fit

    def after_fit(self) -> None:
        summary = run_summary(self.trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            print(summary, flush=True)

    def after_predict(self) -> None:
        import torch

        preds = self.trainer.predict_loop.predictions or []
        if self.trainer.is_global_zero and preds:
            nll = torch.cat([p["nll"] for p in preds])
            print(
                f"predict: {len(nll)} sequences, mean NLL {nll.mean():.4f} nats/token "
                f"({nll.mean() / math.log(2):.4f} bits/token), min {nll.min():.4f}, max {nll.max():.4f}"
            )


def tokenizer_vocab_size(tokenizer: str) -> int:
    """``model.config.vocab_size`` from ``data.tokenizer`` (``byte`` or a ``tokenizer.json`` path)."""
    return load_tokenizer(tokenizer).vocab_size


def check_trainer_args(trainer: Any) -> None:
    """Trainer settings Lightning would reject late, with a long message, or not at all: step and epoch
    limits, and a GPU accelerator on a machine without CUDA."""
    import torch

    for key in ("max_steps", "max_epochs", "min_steps", "min_epochs"):
        value = trainer.get(key)
        if value is not None and value != -1 and value < 1 and not (key.startswith("min") and value == 0):
            raise UsageError(
                f"--trainer.{key} {value}: must be >= 1 (or -1: no limit); e.g. --trainer.{key} 100"
            )
    for key in ("val_check_interval", "log_every_n_steps", "accumulate_grad_batches"):
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UsageError(f"--trainer.{key} {value}: must be >= 1")
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"trainer.accelerator is {accelerator!r} but this machine has no CUDA device "
            "(torch.cuda.is_available() is False); drop -c configs/trainer/gpu.yaml (or the like) "
            "or pass --trainer.accelerator cpu"
        )


def bound_the_run(trainer: Any) -> bool:
    """Set ``trainer.max_steps`` to :data:`DEFAULT_MAX_STEPS` when nothing else ends the run (Lightning
    would run 1000 epochs); True if it did."""
    unbounded = trainer.get("max_steps", -1) in (-1, None) and trainer.get("max_epochs") in (None, -1)
    if unbounded and not trainer.get("max_time"):
        trainer.max_steps = DEFAULT_MAX_STEPS
        return True
    return False


def default_threads(accelerator: Any, dim: int) -> int:
    """``torch_threads`` when none is given. On CPU (and ``auto`` without CUDA): 1 for models narrower
    than :data:`SMALL_DIM` (their matmuls are too small to split, and OpenMP spin-waiting on a busy
    machine makes them slower: 12 steps of ``default.yaml`` (tiny preset) ran at 3,552 tokens/s on 1
    thread vs 1,071 on 2, on a loaded 2-core box), else ``min(physical cores, MAX_DEFAULT_THREADS)``.
    On a GPU torch's own setting (the CPU only feeds the device)."""
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    if on_gpu:
        return torch.get_num_threads()
    if dim < SMALL_DIM:
        return 1
    return max(1, min(physical_cores(), MAX_DEFAULT_THREADS))


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads counted once), from
    ``/proc/cpuinfo`` on Linux; the logical count elsewhere."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores = {
        (block.split("physical id")[1].split("\n")[0], block.split("core id")[1].split("\n")[0])
        for block in text.split("\n\n")
        if "core id" in block and "physical id" in block
    }
    return min(logical, len(cores)) if cores else logical


def check_checkpoint_tokenizer(checkpoint: dict, ckpt_path: str, fingerprint: dict) -> None:
    """Refuse a checkpoint trained with another tokenizer than ``--data.tokenizer``."""
    extra = checkpoint.get("attnres", {})
    if "tokenizer_fingerprint" in extra:
        check_same_tokenizer(fingerprint, extra["tokenizer_fingerprint"], f"the checkpoint {ckpt_path}")


def latest_checkpoint(root: str, run_name: str, dirpath: str | None = None) -> Path:
    """What ``--ckpt_path last`` means: the newest ``last.ckpt`` of the run ``<root>/<run_name>``
    (any ``version_<n>``), or ``<dirpath>/last.ckpt`` when ``--checkpoint.dirpath`` is set."""
    if dirpath:
        candidates = [Path(dirpath) / "last.ckpt"]
        where = f"{dirpath}/last.ckpt (--checkpoint.dirpath)"
    else:
        candidates = list(Path(root, run_name).glob("version_*/checkpoints/last.ckpt"))
        where = f"{Path(root, run_name)}/version_*/checkpoints/last.ckpt"
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoint at {where}; train first, or check --run_name and "
            "--trainer.default_root_dir (or give the checkpoint's path)"
        )
    return max(found, key=lambda c: c.stat().st_mtime)


def check_steps_left(ckpt_path: str, step: int, max_steps: int | None) -> None:
    """Refuse to resume a checkpoint that has already reached ``trainer.max_steps`` (Lightning would
    load it, run nothing and exit 0)."""
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is at step {step} and --trainer.max_steps is {max_steps}: nothing "
            f"left to train; raise --trainer.max_steps (e.g. {max(2 * step, step + 1)}) to continue"
        )


class Resume:
    """``fit --ckpt_path`` of a checkpoint under ``<root>/<run_name>/version_<n>/checkpoints``: the
    run goes on in ``version_<n>`` from ``step``."""

    def __init__(self, version: int, step: int) -> None:
        self.version, self.step = version, step

    @classmethod
    def of(cls, ckpt_path: str, step: int, root: str, run_name: str) -> Resume | None:
        """The run of ``ckpt_path`` when it is one of this root and run name (else None: a new version)."""
        ckpt = Path(ckpt_path).resolve()
        run_dir = Path(root, run_name).resolve()
        if ckpt.parent.name != "checkpoints" or ckpt.parent.parent.parent != run_dir:
            return None
        version = ckpt.parent.parent.name
        if not version.startswith("version_") or not version[len("version_") :].isdigit():
            return None
        # resuming writes into that version's checkpoints/ again: not the mistake Lightning warns of
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        return cls(int(version[len("version_") :]), step)


class ContinuedCSVLogger(CSVLogger):
    """``CSVLogger`` of a resumed run: logs on into the run's ``version_<n>/metrics.csv``, keeping the
    rows before the resumed step and dropping those at or after it (logged by the interrupted run after
    its last checkpoint, for weights that no longer exist), so the file holds one curve. (Lightning's
    writer deletes an existing ``metrics.csv``.)"""

    def __init__(self, root: str, name: str, resume: Resume) -> None:
        super().__init__(root, name=name, version=resume.version)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume.step)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # instead of deleting metrics.csv: keep rows < resume_step
        import csv

        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) < self.resume_step]
        with open(self.metrics_file_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = fields


def check_writable(directory: str | os.PathLike, flag: str) -> None:
    """Write a probe file into ``directory`` (creating it, then removing what was created, so a run
    stopped by a later check leaves nothing behind), or raise naming ``flag``."""
    path = Path(directory)
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(
            f"output directory {str(path)!r} is not writable ({exc.strerror or exc}); "
            f"choose another with {flag}"
        ) from exc
    finally:
        # rank 0 only: DDP's other ranks start later, all at once, and must not remove each other's probe
        if os.environ.get("LOCAL_RANK", "0") == "0":
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()


def run_summary(trainer: Trainer) -> str:
    """Where the checkpoint, metrics and plots of a finished ``fit`` are, and its last numbers."""
    m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    lines = ["", "attnres: training finished"]
    numbers = [f"{k} {m[k]:.4f}" for k in ("train/loss", "val/loss", "val/ppl") if k in m]
    if numbers:
        lines.append("  " + ", ".join(numbers) + f" (step {trainer.global_step})")
    speed = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    if speed is not None and speed.history:
        on_cpu = trainer.strategy.root_device.type == "cpu"
        mfu = (
            f"MFU {speed.median_mfu:.1%}"
            if speed.median_mfu is not None
            else "MFU n/a on CPU"
            if on_cpu
            else "MFU n/a (device not in metrics.PEAK_FLOPS)"
        )
        lines.append(f"  {speed.median_tokens_per_s:,.0f} tokens/s (median over steps), {mfu}")
    ck = trainer.checkpoint_callback
    if ck is not None and ck.last_model_path:
        lines.append(f"  checkpoint: {ck.last_model_path}")
    log_dir = Path(trainer.log_dir) if trainer.log_dir else None
    if log_dir is not None:
        if (log_dir / "metrics.csv").is_file():
            lines.append(f"  metrics:    {log_dir / 'metrics.csv'}")
        if any(log_dir.glob("events.out.tfevents.*")):
            lines.append(f"  tensorboard: tensorboard --logdir {log_dir}")
        plots = sorted((log_dir / "plots").glob("*.png")) if (log_dir / "plots").is_dir() else []
        if plots:
            lines.append(f"  plots:      {log_dir / 'plots'} ({', '.join(p.name for p in plots)})")
        if (log_dir / "config.yaml").is_file():
            lines.append(f"  config:     {log_dir / 'config.yaml'}")
    return "\n".join(lines)


def check_model_configs(argv: list[str]) -> list[str]:
    """``argv`` as it is, after checking that each ``-c model/<preset>`` names a file: a preset is picked
    by its config (``configs/model/<preset>.yaml``), so a wrong name says which presets there are."""
    values = [b for a, b in zip(argv, argv[1:]) if a in CONFIG_FLAGS]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if value.removeprefix("configs/").startswith("model/") and not Path(value).is_file():
            presets = [name for name in available() if name.startswith("model/")]
            raise UsageError(
                f"--config {value}: the file does not exist; the model presets are: {', '.join(presets)} "
                "(configs/model/<preset>.yaml)"
            )
    return argv


def run_lightning_cli(argv: list[str]) -> None:
    """Entry of ``attnres fit|validate|test|predict``. User errors (Lightning's
    ``MisconfigurationException`` among them) propagate to :func:`lightning_modules.main.main` (one line,
    exit 2); a NaN/inf loss stops with one line and exit 1."""
    try:
        AttnResCLI(args=check_model_configs(resolve_args(argv)))
    except MisconfigurationException as exc:  # Lightning's word for a bad Trainer setting
        raise UsageError(str(exc)) from exc
    except NonFiniteLossError as exc:
        if debug_mode():
            raise
        sys.stderr.write(f"attnres {argv[0]}: {exc}\n")
        sys.exit(1)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down the process group the strategy made (DDP/FSDP/PP) before the interpreter exits
    (:func:`attnres.parallel.close_process_groups` says why: a gloo thread left to interpreter shutdown
    aborts a finished run, "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from attnres.parallel import close_process_groups

        close_process_groups()
