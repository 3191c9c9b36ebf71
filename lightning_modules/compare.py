"""``attnres compare``: the residual modes trained on the same data, seed(s) and budget, tabulated.

Each mode is one ``attnres fit`` run per seed; the table and ``results.json`` give each mode's numbers, or,
with several seeds, their mean and sample standard deviation over the seeds (every run kept under
``runs``), so a difference between modes can be read against the seed-to-seed noise.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from attnres.errors import UsageError
from lightning_modules.commands import DEFAULT_CONFIG

MODES = ("standard", "full", "block")
# the per-run numbers that are averaged over seeds (the rest is the same for every seed of a mode)
AVERAGED = ("train_loss", "val_loss", "val_ppl", "tokens_per_s", "wall_s")


def compare(
    configs: list[str] | None = None,
    modes: list[str] | None = None,
    max_steps: int | None = None,
    output_dir: str = "runs/compare",
    seed: int = 1234,
    seeds: int = 1,
    args: list[str] | None = None,
) -> dict[str, dict]:
    """Train standard, Block and Full AttnRes on the same budget and tabulate the results.

    The same model with each residual (same config, seed, data order and token budget); writes
    ``loss_curves.png``, ``results.md`` and ``results.json``.

    Args:
        configs: config files composed in order (``-c`` works as well). Default: configs/default.yaml.
        modes: residual modes to train, in this order.
        max_steps: optimizer steps per run (default: the config's ``trainer.max_steps``).
        output_dir: runs go to ``<output_dir>/<mode>[-seed<s>]/version_<n>``, results to ``<output_dir>``.
        seed: the seed of the first run of every mode; with ``seeds`` K, seeds ``seed .. seed + K - 1``.
        seeds: runs per mode (K >= 1): with K >= 2 the table reports mean ± sample std over the seeds.
        args: more ``attnres fit`` arguments for every run, e.g. ``["--data.batch_size=4"]``.
    """
    from lightning_modules import plots
    from lightning_modules.cli import check_writable

    configs = configs or [DEFAULT_CONFIG]
    modes = modes or ["standard", "block", "full"]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown residual mode(s) {bad}; valid: standard, full, block")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max_steps {max_steps}: must be >= 1")
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: must be >= 1 (runs per mode)")
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError(f"--configs: no such file {missing[0]} (run from the repository root?)")
    out = Path(output_dir)
    check_writable(out, "--output_dir")
    results: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    for mode in modes:
        runs = []
        for k in range(seeds):
            name = mode if seeds == 1 else f"{mode}-seed{seed + k}"
            run, curves[name] = _train(configs, mode, seed + k, name, out, max_steps, args)
            runs.append(run)
        results[mode] = runs[0] if seeds == 1 else aggregate(runs)
    png = plots.loss_curves(
        curves,
        out / "loss_curves.png",
        f"residual modes, same data/seed/budget ({results[modes[0]]['tokens']:,} tokens"
        + (f", {seeds} seeds each)" if seeds > 1 else ")"),
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nloss curves: {png}\nresults: {out / 'results.md'}, {out / 'results.json'}")
    return results


def _train(
    configs: list[str], mode: str, seed: int, name: str, out: Path, max_steps: int | None,
    args: list[str] | None,
) -> tuple[dict[str, Any], dict]:
    """One ``attnres fit`` run: its numbers and its loss curves."""
    from lightning_modules.callbacks import data_parallel_size
    from lightning_modules.cli import AttnResCLI

    argv = ["fit"] + [x for c in configs for x in ("-c", c)]
    argv += ["--model.config.residual", mode, "--seed_everything", str(seed), "--run_name", name,
             "--trainer.default_root_dir", str(out)]
    if max_steps is not None:
        argv += ["--trainer.max_steps", str(max_steps)]
    argv += list(args or [])
    print(f"attnres compare: training {name} ...", flush=True)
    t0 = time.perf_counter()
    cli = AttnResCLI(args=argv)
    wall = time.perf_counter() - t0
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    rows = _read_metrics(Path(trainer.log_dir) / "metrics.csv")
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    ppl = [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    curve = {"train": ([s for s, _ in train], [v for _, v in train]),
             "val": ([s for s, _ in val], [v for _, v in val])}
    tail = [v for _, v in train[-max(1, len(train) // 10) :]]
    run = {
        "residual": mode,
        "seed": seed,
        "num_blocks": module.config.num_blocks if mode == "block" else None,
        "params": module.model.num_parameters(),
        "active_params": module.model.num_parameters(active=True),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * dm.batch_size * dm.seq_len * data_parallel_size(trainer)
        * trainer.accumulate_grad_batches,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": val[-1][1] if val else None,
        "val_ppl": ppl[-1] if ppl else None,
        "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,  # median: robust to stalls
        "wall_s": wall,
        "run_dir": str(trainer.log_dir),
    }
    return run, curve


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's runs over seeds: the first run's fixed fields, the mean of each :data:`AVERAGED` number
    with its sample standard deviation as ``<name>_std`` (None where a run lacks it), the seeds, and every
    run under ``runs``."""
    merged = {k: v for k, v in runs[0].items() if k not in (*AVERAGED, "seed", "run_dir")}
    for key in AVERAGED:
        values = [r[key] for r in runs]
        ok = all(v is not None and not math.isnan(v) for v in values)
        merged[key] = statistics.fmean(values) if ok else None
        merged[f"{key}_std"] = statistics.stdev(values) if ok and len(values) > 1 else None
    merged["seeds"] = [r["seed"] for r in runs]
    merged["runs"] = runs
    return merged


def results_table(results: dict[str, dict]) -> str:
    """The markdown table of :func:`compare` (``mean ± std`` where the runs were over several seeds)."""

    def f(r: dict, key: str, fmt: str) -> str:
        x = r.get(key)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "–"
        std = r.get(f"{key}_std")
        return format(x, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")

    seeded = any(r.get("seeds") for r in results.values())
    lines = [
        "| residual | params | tokens | " + ("seeds | " if seeded else "")
        + "train loss | val loss | val ppl | tokens/s | wall s |",
        "|---|---:|---:|" + ("---:|" if seeded else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        name = r["residual"] + (f" (N={r['num_blocks']})" if r.get("num_blocks") else "")
        cells = [name, f"{r['params']:,}", f"{r['tokens']:,}"]
        cells += [str(len(r.get("seeds") or [r.get("seed")]))] if seeded else []
        cells += [f(r, "train_loss", ".4f"), f(r, "val_loss", ".4f"), f(r, "val_ppl", ".2f"),
                  f(r, "tokens_per_s", ".0f"), f(r, "wall_s", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_metrics(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
