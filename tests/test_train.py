"""Training through the LightningCLI: fit in a subprocess, exact resume, perplexity, plots, start-up
errors, the NaN guard, atomic checkpoints, generation and ``attnres compare``.

Every run uses ``configs/default.yaml`` with a micro model (2 layers of width 64, seq 32, batch 2) on
top, so the whole file takes well under a minute of compute on 2 cores. The micro model is composed on
the ``tiny`` preset's config (``configs/model/tiny.yaml``): in a project generated with another default
preset (``small``: KDA heads of 128) its dimensions would not fit that preset's, and these tests must
not depend on the chosen one."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from attnres.model import get_config
from lightning_modules import commands, metrics
from lightning_modules.callbacks import (
    AtomicCheckpointIO,
    NaNGuard,
    NonFiniteGradientError,
    NonFiniteLossError,
)
from lightning_modules.cli import AttnResCLI, run_lightning_cli
from lightning_modules.main import main as attnres_main
from lightning_modules.module import LanguageModel, LRSchedule

ROOT = Path(__file__).resolve().parents[1]

MICRO = """\
run_name: micro
progress_bar: tqdm
torch_threads: 1
trainer:
  max_steps: 3
  val_check_interval: 2
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_model_summary: false
model:
  config:
    residual: block
    moe: true
    num_layers: 2
    num_blocks: 2
    dim: 64
    full_attn_every: 2
    mla_qk_nope_dim: 16
    mla_qk_shared_dim: 8
    mla_kv_rank: 32
    num_experts: 4
    expert_dim: 32
    mlp_dim: 128
    router_bias_update_rate: 0.001  # the preset's (configs/model/tiny.yaml sets 0.01)
  warmup_steps: 2
data:
  seq_len: 32
  batch_size: 2
  cache_dir: {cache}
checkpoint:
  every_n_train_steps: 2
plots:
  every_n_steps: 2
"""


# as `torch_threads: 1` in the runs: tiny models gain nothing from 2 threads, and on a busy machine
# OpenMP spin-waiting makes them many times slower (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> list[str]:
    """``-c`` arguments: the default config, the tiny preset and the micro model on top."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "micro.yaml").write_text(MICRO.format(cache=d / "cache"))
    tiny = str(ROOT / "configs/model/tiny.yaml")
    return ["-c", str(ROOT / "configs/default.yaml"), "-c", tiny, "-c", str(d / "micro.yaml")]


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory) -> dict:
    """``attnres fit`` of 3 steps in a subprocess (the command a user types)."""
    out = tmp_path_factory.mktemp("fit")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_modules",
            "fit",
            *micro,
            "--trainer.default_root_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    run_dir = out / "micro" / "version_0"
    return {"proc": proc, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")}


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fail_message(argv: list[str], capsys) -> str:
    """Run ``attnres <argv>`` in-process, expect exit status 2 (a user error), return what it wrote to
    stderr: one line, ``attnres <subcommand>: <message>``."""
    with pytest.raises(SystemExit) as exc:
        attnres_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnres {argv[0]}: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------- fit


def test_fit_three_steps_through_the_cli(trained):
    proc, run_dir = trained["proc"], trained["run_dir"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(train_losses(run_dir)) == [0, 1, 2]
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["attnres"]["tokenizer"] == {"kind": "byte"}
    # the summary says where things are
    for what in ("checkpoint:", "metrics:", "plots:", str(trained["ckpt"])):
        assert what in proc.stdout
    assert (run_dir / "config.yaml").is_file()


def test_fit_writes_depth_plots(trained, tmp_path):
    for name in ("depth_attention.png", "magnitudes.png", "grad_norms.png"):
        assert is_png(trained["run_dir"] / "plots" / name), name
    rows = read_metrics(trained["run_dir"])
    entropy = [float(r["depth/attention_entropy"]) for r in rows if r.get("depth/attention_entropy")]
    balance = [float(r["moe/load_balance_max"]) for r in rows if r.get("moe/load_balance_max")]
    assert entropy and 0.0 < entropy[0] <= 1.0
    assert balance and balance[0] >= 1.0
    # and `attnres plot --ckpt` from the checkpoint alone
    written = commands.plot(str(trained["ckpt"]), output_dir=str(tmp_path / "p"), batch_size=2)
    assert len(written) == 3 and all(is_png(Path(p)) for p in written)


def test_perplexity_is_exp_of_mean_loss(trained, micro):
    cli = AttnResCLI(
        args=[
            "validate",
            *micro,
            "--ckpt_path",
            str(trained["ckpt"]),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    m = cli.trainer.callback_metrics
    assert math.isclose(float(m["val/ppl"]), math.exp(float(m["val/loss"])), rel_tol=1e-5)


def test_resume_reproduces_the_uninterrupted_loss_curve(micro, tmp_path):
    common = [
        *micro,
        "--model.schedule_steps",
        "20",
        "--trainer.limit_val_batches",
        "0",
        "--plots.every_n_steps",
        "0",
        "--plots.plots",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_train_steps",
        "5",
    ]
    full = AttnResCLI(
        args=["fit", *common, "--trainer.max_steps", "20", "--trainer.default_root_dir", str(tmp_path / "a")]
    )
    first = AttnResCLI(
        args=["fit", *common, "--trainer.max_steps", "10", "--trainer.default_root_dir", str(tmp_path / "b")]
    )
    ckpt = first.trainer.checkpoint_callback.last_model_path
    second = AttnResCLI(
        args=[
            "fit",
            *common,
            "--trainer.max_steps",
            "20",
            "--trainer.default_root_dir",
            str(tmp_path / "b"),
            "--ckpt_path",
            ckpt,
        ]
    )
    uninterrupted = train_losses(Path(full.trainer.log_dir))
    resumed = {**train_losses(Path(first.trainer.log_dir)), **train_losses(Path(second.trainer.log_dir))}
    assert sorted(resumed) == list(range(20))
    assert resumed == uninterrupted  # bit for bit
    assert uninterrupted[19] < uninterrupted[0]


# ----------------------------------------------------------------------------- bad input at start-up


def test_unknown_residual_mode(micro, capsys):
    err = fail_message(["fit", *micro, "--model.config.residual", "sideways"], capsys)
    assert "--model.config.residual sideways: expected one of standard, full, block" in err


def test_num_blocks_must_divide_the_depth(micro, capsys):
    err = fail_message(["fit", *micro, "--model.config.num_blocks", "3"], capsys)
    assert "model.config.num_blocks=3 is invalid; valid: [1, 2]" in err


def test_missing_data_path(micro, capsys, tmp_path):
    err = fail_message(
        ["fit", *micro, "--data.corpus", "files", "--data.files", f"[{tmp_path}/none/*.txt]"], capsys
    )
    assert "no file matches" in err and "fix the pattern" in err


def test_empty_data_path(micro, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    err = fail_message(
        ["fit", *micro, "--data.corpus", "files", "--data.files", f"[{tmp_path}/*.txt]"], capsys
    )
    assert "are all empty" in err


def test_sequence_longer_than_the_model_max(micro, capsys, tmp_path):
    err = fail_message(
        ["fit", *micro, "--data.seq_len", "512", "--trainer.default_root_dir", str(tmp_path)], capsys
    )
    assert "data.seq_len=512 is above the model's max_seq_len=256" in err
    assert "--model.config.max_seq_len" in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))  # no step ran


def test_unwritable_output_directory(micro, capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")  # a directory cannot be made under a file (even as root)
    err = fail_message(
        ["fit", *micro, "--trainer.default_root_dir", str(tmp_path / "a_file" / "runs")], capsys
    )
    assert "is not writable" in err and "--trainer.default_root_dir" in err


def test_tokenizer_mismatch_with_checkpoint(trained, micro, capsys, tmp_path):
    corpus = tmp_path / "txt"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"text number {i} " * 200)
    bpe = commands.tokenizer_train(
        vocab_size=300, corpus="files", files=[str(corpus / "*.txt")], cache_dir=str(tmp_path / "cache")
    )
    err = fail_message(
        [
            "fit",
            *micro,
            "--ckpt_path",
            str(trained["ckpt"]),
            "--data.tokenizer",
            bpe,
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ],
        capsys,
    )
    assert "tokenizer/vocabulary mismatch" in err and "data.tokenizer" in err


# ----------------------------------------------------------------------------- NaN guard, atomic checkpoints


class PoisonAt(L.Callback):
    """Sets the embedding to NaN right before step ``step`` (after that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.embed.weight.fill_(float("nan"))


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(micro, tmp_path):
    cli = AttnResCLI(
        args=[
            *micro,
            "--trainer.max_steps",
            "6",
            "--checkpoint.every_n_train_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--plots.every_n_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    cli.trainer.callbacks.insert(0, PoisonAt(3))
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 3.*Last good checkpoint: .*last\.ckpt"
    ):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_atomic_checkpoint_io_leaves_the_old_file_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 1}
    assert os.stat(path).st_mode & 0o044  # readable like a normal file, not mkstemp's 0600


# ----------------------------------------------------------------------------- skipped steps


def _micro_module(**kw) -> LanguageModel:
    torch.manual_seed(0)
    config = get_config(
        "tiny", num_layers=2, num_blocks=2, dim=32, vocab_size=64, max_seq_len=16, moe=True,
        num_experts=4, top_k=2, full_attn_every=2, kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16,
        mla_qk_shared_dim=8, mla_kv_rank=16, mlp_dim=64, expert_dim=16, router_bias_update_rate=0.01,
    )  # fmt: skip
    return LanguageModel(config, warmup_steps=1, schedule="constant", **kw)


def _micro_loader(n: int = 8, batch_size: int = 2) -> torch.utils.data.DataLoader:
    tokens = torch.randint(0, 64, (n, 17), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def _micro_trainer(max_steps: int, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=callbacks, **kw,
    )  # fmt: skip


class PoisonGradsAt(L.Callback):
    """Sets one gradient element to ``value`` after the backward of each step in ``steps`` (the loss
    stays finite)."""

    def __init__(self, steps: set[int], value: float = float("inf")) -> None:
        self.steps, self.value = steps, value

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps:
            pl_module.model.lm_head.weight.grad[0, 0] = self.value


class RecordAfterStep(L.Callback):
    """Per step: the router biases, a copy of the parameters and the loss-scale, after the update."""

    def __init__(self) -> None:
        self.bias: list[torch.Tensor] = []
        self.params: list[dict[str, torch.Tensor]] = []
        self.scale: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        moes = pl_module.model.moe_layers().values()
        self.bias.append(torch.cat([m.score_bias.clone() for m in moes]))
        self.params.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale.append(scaler.get_scale() if scaler is not None else 1.0)


def test_router_bias_is_not_updated_on_a_step_the_grad_scaler_skipped():
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Fp16ScalerWithoutAutocast(MixedPrecision):
        # Lightning's fp16 AMP step and a real GradScaler (scale, unscale, skip on inf, update); the
        # forward stays fp32, as fp16 autocast is not for CPUs
        def forward_context(self):
            import contextlib

            return contextlib.nullcontext()

    plugin = Fp16ScalerWithoutAutocast("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    rec = RecordAfterStep()
    model = _micro_module()
    trainer = _micro_trainer(3, [PoisonGradsAt({1}), rec], plugins=[plugin])
    trainer.fit(model, _micro_loader())
    assert rec.scale[1] == rec.scale[0] / 2 and rec.scale[2] == rec.scale[1]  # GradScaler skipped step 1
    assert all(torch.equal(rec.params[1][n], rec.params[0][n]) for n in rec.params[0])
    rate = 0.01
    assert not torch.equal(rec.bias[0], torch.zeros_like(rec.bias[0]))  # a real step moves the bias
    assert torch.equal(rec.bias[1], rec.bias[0])  # the skipped one does not
    assert (rec.bias[2] - rec.bias[1]).abs().max() == pytest.approx(rate)  # the next real step does
    # the skipped step's expert loads were dropped, not carried into the next update
    assert all(m.tokens_per_expert.sum() == 0 for m in model.model.moe_layers().values())


class GradsAlive(L.Callback):
    """How many parameters hold a gradient at each step's start and at each forward's start."""

    def __init__(self) -> None:
        self.at_start: list[int] = []
        self.at_forward: list[int] = []

    @staticmethod
    def count(module) -> int:
        return sum(p.grad is not None for p in module.parameters())

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_pre_hook(lambda m, args: self.at_forward.append(self.count(m)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_start.append(self.count(pl_module))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_the_update_not_held_through_the_next_forward(accumulate):
    # Lightning zeroes the gradients between training_step and backward: without the module freeing
    # them after the update, the previous step's gradients are alive during every forward (the peak)
    alive = GradsAlive()
    model = _micro_module()
    trainer = _micro_trainer(3, [alive], accumulate_grad_batches=accumulate)
    trainer.fit(model, _micro_loader(n=12))
    n = sum(1 for _ in model.parameters())
    # an optimizer step's first micro-batch starts with no gradient; within an accumulated step the
    # second starts with the first's (kept for the sum)
    assert alive.at_start[::accumulate] == [0] * 3
    assert alive.at_start[1::accumulate] == ([n] * 3 if accumulate == 2 else [0] * 2)
    assert alive.at_forward == alive.at_start  # the forward is where the activations peak
    assert all(p.grad is None for p in model.parameters())


class BarSeen(L.Callback):
    """After the progress bar's batch end: the loss it shows, this step's loss, and whether Lightning's
    own progress-bar metrics hold the training loss (which it would read back, a sync, every step)."""

    def __init__(self, bar) -> None:
        self.bar, self.shown, self.losses, self.in_lightning_pbar = bar, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.shown.append(self.bar.get_metrics(trainer, pl_module).get("train/loss"))
        self.losses.append(pl_module.last_train_loss.item())
        self.in_lightning_pbar.append(any(k.startswith("train/") for k in trainer.progress_bar_metrics))


@pytest.mark.parametrize("kind,gpu_behind", [("rich", False), ("tqdm", False), ("rich", True)])
def test_progress_bar_shows_the_loss_without_lightning_reading_it_back(kind, gpu_behind, monkeypatch):
    from lightning_modules import callbacks
    from lightning_modules.progress import RichLossBar, TQDMLossBar

    if gpu_behind:  # no copy arrives by itself: the bar waits only at the end (or 8 steps behind)
        monkeypatch.setattr(callbacks.OnHost, "ready", lambda self: False)

    bar = RichLossBar() if kind == "rich" else TQDMLossBar()
    seen = BarSeen(bar)
    model = _micro_module()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[bar, seen])
    trainer.fit(model, _micro_loader())
    assert not any(seen.in_lightning_pbar)
    # on a CPU the copy is the step's own at once
    assert seen.shown == ([None] * 4 if gpu_behind else seen.losses)
    assert bar.get_metrics(trainer, model)["train/loss"] == seen.losses[-1]
    assert trainer.callback_metrics["train/loss"].item() == seen.losses[-1]  # still logged


def test_the_cli_adds_its_progress_bar_unless_one_is_configured(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from attnres.errors import ParseError
    from lightning_modules.cli import AttnResCLI
    from lightning_modules.progress import LogLines, RichLossBar, TQDMLossBar

    monkeypatch.chdir(tmp_path)
    bars = {}
    for name, extra in (("rich", []), ("tqdm", ["--progress_bar", "tqdm"]),
                        ("log", ["--progress_bar", "log"]),
                        ("own", ["--trainer.callbacks+=TQDMProgressBar", "--progress_bar", "rich"])):
        cli = AttnResCLI(args=["--data.cache_dir", str(tmp_path), *extra], run=False)
        bars[name] = [type(c) for c in cli.trainer.callbacks
                      if isinstance(c, TQDMProgressBar | RichLossBar | LogLines)]
    assert bars == {"rich": [RichLossBar], "tqdm": [TQDMLossBar], "log": [LogLines], "own": [TQDMProgressBar]}
    with pytest.raises(ParseError, match="--progress_bar fancy: expected one of rich, tqdm, log"):
        AttnResCLI(args=["--data.cache_dir", str(tmp_path), "--progress_bar", "fancy"], run=False)


def test_training_steps_log_tensors_not_numbers(monkeypatch):
    # Lightning turns a logged Python number into a tensor on the module's device, a host-to-device copy
    # that waits for the GPU: the per-step logs hand it tensors (the model's, or numbers on the CPU)
    from lightning_modules.callbacks import ThroughputMonitor

    logged = []
    log = L.LightningModule.log

    def recording_log(self, name, value, *args, **kwargs):
        logged.append((name, value))
        return log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", recording_log)
    model = _micro_module()
    trainer = _micro_trainer(3, [ThroughputMonitor()])
    trainer.fit(model, _micro_loader())
    names = {name for name, _ in logged}
    assert {"train/loss", "train/lr", "train/tokens_per_s"} <= names, names
    numbers = [(name, value) for name, value in logged if not isinstance(value, torch.Tensor)]
    assert not numbers, numbers
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(model.hparams.lr)


class GradNormBeforeAndAtStep(L.Callback):
    """The total gradient norm before clipping (Lightning's hook) and the one the optimizer step used
    (read after the step: Lightning runs the backward inside `optimizer.step(closure)`)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.at_step: list[float] = []

    @staticmethod
    def norm(module) -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    def on_train_start(self, trainer, pl_module) -> None:
        record = lambda opt, args, kw: self.at_step.append(self.norm(pl_module))  # noqa: E731
        trainer.optimizers[0].register_step_post_hook(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(pl_module))


class _FusedAdamW(torch.optim.AdamW):
    """A fused AdamW on the CPU (torch has one), standing in for the CUDA one ``configure_optimizers``
    picks on a GPU; its kernel honours ``found_inf`` as the CUDA one does."""

    def __init__(self, *args, fused=None, **kw):
        super().__init__(*args, fused=True, **kw)


def test_fused_adamw_is_clipped_under_bf16(monkeypatch):
    # The GPU default (bf16-mixed, gradient_clip_val, fused AdamW) used to fail at the first step:
    # Lightning's mixed-precision plugin refuses to clip any fused optimizer. Here a fused AdamW on the
    # CPU (torch has one) stands in for the CUDA one; the norm at the step must be the clipped norm.
    monkeypatch.setattr(torch.optim, "AdamW", _FusedAdamW)
    rec, clip = GradNormBeforeAndAtStep(), 0.05
    trainer = _micro_trainer(2, [rec], precision="bf16-mixed", gradient_clip_val=clip)
    trainer.fit(_micro_module(), _micro_loader())
    assert trainer.optimizers[0].defaults["fused"] and trainer.global_step == 2
    assert len(rec.before) == len(rec.at_step) == 2
    assert min(rec.before) > 2 * clip  # clipping had something to do ...
    assert rec.at_step == pytest.approx([clip] * 2, rel=1e-4)  # ... and the step saw the clipped norm


def test_nan_gradients_skip_the_update_and_warn_with_the_step_number():
    guard, rec = NaNGuard(max_consecutive_bad_steps=3), RecordAfterStep()
    trainer = _micro_trainer(4, [PoisonGradsAt({1, 2}, float("nan")), guard, rec])
    with pytest.warns(UserWarning, match="non-finite") as caught:
        trainer.fit(_micro_module(), _micro_loader())
    said = " ".join(str(w.message) for w in caught if "NaNGuard" in str(w.message))
    assert "at step 1:" in said and "at step 2:" in said and "at step 3" not in said
    assert guard.skipped_steps == [1, 2] and trainer.global_step == 4
    for before, after in ((0, 1), (1, 2)):  # weights, AdamW state and router bias as they were
        assert all(torch.equal(rec.params[after][n], rec.params[before][n]) for n in rec.params[0])
        assert torch.equal(rec.bias[after], rec.bias[before])
    assert not torch.equal(rec.params[3]["lm_head.weight"], rec.params[2]["lm_head.weight"])
    assert not torch.equal(rec.bias[3], rec.bias[2])
    assert all(torch.isfinite(p).all() for p in rec.params[3].values())


def test_gradient_check_can_be_turned_off():
    # off: the inf gradient reaches the weights at step 1, and only the loss check stops step 2
    guard = NaNGuard(max_consecutive_bad_steps=1, check_gradients=False)
    trainer = _micro_trainer(4, [PoisonGradsAt({1}), guard])
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.fit(_micro_module(), _micro_loader())
    assert guard.skipped_steps == []


def test_consecutive_nan_gradients_stop_training_with_a_clear_error():
    trainer = _micro_trainer(6, [PoisonGradsAt({1, 2, 3}), NaNGuard(max_consecutive_bad_steps=2)])
    with (
        pytest.warns(UserWarning, match="at step 1"),
        pytest.raises(NonFiniteGradientError, match=r"2 optimizer steps in a row, the last at step 2.*"
                      r"max_consecutive_bad_steps=2.*Last good checkpoint"),
    ):  # fmt: skip
        trainer.fit(_micro_module(), _micro_loader())


def _trainer_whose_other_rank_disagrees(step: int) -> tuple[object, list[bool]]:
    """A stand-in for a 2-rank Trainer at ``step`` whose other rank reports a non-finite value: every
    all-reduced decision comes back False; the list records what this rank contributed."""
    from types import SimpleNamespace

    decisions: list[bool] = []

    def reduce_boolean_decision(decision, all=True):
        decisions.append(decision)
        return False

    trainer = SimpleNamespace(
        world_size=2,
        global_step=step,
        optimizers=[],
        checkpoint_callback=None,
        precision_plugin=SimpleNamespace(),
        strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision),
    )
    return trainer, decisions


def test_nan_guard_skips_on_every_rank_when_one_rank_has_nan_gradients():
    # FSDP shards and pipeline stages hold different gradients: a rank whose own are finite must skip too
    trainer, decisions = _trainer_whose_other_rank_disagrees(5)
    module = torch.nn.Linear(2, 2)
    module(torch.ones(1, 2)).sum().backward()
    with pytest.warns(UserWarning, match="on another rank.*at step 5"):
        NaNGuard().on_before_optimizer_step(trainer, module, None)
    assert decisions == [True] and all(p.grad is None for p in module.parameters())


def test_nan_guard_is_configured_from_the_cli_once(micro, tmp_path):
    old_style = ["--trainer.callbacks+=lightning_modules.callbacks.NaNGuard"]  # configs saved before
    cli = AttnResCLI(
        args=[*micro, "--nan_guard.max_consecutive_bad_steps", "3", *old_style,
              "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NaNGuard)]
    assert [g.max_consecutive_bad_steps for g in guards] == [3]


# ----------------------------------------------------------------------------- optimizer, schedule


def test_lr_schedule_warmup_cosine_wsd():
    cos = LRSchedule(warmup=10, total=110, kind="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert (
        cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    )
    wsd = LRSchedule(warmup=10, total=100, kind="wsd", min_ratio=0.0, decay_fraction=0.2)
    assert (
        wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    )


def test_no_weight_decay_on_norms_biases_queries_and_embedding():
    m = LanguageModel(get_config("tiny", num_layers=2, num_blocks=2, dim=64))
    names = {id(p): n for n, p in m.model.named_parameters()}
    decay, no_decay = m.param_groups()
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert any(".queries." in n for n in no) and "embed.weight" in no
    assert any("norm" in n for n in no) and not any("norm" in n or ".queries." in n for n in yes)
    assert "lm_head.weight" in yes and len(no | yes) == len(names)


def test_tied_embedding_is_decayed_like_the_untied_lm_head_and_listed_once():
    for decay_embeddings in (False, True):
        config = get_config("tiny", num_layers=2, num_blocks=2, dim=64, tie_embeddings=True)
        m = LanguageModel(config, decay_embeddings=decay_embeddings)
        tied = m.model.lm_head.weight
        assert tied is m.model.embed.weight
        decay, no_decay = m.param_groups()
        in_decay = [p for p in decay["params"] if p is tied]
        in_no_decay = [p for p in no_decay["params"] if p is tied]
        assert len(in_decay) == 1 and not in_no_decay  # the head's decision, in exactly one group
        every = [id(p) for g in (decay, no_decay) for p in g["params"]]
        assert len(every) == len(set(every)) == len(list(m.model.parameters()))
        # the optimizer accepts the groups (a parameter in two groups would raise)
        torch.optim.AdamW(m.param_groups())


def test_depth_entropy_load_balance_and_peak_flops():
    nan = float("nan")
    m = torch.tensor([[1.0, 0.5, 1.0], [nan, 0.5, 0.0], [nan, nan, 0.0]])  # one source, uniform, one-hot
    assert torch.allclose(metrics.depth_entropy(m), torch.tensor([0.0, math.log(2), 0.0]))
    assert metrics.normalized_depth_entropy(m) == pytest.approx(0.5)  # mean of 1 (uniform) and 0 (one-hot)
    assert metrics.load_balance(torch.tensor([0.25, 0.25, 0.25, 0.25])) == pytest.approx(1.0)
    assert metrics.load_balance(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(2.0)
    assert metrics.peak_flops(torch.device("cpu")) is None  # MFU is not applicable on CPU


# ----------------------------------------------------------------------------- CLI, generate, compare


def test_help_and_print_config_compose(micro, capsys):
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli(["fit", "--help"])
    out = capsys.readouterr().out
    # every Config field is an argument, with its attribute docstring as help
    assert exc.value.code == 0 and "--model.config.residual" in out and "--model.config.kda_backend" in out
    assert "Blocks of Block AttnRes; must divide" in " ".join(out.split())
    with pytest.raises(SystemExit):
        run_lightning_cli(
            [
                "fit",
                "-c",
                str(ROOT / "configs/default.yaml"),
                "-c",
                str(ROOT / "configs/model/small.yaml"),
                "--model.config.num_blocks",
                "4",
                "--print_config",
            ]
        )
    out = capsys.readouterr().out
    assert "name: small" in out and "corpus: stdlib" in out
    printed = yaml.safe_load(out)["model"]["config"]
    # small's whole block replaced tiny's; one field changed from the command line
    assert printed["dim"] == 768 and printed["num_blocks"] == 4
    assert printed["router_bias_update_rate"] == 0.001


def test_generate_returns_text(trained, capsys):
    attnres_main(
        ["generate", "--ckpt", str(trained["ckpt"]), "--prompt", "import ", "--max_new_tokens", "24"]
    )
    out = capsys.readouterr().out
    assert out.startswith("import ") and len(out.rstrip("\n")) > len("import ")
    texts = commands.generate(
        str(trained["ckpt"]), prompt="def ", max_new_tokens=8, greedy=True, num_samples=2
    )
    assert len(texts) == 2 and texts[0] == texts[1] and texts[0].startswith("def ")


def test_compare_trains_three_modes_on_the_same_budget(micro, tmp_path, capsys):
    attnres_main(
        [
            "compare",
            *micro,
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--args",
            '["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]',
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["standard", "block", "full"]
    assert len({r["tokens"] for r in results.values()}) == 1 and results["block"]["tokens"] == 2 * 2 * 32
    assert all(r["val_loss"] is not None and r["steps"] == 2 for r in results.values())
    assert results["standard"]["params"] < results["block"]["params"] == results["full"]["params"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n") == 5 and "| block (N=2) |" in table
    assert is_png(tmp_path / "loss_curves.png")


def test_compare_over_seeds_reports_the_mean_and_sample_std_of_each_mode(micro, tmp_path):
    attnres_main(
        ["compare", *micro, "--modes", "[block]", "--seeds", "2", "--max_steps", "2", "--output_dir",
         str(tmp_path), "--args", '["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]']
    )
    (block,) = json.loads((tmp_path / "results.json").read_text()).values()
    assert block["seeds"] == [1234, 1235] and [r["seed"] for r in block["runs"]] == [1234, 1235]
    losses = np.array([r["val_loss"] for r in block["runs"]])
    assert losses[0] != losses[1]  # another seed: another init and data order
    assert block["val_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert block["val_loss_std"] == pytest.approx(losses.std(ddof=1), rel=1e-12)
    assert {Path(r["run_dir"]).parent.name for r in block["runs"]} == {"block-seed1234", "block-seed1235"}
    row = (tmp_path / "results.md").read_text().splitlines()[2]
    assert row.startswith("| block (N=2) |") and f"{losses.mean():.4f} ± {losses.std(ddof=1):.4f}" in row


@pytest.mark.slow
def test_fit_with_two_ddp_ranks_on_cpu(micro, tmp_path):
    """DDP over gloo: each rank reads its share of the windows, the router loads are all-reduced, and
    every collective (``trainer.log_dir``) is reached by both ranks."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_modules",
            "fit",
            *micro,
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(
        tmp_path / "micro/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 2
    tokens = [
        float(r["train/tokens_per_s"])
        for r in read_metrics(tmp_path / "micro/version_0")
        if r.get("train/tokens_per_s")
    ]
    assert len(tokens) == 2 and "plots:" in proc.stdout


def test_throughput_counts_each_batch_once_per_data_parallel_replica(monkeypatch):
    # under pipeline parallelism (pp=2, dp=2 over 4 ranks) both stages of a pipeline read the same
    # batch: tokens/s is batch tokens x 2 replicas, not x 4 ranks
    from types import SimpleNamespace

    from lightning_modules import callbacks

    clock = iter([10.0, 12.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    trainer = SimpleNamespace(world_size=4, strategy=strategy)
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda *a, **kw: None)
    mon = callbacks.ThroughputMonitor()
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long)}
    mon.on_train_batch_start(trainer, module, batch, 0)
    mon.on_train_batch_end(trainer, module, None, batch, 0)
    assert mon.tokens_per_s == 15 * 2 / 2.0


def test_nan_guard_stops_every_rank_when_one_rank_has_a_nan_loss():
    # a rank with a finite loss must stop too when another rank's loss is NaN (it would otherwise
    # wait forever in the gradient all-reduce of the rank that stopped)
    trainer, decisions = _trainer_whose_other_rank_disagrees(7)
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        NaNGuard().on_before_backward(trainer, None, torch.tensor(2.5))
    assert decisions == [True]



def test_deferred_guard_skips_bad_steps_on_the_device_and_reports_them_a_step_later(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _FusedAdamW)
    guard, rec = NaNGuard(max_consecutive_bad_steps=3, defer=True), RecordAfterStep()
    trainer = _micro_trainer(4, [PoisonGradsAt({1, 2}, float("nan")), guard, rec])
    with pytest.warns(UserWarning, match="non-finite") as caught:
        trainer.fit(_micro_module(), _micro_loader())
    assert guard._deferred(trainer)  # the path under test ran
    said = " ".join(str(w.message) for w in caught if "NaNGuard" in str(w.message))
    assert "at step 1:" in said and "at step 2:" in said and "at step 3" not in said
    assert guard.skipped_steps == [1, 2] and trainer.global_step == 4
    opt = trainer.optimizers[0]
    assert all(int(st["step"]) == 2 for st in opt.state.values())  # two real updates: steps 0 and 3
    for before, after in ((0, 1), (1, 2)):  # weights and router bias as they were
        assert all(torch.equal(rec.params[after][n], rec.params[before][n]) for n in rec.params[0])
        assert torch.equal(rec.bias[after], rec.bias[before])
    assert not torch.equal(rec.params[3]["lm_head.weight"], rec.params[2]["lm_head.weight"])
    assert not torch.equal(rec.bias[3], rec.bias[2])
    assert all(torch.isfinite(p).all() for p in rec.params[3].values())


@pytest.mark.parametrize("gpu_behind", [False, True])
def test_deferred_guard_stops_on_a_nan_loss_at_the_next_step_with_the_update_skipped(monkeypatch, gpu_behind):
    from lightning_modules import callbacks

    monkeypatch.setattr(torch.optim, "AdamW", _FusedAdamW)
    if gpu_behind:  # the flags never arrive by themselves: the guard waits at the end of the next step
        monkeypatch.setattr(callbacks.OnHost, "ready", lambda self: False)

    class NanLossAt2(LanguageModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 2 else loss

    base = _micro_module()
    module = NanLossAt2(base.config, warmup_steps=1, schedule="constant")
    module.load_state_dict(base.state_dict())
    rec = RecordAfterStep()
    trainer = _micro_trainer(6, [rec, NaNGuard(defer=True)])
    with pytest.raises(NonFiniteLossError, match=r"not finite \(NaN/inf\) at step 2.*update was skipped"):
        trainer.fit(module, _micro_loader())
    # steps 0, 1, 2 ran; on a CPU the flags are on the host at once, so the guard stops at the end of
    # step 2; with the GPU behind, at the latest at the end of step 3, whose own update ran
    assert len(rec.params) == (4 if gpu_behind else 3)
    assert all(torch.equal(rec.params[2][n], rec.params[1][n]) for n in rec.params[0])
    assert torch.equal(rec.bias[2], rec.bias[1])
    if gpu_behind:
        assert not torch.equal(rec.params[3]["lm_head.weight"], rec.params[2]["lm_head.weight"])


def test_deferred_guard_decides_on_the_host_without_a_fused_optimizer():
    guard = NaNGuard(max_consecutive_bad_steps=3, defer=True)
    trainer = _micro_trainer(3, [PoisonGradsAt({1}, float("nan")), guard])
    with pytest.warns(UserWarning, match="at step 1"):
        trainer.fit(_micro_module(), _micro_loader())  # the CPU's AdamW is not fused: the host path
    assert not guard._deferred(trainer) and guard.skipped_steps == [1]


def test_deferred_guard_checks_every_micro_batch_of_an_accumulated_step(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _FusedAdamW)

    class NanFirstMicroBatchOfStep1(LanguageModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss  # step 1's first of two micro-batches

    base = _micro_module()
    module = NanFirstMicroBatchOfStep1(base.config, warmup_steps=1, schedule="constant")
    module.load_state_dict(base.state_dict())
    trainer = _micro_trainer(3, [NaNGuard(defer=True)], accumulate_grad_batches=2)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        trainer.fit(module, _micro_loader())


def test_compile_reduce_overhead_graphs_the_model_and_copies_out_the_losses_each_step(monkeypatch):
    from attnres.model import ModelOutput

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw) or model)
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(len(steps)))
    module = _micro_module(compile="reduce-overhead")
    assert modes == [{"mode": "reduce-overhead"}] and module._compiled is module.model
    assert module.hparams.compile == "reduce-overhead"
    # a stand-in for the graphed model: its outputs live in memory the next replay overwrites
    replay = ModelOutput(logits=torch.zeros(2, 16, 64), loss=torch.tensor(2.5), aux_loss=torch.tensor(0.1))
    module.__dict__["_compiled"] = lambda *args, **kwargs: replay
    ids = torch.randint(0, 64, (2, 16))
    out = module(ids, ids)
    assert steps == [0]  # a new step of the CUDA-graph trees before the call
    assert out.loss.item() == 2.5 and out.loss.data_ptr() != replay.loss.data_ptr()
    assert out.aux_loss.item() == pytest.approx(0.1) and out.aux_loss.data_ptr() != replay.aux_loss.data_ptr()
    assert out.logits is replay.logits  # used within the step: not copied
    stats = module(ids, ids, return_stats=True)  # statistics: the eager model, no graph step
    assert steps == [0] and stats.stats is not None


def test_compile_regional_compiles_each_layers_mixers_and_a_bad_value_names_the_choices():
    module = _micro_module(compile="regional")
    assert module.model.regions_compiled and module._compiled is None
    assert all(layer.attn._compiled_call_impl is not None and layer.mlp._compiled_call_impl is not None
               for layer in module.model.layers.values())
    assert module.hparams.compile == "regional"
    with pytest.raises(ValueError, match="use true .* regional .* reduce-overhead .* nested .* or false"):
        _micro_module(compile="layers")
    nested = _micro_module(compile="nested")  # the whole model compiled around one region per kind
    assert nested._compiled is not None and not nested.model.regions_compiled
    assert all(layer.nested for layer in nested.model.layers.values())
    torch._dynamo.reset()


def test_log_lines_say_the_first_steps_time_then_loss_rate_and_validations(capsys):
    # `--progress_bar log` (the study's runs write to a file): the first step's time, then every `every`
    # steps the step's own loss (read without a sync), tokens/s, the time so far and left; each validation
    from lightning_modules.callbacks import ThroughputMonitor
    from lightning_modules.progress import LogLines

    lines = LogLines(every=2)
    seen = BarSeen(lines)
    model = _micro_module()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, val_check_interval=4, limit_val_batches=2,
                        num_sanity_val_steps=1, callbacks=[ThroughputMonitor(), lines, seen])
    trainer.fit(model, _micro_loader(n=16), _micro_loader(n=4))
    out = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert out[0] == "training from step 0 to 6"
    assert out[1].startswith("step 1: the first step took ")
    steps = [line for line in out if line.startswith("step ") and "loss" in line]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    for line in steps:  # the loss shown is that step's own (on a CPU the copy is at once)
        step = int(line.split()[1].split("/")[0])
        assert line.split()[3] == f"{seen.losses[step - 1]:.4f}" and "tok/s" in line
    assert "s left" in steps[0] and "s left" not in steps[-1]
    vals = [line for line in out if line.startswith("validation")]  # not the sanity check's
    assert len(vals) == 1 and vals[0].startswith("validation at step 4: val/loss ")
    assert float(vals[0].split()[5]) == pytest.approx(trainer.callback_metrics["val/loss"].item(), abs=1e-4)
    assert out[-1].startswith("done: step 6 after ") and f"last loss {seen.losses[-1]:.4f}" in out[-1]
