"""Run one sweep of the study (issue 10), or a slice of it, on this machine; one JSON per run.

    python -m benchmarks.study.run --sweep seeds                      # every run of a sweep
    python -m benchmarks.study.run --sweep scaling --runs m-full-seed0,l-full-seed0
    python -m benchmarks.study.run --sweep scaling --list             # the run ids, and which are done
    python -m benchmarks.study.run --describe                         # parameters / FLOPs of the models

Each run is one ``python -m lightning_modules fit`` process (``-c`` the sweep's configs and the model's file,
the residual mode, ``--seed_everything``/``--data.seed`` = the seed, the step count) writing to
``<work>/<run id>/version_<n>/``. A run that was cut (the device's 10-minute limit, ``--budget_s``)
resumes from its ``last.ckpt`` the next time; a run whose JSON says ``complete`` is skipped. After
training, the final checkpoint is loaded once more for the per-depth statistics (depth-attention
matrix, output / hidden-state RMS, gradient norm per sublayer on the first 8 validation windows), and
``<results>/<run id>.json`` is written: config, command, seed, device, versions, tokens, wall time,
the validation curve, the final validation loss, the statistics. A few tens of KB each.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PLAN = "configs/study/sweeps.yaml"
DEFAULT_RESULTS = "benchmarks/results/study"
DEFAULT_WORK = "runs/study"
SCHEMA = "attnres-study-run/1"


@dataclass
class Run:
    """One training run of a sweep: ``model`` x ``residual`` x ``seed`` at ``steps`` steps."""

    id: str
    model: str
    residual: str
    seed: int
    steps: int
    batch_size: int
    seq_len: int
    configs: list[str]
    model_args: dict[str, Any]
    args: list[str] = field(default_factory=list)
    tag: str | None = None

    @property
    def tokens(self) -> int:
        """Planned training tokens (one device, no gradient accumulation)."""
        return self.steps * self.batch_size * self.seq_len


# ---------------------------------------------------------------------------- the plan


def load_plan(path: str | Path) -> dict[str, Any]:
    with open(path) as fh:
        plan = yaml.safe_load(fh)
    for key in ("configs", "steps", "batch_size", "seq_len", "models", "residuals", "sweeps"):
        if key not in plan:
            raise ValueError(f"{path}: the sweep plan has no {key!r}")
    return plan


def expand(plan: dict[str, Any], sweep: str) -> list[Run]:
    """The runs of ``sweep`` in order: each grid of the sweep is the product model x residual x seed. A
    sweep may add ``configs`` (composed after the plan's, before the model file), ``args``, a ``tag`` (the
    runs' id suffix), ``steps`` / ``batch_size`` / ``seq_len``, and ``lr_scale`` (the model file's
    ``model.lr`` times it)."""
    if sweep not in plan["sweeps"]:
        raise ValueError(f"unknown sweep {sweep!r}; valid: {', '.join(plan['sweeps'])}")
    spec = plan["sweeps"][sweep]
    tag = spec.get("tag")
    lr_scale = spec.get("lr_scale")
    runs: list[Run] = []
    for grid in spec["grid"]:
        for model, residual, seed in itertools.product(grid["model"], grid["residual"], grid["seed"]):
            if model not in plan["models"]:
                raise ValueError(
                    f"sweep {sweep}: unknown model {model!r}; valid: {', '.join(plan['models'])}"
                )
            if residual not in plan["residuals"]:
                raise ValueError(
                    f"sweep {sweep}: unknown residual {residual!r}; valid: {', '.join(plan['residuals'])}"
                )
            rid = f"{model}-{residual}-seed{seed}" + (f"-{tag}" if tag else "")
            if any(r.id == rid for r in runs):
                continue
            args = list(plan.get("args", [])) + list(spec.get("args", []))
            if lr_scale is not None:  # the model file's learning rate times lr_scale
                args.append(f"--model.lr={model_lr(plan, model) * float(lr_scale):.6g}")
            runs.append(
                Run(
                    id=rid,
                    model=model,
                    residual=residual,
                    seed=int(seed),
                    steps=int(spec.get("steps", plan["steps"])),
                    batch_size=int(spec.get("batch_size", plan["batch_size"])),
                    seq_len=int(spec.get("seq_len", plan["seq_len"])),
                    configs=list(plan["configs"]) + list(spec.get("configs", [])) + [plan["models"][model]],
                    model_args=dict(plan["residuals"][residual]),
                    args=args,
                    tag=tag,
                )
            )
    return runs


def model_lr(plan: dict[str, Any], model: str) -> float:
    """The learning rate ``model``'s file sets (``model.lr``)."""
    lr = (yaml.safe_load((ROOT / plan["models"][model]).read_text()).get("model") or {}).get("lr")
    if lr is None:
        raise ValueError(f"{plan['models'][model]}: no model.lr to scale (lr_scale)")
    return float(lr)


def expand_sweeps(plan: dict[str, Any], sweeps: str) -> list[tuple[Run, str]]:
    """The runs of one sweep or several (``"a,b"``), each once, in order, with the first sweep
    holding it."""
    out: dict[str, tuple[Run, str]] = {}
    for name in (x.strip() for x in sweeps.split(",")):
        for r in expand(plan, name):
            out.setdefault(r.id, (r, name))
    return list(out.values())


def fit_argv(run: Run, work: Path, ckpt: Path | None = None) -> list[str]:
    """The ``attnres fit`` arguments of ``run`` (resuming from ``ckpt`` when given)."""
    argv = ["fit"] + [x for c in run.configs for x in ("-c", c)]
    for k, v in run.model_args.items():
        argv += [f"--model.config.{k}", str(v)]
    argv += [
        "--seed_everything",
        str(run.seed),
        "--data.seed",
        str(run.seed),
        "--data.batch_size",
        str(run.batch_size),
        "--data.seq_len",
        str(run.seq_len),
        "--trainer.max_steps",
        str(run.steps),
        "--model.schedule_steps",
        str(run.steps),  # the schedule survives a resume unchanged
        "--run_name",
        run.id,
        "--trainer.default_root_dir",
        str(work),
    ]
    argv += run.args
    if ckpt is not None:
        argv += ["--ckpt_path", str(ckpt)]
    return argv


# ---------------------------------------------------------------------------- run directories


def versions(work: Path, run_id: str) -> list[Path]:
    """``<work>/<run id>/version_<n>`` in order of ``n`` (one per ``fit`` invocation)."""
    d = work / run_id
    found = [p for p in d.glob("version_*") if p.is_dir() and p.name.split("_")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def last_checkpoint(work: Path, run_id: str) -> Path | None:
    """The newest ``last.ckpt`` of the run, or None."""
    for v in reversed(versions(work, run_id)):
        ckpt = v / "checkpoints" / "last.ckpt"
        if ckpt.is_file():
            return ckpt
    return None


def checkpoint_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def read_metrics(work: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of the run as ``name -> [(step, value)]`` over all its invocations; where a
    resumed invocation repeats a step, the later one wins. Steps are optimizer steps completed (a CSV
    row's ``step`` is the 0-based index of the logging step, so + 1)."""
    out: dict[str, dict[int, float]] = {}
    for v in versions(work, run_id):
        path = v / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                step = int(row["step"]) + 1
                for k, val in row.items():
                    if k in ("step", "epoch") or val in ("", None):
                        continue
                    out.setdefault(k, {})[step] = float(val)
    return {k: sorted(d.items()) for k, d in out.items()}


# ---------------------------------------------------------------------------- statistics


def depth_statistics(ckpt: Path, device: str, num_windows: int = 8) -> dict[str, Any]:
    """Per-depth statistics of the checkpoint's weights on its first ``num_windows`` validation
    windows: the mean depth-attention matrix ``[sources, sublayers + 1]`` (None for standard), the RMS
    of every sublayer output ``[L]`` and of every sublayer input ``[L + 1]``, the gradient L2 norm of
    every sublayer (one backward of the mean loss; keys ``"<layer>.<attn|mlp>"``), the router's
    max/mean load per MoE layer. Under bf16 autocast on CUDA (as trained), fp32 on CPU."""
    import torch

    from lightning_modules import metrics, warmup
    from lightning_modules.data import checkpoint_val_batch
    from lightning_modules.module import LanguageModel

    # the eager pass runs fla's kernels at the statistics' batch, keys the training run did not tune: pinned
    # to the nearest tuned configuration as `attnres fit` does, not benchmarked (session 24: an l run's
    # statistics took over 160 s on a GPU that two training runs shared, and the call ran out)
    warmup.prepare_kda_autotune(torch.device(device))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = LanguageModel.load_from_checkpoint(ckpt, map_location=device)
    batch = {k: v.to(device) for k, v in checkpoint_val_batch(raw, num_windows).items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None
    stats, grads = module.depth_diagnostics(batch, autocast)
    windows = len(batch["input_ids"])
    del module, batch  # the runner lives on while other runs train: give their memory back
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    matrix = stats["matrix"]
    return {
        "windows": windows,
        "loss": stats["loss"],
        "depth_attention": None if matrix is None else [[_num(x) for x in row] for row in matrix.tolist()],
        "depth_attention_entropy": None
        if matrix is None
        else metrics.normalized_depth_entropy(torch.as_tensor(matrix)),
        "output_rms": stats["output_rms"],
        "hidden_rms": stats["hidden_rms"],
        "grad_norms": grads,
        "router_load_balance": [metrics.load_balance(torch.as_tensor(x)) for x in stats["router_load"]],
    }


def _num(x: float) -> float | None:
    """JSON has no NaN: sources a sublayer does not see become null."""
    return None if isinstance(x, float) and math.isnan(x) else x


# ---------------------------------------------------------------------------- one run


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["name"] = torch.cuda.get_device_name(0)
    else:
        info["name"] = platform.processor() or platform.machine()
    try:
        from attnres import ops

        info["attnres_ops"] = ops.backend(device.split(":")[0])
    except Exception as exc:  # report, do not fail the run on it
        info["attnres_ops"] = f"unknown ({exc})"
    try:
        import fla  # noqa: F401

        info["fla"] = getattr(fla, "__version__", "installed")
    except ImportError:
        info["fla"] = None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    # the device gets a copy of the working tree whose .git (if any) is stale: the plan passes
    # ATTNRES_COMMIT, which wins
    info["attnres_commit"] = os.environ.get("ATTNRES_COMMIT") or commit or None
    return info


def model_counts(ckpt: Path, seq_len: int) -> dict[str, Any]:
    """Parameter and FLOP counts of the checkpoint's model (from its config, no weights needed)."""
    import torch

    from attnres.model import Config

    cfg = dict(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["attnres"]["config"])
    config = Config(**cfg)
    return {
        "config": cfg,
        "params": config.num_params(),
        "active_params": config.num_params(active=True),
        "num_layers": config.num_layers,
        "dim": config.dim,
        "num_sublayers": config.num_sublayers,
        "num_blocks": config.num_blocks if config.residual == "block" else None,
        "flops_per_token": config.flops_per_token(seq_len),
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if math.isfinite(x))
    return xs[len(xs) // 2] if xs else None


def _ledger(work: Path, run_id: str) -> Path:
    return work / run_id / "invocations.json"


def train(run: Run, work: Path, timeout_s: float, log: Path | None, concurrent: int = 1) -> dict[str, Any]:
    """One ``fit`` invocation of ``run`` (resuming when a checkpoint exists), stopped by SIGINT and
    then SIGKILL at ``timeout_s``; appended to the run's invocation ledger (with ``concurrent``, the
    number of runs of this call that had been handed out when it started, itself included: a lower
    bound on how many shared the device, since runs started together count 1, 2, ...), which is
    returned."""
    ckpt = last_checkpoint(work, run.id)
    argv = fit_argv(run, work, ckpt)
    cmd = [sys.executable, "-m", "lightning_modules", *argv]
    print(f"[study] {run.id}: {'resume from ' + str(ckpt) if ckpt else 'start'} (timeout {timeout_s:.0f} s)")
    print("[study]   " + " ".join(cmd), flush=True)
    t0 = time.time()
    out = open(log, "a") if log else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out or None, stderr=subprocess.STDOUT if out else None)
    try:
        rc = proc.wait(timeout=max(timeout_s, 1))
        status = "exited"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # Lightning stops gracefully; the last periodic checkpoint stays
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        status = "timed out"
    finally:
        if out:
            out.close()
    wall = time.time() - t0
    path = _ledger(work, run.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = json.loads(path.read_text()) if path.is_file() else []
    ledger.append(
        {
            "argv": ["python", "-m", "lightning_modules", *argv],
            "wall_s": wall,
            "returncode": rc,
            "status": status,
            "resumed_from": str(ckpt) if ckpt else None,
            "concurrent": concurrent,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        }
    )
    path.write_text(json.dumps(ledger, indent=1))
    print(f"[study] {run.id}: {status}, return code {rc}, {wall:.0f} s", flush=True)
    return {"ledger": ledger, "returncode": rc}


def collect(run: Run, work: Path, device: str, sweep: str) -> dict[str, Any]:
    """The result record of a finished (or partial) run from its run directories."""
    ckpt = last_checkpoint(work, run.id)
    if ckpt is None:
        raise FileNotFoundError(f"{run.id}: no checkpoint under {work / run.id}")
    step = checkpoint_step(ckpt)
    m = read_metrics(work, run.id)
    counts = model_counts(ckpt, run.seq_len)
    ledger = json.loads(_ledger(work, run.id).read_text()) if _ledger(work, run.id).is_file() else []
    cfg_path = ckpt.parent.parent / "config.yaml"
    tokens_per_step = run.batch_size * run.seq_len
    val = [[s, s * tokens_per_step, v] for s, v in m.get("val/loss", [])]
    train_loss = m.get("train/loss", [])
    tail = [v for _, v in train_loss[-max(1, len(train_loss) // 10) :]]
    complete = step >= run.steps
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run.id,
        "sweep": sweep,
        "status": "complete" if complete else "partial",
        "model": run.model,
        "residual": run.residual,
        "num_blocks": counts["num_blocks"],
        "seed": run.seed,
        "configs": run.configs,
        "command": " ".join(ledger[0]["argv"]) if ledger else None,
        "invocations": ledger,
        "config": yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None,
        "device": device_info(device),
        **{
            k: counts[k]
            for k in ("params", "active_params", "num_layers", "dim", "num_sublayers", "flops_per_token")
        },
        "model_config": counts["config"],
        "steps": step,
        "steps_planned": run.steps,
        "batch_size": run.batch_size,
        "seq_len": run.seq_len,
        "tokens": step * tokens_per_step,
        "compute_flops": counts["flops_per_token"] * step * tokens_per_step,
        "wall_s": sum(x["wall_s"] for x in ledger),
        "tokens_per_s": _median([v for _, v in m.get("train/tokens_per_s", [])]),
        "mfu": _median([v for _, v in m.get("train/mfu", [])]),
        "peak_memory_gb": max((v for _, v in m.get("train/peak_memory_gb", [])), default=None),
        "val_curve": val,  # [optimizer steps, tokens, val loss]
        "val_loss": val[-1][2] if val else None,
        "val_ppl": m["val/ppl"][-1][1] if m.get("val/ppl") else None,
        "train_curve": [[s, v] for s, v in train_loss],
        "train_loss": sum(tail) / len(tail) if tail else None,
        "entropy_curve": [[s, v] for s, v in m.get("depth/attention_entropy", [])],
        "load_balance_curve": [[s, v] for s, v in m.get("moe/load_balance_max", [])],
        "final_stats": depth_statistics(ckpt, device) if complete else None,
        "checkpoint": str(ckpt),
    }
    return record


def write_record(record: dict[str, Any], results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{record['run_id']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def is_complete(results: Path, run_id: str, steps: int | None = None) -> bool:
    """Whether ``<results>/<run id>.json`` is a complete run (of ``steps`` steps when given)."""
    path = results / f"{run_id}.json"
    if not path.is_file():
        return False
    r = json.loads(path.read_text())
    return r.get("status") == "complete" and (steps is None or r.get("steps") == steps)


def run_sweep(
    plan_path: str | Path,
    sweep: str,
    only: list[str] | None = None,
    results: str | Path = DEFAULT_RESULTS,
    work: str | Path = DEFAULT_WORK,
    budget_s: float = 540.0,
    device: str | None = None,
    log_dir: str | Path | None = None,
    keep_checkpoints: bool = False,
    parallel: int = 1,
    memory_gb: float | None = None,
    start_all: bool = False,
) -> list[dict[str, Any]]:
    """Run the runs of ``sweep`` (a sweep name, or several joined by commas; or those in ``only``)
    that are not complete yet, within ``budget_s`` seconds, up to ``parallel`` at a time (one ``fit``
    process each; the study's runs are bound by kernel launches and host work, so several processes
    share one GPU well) while the plan's ``memory_gb`` of the running models fits in ``memory_gb``
    (default: 97 % of the GPU's memory; unlimited on CPU). Runs start in the plan's order (in the order
    of ``only`` when given), except that
    a run that does not fit next to the running ones lets a later one that fits go first. A run starts
    only when the budget left exceeds its expected wall time (if known, see :func:`_expected_wall`;
    ``start_all``: whenever 60 s are left, for a call that a later call on the same machine continues),
    and is stopped at the budget; the next call resumes it. The checkpoint of a complete run is deleted
    once its JSON is written (``results`` and a copy in the run directory), unless ``keep_checkpoints``.
    Returns the records written by this call, in the plan's order."""
    import threading

    import torch

    if parallel < 1:
        raise ValueError(f"parallel={parallel}: give 1 or more runs at a time")
    plan = load_plan(plan_path)
    pairs = expand_sweeps(plan, sweep)
    runs, sweep_of = [r for r, _ in pairs], {r.id: name for r, name in pairs}
    if only:
        unknown = sorted(set(only) - {r.id for r in runs})
        if unknown:
            raise ValueError(f"--runs: {unknown} are not in sweep {sweep}; see --list")
        by_id = {r.id: r for r in runs}
        runs = [by_id[rid] for rid in dict.fromkeys(only)]  # the order given: longest runs first packs best
    results, work = Path(results), Path(work)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if memory_gb is None:
        memory_gb = (
            0.97 * torch.cuda.get_device_properties(0).total_memory / 2**30
            if device.startswith("cuda")
            else math.inf
        )
    need_gb = {r.id: float((plan.get("memory_gb") or {}).get(r.model, 0.0)) for r in runs}
    deadline = time.time() + budget_s
    todo = []
    for run in runs:
        if is_complete(results, run.id, run.steps) or _restore_record(results, work, run):
            print(f"[study] {run.id}: complete, skipped")
        else:
            todo.append(run)
    records: dict[str, dict[str, Any]] = {}
    queue = threading.Condition()  # guards todo and the running set
    running: dict[str, float] = {}  # run id -> its memory_gb
    stats_lock = threading.Lock()  # one statistics pass on the GPU at a time

    def next_run() -> Run | None:
        with queue:
            while todo:
                for i, r in enumerate(todo):
                    if not running or sum(running.values()) + need_gb[r.id] <= memory_gb:
                        running[r.id] = need_gb[r.id]
                        return todo.pop(i)
                queue.wait()
            return None

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            work_through()
        except BaseException as exc:  # re-raised in the caller's thread after the others finish
            errors.append(exc)

    def work_through() -> None:
        while (run := next_run()) is not None:
            try:
                record = _one_run(
                    run,
                    work,
                    results,
                    deadline,
                    device,
                    sweep_of[run.id],
                    log_dir,
                    len(running),
                    stats_lock,
                    start_all,
                )
            finally:
                with queue:
                    del running[run.id]
                    queue.notify_all()
            if record is None:
                continue
            if record["status"] == "complete" and not keep_checkpoints:
                Path(record["checkpoint"]).unlink()  # ~12 bytes per parameter: the device's disk is 64 GB
            records[run.id] = record

    threads = [threading.Thread(target=worker, name=f"study-{k}") for k in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [records[r.id] for r in runs if r.id in records]


def _one_run(
    run: Run,
    work: Path,
    results: Path,
    deadline: float,
    device: str,
    sweep: str,
    log_dir: str | Path | None,
    concurrent: int,
    lock: Any,
    start_all: bool = False,
) -> dict[str, Any] | None:
    """Train ``run`` (if the budget allows) and write its record; None when nothing was written."""
    left = deadline - time.time()
    ckpt = last_checkpoint(work, run.id)
    if ckpt is None or checkpoint_step(ckpt) < run.steps:
        need = None if start_all else _expected_wall(results, run)
        if need is not None and left < need * 1.1 and ckpt is None:
            print(f"[study] {run.id}: needs ~{need:.0f} s, {left:.0f} s left: not started", flush=True)
            return None
        if left < (60 if start_all else 30):
            print(f"[study] {run.id}: {left:.0f} s left: not started", flush=True)
            return None
        log = Path(log_dir) / f"{run.id}.log" if log_dir else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        train(run, work, left - 20, log, concurrent)  # 20 s for the statistics and the JSON
    if last_checkpoint(work, run.id) is None:
        print(f"[study] {run.id}: no checkpoint written (see its log)", flush=True)
        return None
    with lock:
        record = collect(run, work, device, sweep)
    path = write_record(record, results)
    if record["status"] == "complete":  # survives a tree copy that drops results/ (see _restore_record)
        write_record(record, work / run.id)
    print(
        f"[study] {run.id}: {record['status']}, step {record['steps']}/{run.steps}, "
        f"val loss {record['val_loss']}, {record['wall_s']:.0f} s -> {path}",
        flush=True,
    )
    return record


def _restore_record(results: Path, work: Path, run: Run) -> bool:
    """A complete run whose JSON is in its run directory but not in ``results`` (the device replaces
    the tree between calls, keeping ignored paths such as ``runs/``): copy it back, return True."""
    kept = work / run.id / f"{run.id}.json"
    if not kept.is_file() or not is_complete(kept.parent, run.id, run.steps):
        return False
    results.mkdir(parents=True, exist_ok=True)
    (results / kept.name).write_text(kept.read_text())
    return True


def _expected_wall(results: Path, run: Run) -> float | None:
    """Expected wall time of ``run``: the longest finished run of the same model and residual at the
    same step count; else the longest finished run of the same residual and step count of another
    model, scaled by the ratio of layer counts (the runs are bound by kernel launches, which grow with
    depth); else, from a probe run of them (sweep ``probe``), its fixed cost (wall time minus its steps
    at its median tokens/s) plus ``run.tokens`` at that rate; else None (unknown)."""
    walls, scaled, probes = [], [], []
    layers = _num_layers(run)
    for p in results.glob("*.json"):
        r = json.loads(p.read_text())
        if r.get("schema") != SCHEMA or r.get("status") != "complete" or r.get("residual") != run.residual:
            continue
        plain = r["run_id"] == f"{r['model']}-{r['residual']}-seed{r['seed']}"
        if r["model"] == run.model and r.get("steps") == run.steps and plain:
            walls.append(r["wall_s"])
        elif r["model"] == run.model and r.get("tokens_per_s"):
            fixed = max(r["wall_s"] - r["tokens"] / r["tokens_per_s"], 0.0)
            probes.append(fixed + run.tokens / r["tokens_per_s"])
        elif r.get("steps") == run.steps and plain and layers and r.get("num_layers"):
            scaled.append(r["wall_s"] * layers / r["num_layers"])
    for found in (walls, scaled, probes):
        if found:
            return max(found)
    return None


def _num_layers(run: Run) -> int | None:
    """The layer count set by the run's model file (its last config), if any."""
    cfg = yaml.safe_load((ROOT / run.configs[-1]).read_text()) if (ROOT / run.configs[-1]).is_file() else None
    return ((cfg or {}).get("model", {}).get("config") or {}).get("num_layers")


def model_config(plan: dict[str, Any], model: str, residual_args: dict[str, Any] | None = None) -> Any:
    """The ``attnres.model.Config`` a run of ``model`` gets (vocabulary from the plan's tokenizer when
    it exists, else 8192), validated as ``attnres fit`` validates it at start-up."""
    from lightning_modules.module import as_config
    from lightning_modules.tokenizer import load_tokenizer

    fields = yaml.safe_load((ROOT / plan["models"][model]).read_text())["model"]["config"]
    base = yaml.safe_load((ROOT / plan["configs"][0]).read_text())
    tok = base.get("data", {}).get("tokenizer")
    vocab = load_tokenizer(str(ROOT / tok)).vocab_size if tok and (ROOT / tok).is_file() else 8192
    args = residual_args or {"residual": "block", "num_blocks": 8}
    return as_config({**fields, "vocab_size": vocab, **args})


def describe(plan_path: str | Path) -> str:
    """Parameter counts, FLOPs per token and FLOPs per run of every model of the plan (Block N = 8)."""
    plan = load_plan(plan_path)
    tokens = plan["steps"] * plan["batch_size"] * plan["seq_len"]
    lines = [
        f"{tokens:,} tokens per run ({plan['steps']} steps x {plan['batch_size']} x {plan['seq_len']})",
        "| model | layers | dim | params | active | FLOPs/token | FLOPs/run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in plan["models"]:
        config = model_config(plan, name)
        f = config.flops_per_token(plan["seq_len"])
        lines.append(
            f"| {name} | {config.num_layers} | {config.dim} | {config.num_params() / 1e6:.2f}M | "
            f"{config.num_params(active=True) / 1e6:.2f}M | {f / 1e6:.1f}M | {f * tokens:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default=DEFAULT_PLAN, help="the sweep file (default %(default)s)")
    p.add_argument("--sweep", help="the sweep to run (see the plan's sweeps:), or several: a,b")
    p.add_argument(
        "--runs", default=None, help="comma-separated run ids: a slice of the sweep, started in this order"
    )
    p.add_argument("--results", default=DEFAULT_RESULTS, help="where the per-run JSONs go (%(default)s)")
    p.add_argument("--work", default=DEFAULT_WORK, help="run directories and checkpoints (%(default)s)")
    p.add_argument(
        "--budget_s",
        type=float,
        default=540.0,
        help="wall-clock budget of this call; runs stop at it and resume next time (%(default)s)",
    )
    p.add_argument("--device", default=None, help="for the statistics (default: cuda if available)")
    p.add_argument("--log_dir", default=None, help="one training log per run here (default: inline)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs trained at once, one process each, sharing the device (%(default)s)",
    )
    p.add_argument(
        "--memory_gb",
        type=float,
        default=None,
        help="GPU memory the concurrent runs may use together, by the plan's memory_gb per model "
        "(default: 97 %% of the GPU's)",
    )
    p.add_argument(
        "--start_all",
        action="store_true",
        help="start runs whatever their expected wall time (a later call on the same machine resumes them)",
    )
    p.add_argument("--keep_checkpoints", action="store_true", help="keep last.ckpt of complete runs")
    p.add_argument("--list", action="store_true", help="print the sweep's run ids and their state")
    p.add_argument("--describe", action="store_true", help="print the models' parameter and FLOP counts")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    if a.describe:
        print(describe(a.plan))
        return
    if not a.sweep:
        p.error("--sweep is required (or --describe)")
    if a.list:
        for r, _ in expand_sweeps(load_plan(a.plan), a.sweep):
            state = (
                "complete"
                if is_complete(Path(a.results), r.id)
                else ("started" if last_checkpoint(Path(a.work), r.id) else "todo")
            )
            print(f"{r.id:<28} {state:<9} {r.tokens:>12,} tokens  {' '.join(r.configs[1:])}")
        return
    only = [x.strip() for x in a.runs.split(",") if x.strip()] if a.runs else None
    run_sweep(
        a.plan,
        a.sweep,
        only,
        a.results,
        a.work,
        a.budget_s,
        a.device,
        a.log_dir,
        a.keep_checkpoints,
        parallel=a.parallel,
        memory_gb=a.memory_gb,
        start_all=a.start_all,
    )


if __name__ == "__main__":
    main()
