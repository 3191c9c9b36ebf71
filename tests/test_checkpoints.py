"""Checkpoints that cannot mislead, and weights out of them: checksums written at save and checked by
every loader (generate, plot, export, resume), stale temporary files removed, ``--ckpt_path last``,
resuming in the run's own directory (one curve), ``plot`` beside the run's plots, and ``export`` /
``Decoder.from_pretrained`` round-tripping the logits bit for bit without Lightning."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from attnres.model import Decoder, get_config
from lightning_modules import commands
from lightning_modules.checkpoint import (
    CHECKSUM_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint,
    stale_temp_files,
)
from lightning_modules.cli import run_lightning_cli
from lightning_modules.main import main

ROOT = Path(__file__).resolve().parents[1]

# a micro model on the tiny preset's config (so the file passes whatever preset configs/default.yaml names)
MICRO = """\
run_name: micro
progress_bar: tqdm
torch_threads: 1
trainer:
  max_steps: 3
  val_check_interval: 2
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_model_summary: false
  enable_progress_bar: false
model:
  config:
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
  every_n_steps: 0
"""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def fit_args(tmp: Path, root: Path) -> list[str]:
    (tmp / "micro.yaml").write_text(MICRO.format(cache=tmp / "cache"))
    return ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/model/tiny.yaml"),
            "-c", str(tmp / "micro.yaml"),
            "--trainer.default_root_dir", str(root)]


def attnres(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m lightning_modules <args>`` (the ``attnres`` command) as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lightning_modules", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 3-step fit (in-process): its run directory and checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt")
    args = fit_args(tmp, tmp / "runs")
    torch.set_num_threads(1)
    run_lightning_cli(args)
    run_dir = tmp / "runs" / "micro" / "version_0"
    return {"tmp": tmp, "args": args, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def corrupt_a_tensor(src: Path, dst: Path) -> None:
    """Copy ``src`` with 4 KiB of its largest tensor record zeroed (the zip stays readable)."""
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(src.read_bytes())
    # the record's bytes follow its local header: 30 bytes + name + extra field
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    n = min(4096, info.file_size)
    assert any(data[start : start + n]), "the record is zeros already"
    data[start : start + n] = bytes(n)
    dst.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- checksums


def test_checkpoint_holds_a_sha256_of_every_tensor(run):
    raw = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    sums = raw[CHECKSUM_KEY]
    names = {f"state_dict/{k}" for k in raw["state_dict"]}
    assert names <= set(sums)
    assert any(k.startswith("optimizer_states/") for k in sums)  # the AdamW moments too
    w = raw["state_dict"]["model.embed.weight"]  # recomputed here, independently of the writer
    h = hashlib.sha256(f"{w.dtype}{tuple(w.shape)}".encode())
    h.update(w.contiguous().numpy().tobytes())
    assert sums["state_dict/model.embed.weight"] == h.hexdigest()
    assert CHECKSUM_KEY not in load_checkpoint(run["ckpt"])  # checked, then dropped


@pytest.fixture(scope="module")
def bad(run) -> dict[str, Path]:
    """A text file, a truncated and a corrupted copy of the run's checkpoint."""
    tmp, src = run["tmp"], run["ckpt"]
    out = {k: tmp / f"{k}.ckpt" for k in ("text", "truncated", "corrupted")}
    out["text"].write_text("this is not a checkpoint\n")
    out["truncated"].write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    corrupt_a_tensor(src, out["corrupted"])
    return out


EXPECTED = {"text": "is not a PyTorch checkpoint", "truncated": "is corrupted or truncated",
            "corrupted": "is corrupted or truncated (tensor "}


def test_corrupted_tensor_bytes_pass_torch_load_unnoticed(bad):
    """Why the checksums: PyTorch does not check the zip's CRC-32, so this loads 'fine'."""
    raw = torch.load(bad["corrupted"], map_location="cpu", weights_only=True)
    assert "state_dict" in raw


@pytest.mark.parametrize("kind", ["text", "truncated", "corrupted"])
def test_damaged_checkpoints_are_refused_by_generate_plot_export_and_the_resume_loader(bad, kind, tmp_path):
    path = bad[kind]
    calls = {
        "generate": lambda: commands.generate(str(path), max_new_tokens=2, greedy=True),
        "plot": lambda: commands.plot(str(path), output_dir=str(tmp_path / "plots")),
        "export": lambda: commands.export(str(path), str(tmp_path / "export")),
        # what Lightning calls to resume (fit/validate/test/predict --ckpt_path) through the plugin
        "resume loader": lambda: AtomicCheckpointIO().load_checkpoint(path),
    }
    for what, call in calls.items():
        with pytest.raises(CheckpointError) as exc:
            call()
        msg = str(exc.value)
        assert f"checkpoint {path} " in msg and EXPECTED[kind] in msg, (what, msg)
        assert "\n" not in msg and "weights_only" not in msg, (what, msg)
    assert not (tmp_path / "plots").exists() and not (tmp_path / "export").exists()


def test_fit_resume_from_a_corrupted_checkpoint_stops_in_one_line(run, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*run["args"], "--ckpt_path", str(bad["corrupted"]), "--trainer.max_steps", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnres fit: checkpoint ") and "is corrupted or truncated (tensor " in err
    assert len(err.splitlines()) == 1 and "NaN" not in err


def test_the_missing_file_says_where_checkpoints_are(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file; training writes <run dir>/checkpoints/"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints from before the checksums (or from plain Lightning) load unchecked."""
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_a_checkpoint_from_before_model_config_is_refused_in_one_line(tmp_path, capsys):
    """Hyperparameters of the old layout (a preset name and knobs, no ``config``): generate and export
    say what the checkpoint is and what to do, instead of a TypeError from the constructor."""
    path = tmp_path / "old.ckpt"
    old = {"preset": "tiny", "residual": "block", "num_blocks": 4, "overrides": None, "lr": 0.003}
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(264, 128)}, "hyper_parameters": old}, path)
    export = ["export", "--ckpt", str(path), "--output", str(tmp_path / "x")]
    for argv in (["generate", "--ckpt", str(path)], export):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "predates model.config" in err
        assert "num_blocks, overrides, preset" in err


# ----------------------------------------------------------------------------- resume


def test_ckpt_path_last_resumes_in_the_same_run_with_one_curve_and_removes_stale_temp_files(run, tmp_path):
    # a copy of the run, so the other tests keep theirs
    root = tmp_path / "runs"
    subprocess.run(["cp", "-r", str(run["run_dir"].parent.parent), str(root)], check=True)
    run_dir = root / "micro" / "version_0"
    stale = run_dir / "checkpoints" / ".last.ckpt.k2j3h4.tmp"  # as a kill mid-save leaves it
    stale.write_bytes(b"\0" * 100_000)
    assert stale_temp_files(run_dir / "checkpoints") == [stale]
    args = fit_args(run["tmp"], root)[1:]
    proc = attnres("fit", *args, "--ckpt_path", "last", "--trainer.max_steps", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"Restored all states from the checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    assert "removed 1 temporary checkpoint file(s) of an interrupted save" in out and stale.name in out
    assert not stale.exists()
    assert sorted(p.name for p in (root / "micro").iterdir()) == ["version_0"]  # no version_1
    with open(run_dir / "metrics.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4]  # one curve: the first run's 3 steps, then the resumed 2
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_resuming_a_finished_run_says_there_is_nothing_left(run, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*run["args"], "--ckpt_path", str(run["ckpt"])])  # max_steps 3, at step 3
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "is at step 3 and --trainer.max_steps is 3: nothing left to train" in err
    assert "--trainer.max_steps (e.g. 6)" in err and len(err.splitlines()) == 1


def test_ckpt_path_last_without_a_run_says_where_it_looked(run, tmp_path, capsys):
    args = fit_args(run["tmp"], tmp_path / "empty")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--ckpt_path", "last"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"--ckpt_path last: no checkpoint at {tmp_path / 'empty' / 'micro'}/version_*/checkpoints/" in err
    assert not (tmp_path / "empty" / "micro").exists()  # nothing trained from scratch


# ----------------------------------------------------------------------------- plot, export


def test_plot_writes_beside_the_runs_plots_not_over_them(run):
    train_plots = run["run_dir"] / "plots"
    before = {p.name: p.read_bytes() for p in train_plots.glob("*.png")}
    assert before, "the run wrote no plots"
    written = [Path(p) for p in commands.plot(str(run["ckpt"]))]
    assert written and all(p.parent == run["run_dir"] / "plot_last_step000003" for p in written)
    assert {p.name: p.read_bytes() for p in train_plots.glob("*.png")} == before


def test_export_round_trips_the_logits_bit_for_bit_without_lightning(run, tmp_path):
    out = tmp_path / "export"
    commands.export(str(run["ckpt"]), str(out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    module, _, _ = commands._load_checkpoint(str(run["ckpt"]))
    assert meta["config"] == module.config.__dict__ and meta["tokenizer"]["kind"] == "byte"
    ids = torch.randint(0, module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)  # as here: the same reduction order\n"
        "from attnres.model import Decoder\n"
        f"model = Decoder.from_pretrained({str(out)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", "Decoder.from_pretrained imported Lightning"
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_save_pretrained_keeps_a_tied_embedding_tied(tmp_path):
    torch.manual_seed(0)
    config = get_config("tiny", num_layers=2, num_blocks=2, dim=32, tie_embeddings=True, mla_qk_nope_dim=16,
                        mla_qk_shared_dim=8, mla_kv_rank=16, full_attn_every=2)
    model = Decoder(config).eval()
    model.save_pretrained(tmp_path)
    loaded = Decoder.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 264, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found: from_pretrained reads a folder"):
        Decoder.from_pretrained(tmp_path)
