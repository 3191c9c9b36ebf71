"""Figures and tables of the study from the per-run JSONs of ``benchmarks/study/run.py``.

    python -m benchmarks.study.analyze [--results benchmarks/results/study] [--out docs/images/study]

Writes (each only when its runs are there): ``scaling.png`` (validation loss vs compute, one fitted
power law per residual mode), ``val_curves.png``, ``ablation.png`` (block count), ``dynamics.png``
(output RMS, hidden-state RMS and gradient norm vs depth), ``depth_width.png``, ``heatmaps.png``,
``audit.png`` (the project's models vs the reference runs of ``audit.py``), and
``tables.md`` (every table for docs/results.md, and one row per run: command, seed, device, tokens,
wall time). Only runs whose JSON says ``complete`` are used; mean ± sample std over seeds where a
point has two or more.

Definitions:

* compute ``C`` = model training FLOPs = ``Config.flops_per_token(seq_len)`` x tokens (6 x active
  parameters plus the token mixers' sequence terms; depth attention, < 0.1 %, is left out, so the
  three modes of one size have the same ``C``).
* power law ``L = a * C**b``: least squares of ``log L = log a + b log C`` over the seed means of each
  size (numpy, no scipy).
* compute-equivalence ratio of a variant ``v`` against the baseline ``s`` at compute ``C``: the
  compute the baseline's fitted law needs to reach the variant's loss, divided by ``C``:
  ``r = (L_v / a_s) ** (1 / b_s) / C``. Reported per size with ``L_v`` the variant's measured (seed
  mean) loss at that size's ``C`` ("measured"), and with ``L_v = a_v C**b_v`` from the variant's own
  fit at the geometric mean of the sizes' ``C`` ("fit"). With equal exponents the second is
  ``(a_v / a_s) ** (1 / b)`` at every ``C``. ``r > 1``: the baseline needs ``r`` times the compute.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.study import stats  # noqa: E402

COLORS = {"standard": "tab:gray", "block8": "tab:blue", "full": "tab:red"}


@dataclass(frozen=True)
class Layout:
    """Which models and residual names of configs/study/sweeps.yaml make up each part."""

    scaling_models: tuple[str, ...] = ("xs", "s", "m", "l")
    scaling_modes: tuple[str, ...] = ("standard", "block8", "full")
    ablation_model: str = "m"
    ablation_modes: tuple[str, ...] = ("block1", "block2", "block4", "block8", "block16", "full")
    depth_width_models: tuple[str, ...] = ("dw8", "m", "dw24", "dw32")
    depth_width_modes: tuple[str, ...] = ("standard", "block8")


# ---------------------------------------------------------------------------- the maths


def fit_power_law(compute: Iterable[float], loss: Iterable[float]) -> tuple[float, float]:
    """``(a, b)`` of ``L = a * C**b`` by least squares in log space (two or more distinct ``C``)."""
    c = np.log(np.asarray(list(compute), dtype=float))
    y = np.log(np.asarray(list(loss), dtype=float))
    if len(c) < 2 or np.ptp(c) == 0:
        raise ValueError("a power-law fit needs two or more distinct compute values")
    b, log_a = np.polyfit(c, y, 1)
    return float(math.exp(log_a)), float(b)


def compute_to_match(loss: float, a: float, b: float) -> float:
    """The compute at which ``L = a * C**b`` reaches ``loss``."""
    return (loss / a) ** (1.0 / b)


def compute_equivalence(loss: float, compute: float, baseline: tuple[float, float]) -> float:
    """How many times ``compute`` the baseline's law needs to reach ``loss`` (see the module doc)."""
    return compute_to_match(loss, *baseline) / compute


def mean_std(xs: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample std (None for one value), count."""
    arr = np.asarray(xs, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None), len(arr)


def fmt(mean: float, std: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


# ---------------------------------------------------------------------------- loading


def load_runs(results: str | Path) -> list[dict[str, Any]]:
    """Every run JSON under ``results`` (``*.json``, not recursive)."""
    runs = []
    for p in sorted(Path(results).glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("schema", "").startswith("attnres-study-run/"):
            runs.append(r)
    return runs


def group(runs: list[dict[str, Any]], tag: str | None = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Complete runs by ``(model, residual)``: the untagged ones, or those of sweeps tagged ``tag`` (e.g.
    ``pk``, the package corpus; probe runs carry a tag too)."""
    suffix = f"-{tag}" if tag else ""
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        rid = f"{r['model']}-{r['residual']}-seed{r['seed']}{suffix}"
        if r["status"] == "complete" and r["run_id"] == rid:
            out[(r["model"], r["residual"])].append(r)
    return out


def run_lr(r: dict[str, Any]) -> float | None:
    """The learning rate a run trained at (its saved config's ``model.lr``), None if not recorded."""
    return ((r.get("config") or {}).get("model") or {}).get("lr")


def label(mode: str) -> str:
    return {"standard": "standard", "full": "Full AttnRes"}.get(mode, mode.replace("block", "Block N="))


# ---------------------------------------------------------------------------- part 1: scaling


def scaling(groups: dict, out: Path, lay: Layout) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Figure and tables of part 1; returns (markdown lines, fits by mode). Every mode's law is fitted on
    the sizes every mode has (the others stay in the loss table and the figure, named under the fits)."""
    points: dict[str, list[tuple[float, float, float | None, int, str]]] = defaultdict(list)
    for mode in lay.scaling_modes:
        for model in lay.scaling_models:
            rs = groups.get((model, mode), [])
            if rs:
                m, s, n = mean_std([r["val_loss"] for r in rs])
                points[mode].append((rs[0]["compute_flops"], m, s, n, model))
    if not points:
        return [], {}
    # every mode's law is fitted on the sizes every mode has: laws over different sizes do not compare
    common = set.intersection(*({p[4] for p in pts} for pts in points.values()))
    fitted = {mode: [p for p in pts if p[4] in common] for mode, pts in points.items()}
    left_out = [f"{p[4]} ({label(mode)})" for mode, pts in points.items() for p in pts if p[4] not in common]
    fits = {
        mode: fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        for mode, pts in fitted.items()
        if len({p[0] for p in pts}) >= 2
    }
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode, pts in points.items():
        c = np.array([p[0] for p in pts])
        ax.errorbar(
            c,
            [p[1] for p in pts],
            yerr=[p[2] or 0.0 for p in pts],
            fmt="o",
            ms=4,
            capsize=3,
            color=COLORS.get(mode),
            label=None if mode in fits else label(mode),
        )
        if mode in fits:
            a, b = fits[mode]
            cf = np.array([p[0] for p in fitted[mode]])
            grid = np.geomspace(cf.min() / 1.3, cf.max() * 1.3, 50)
            ax.plot(grid, a * grid**b, "-", color=COLORS.get(mode), label=f"{label(mode)}: {a:.3f}·C^{b:.4f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("validation loss vs compute (mean ± std over seeds)")
    _save(fig, out / "scaling.png")

    lines = [
        "### Loss vs compute",
        "",
        "| size | layers × dim | params (active) | C (FLOPs) | mode | seeds | val loss | tokens/s | wall s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for model in lay.scaling_models:
        for mode in lay.scaling_modes:
            rs = groups.get((model, mode), [])
            if not rs:
                continue
            r0 = rs[0]
            m, s, n = mean_std([r["val_loss"] for r in rs])
            tps = mean_std([r["tokens_per_s"] for r in rs if r.get("tokens_per_s")] or [float("nan")])[0]
            wall = mean_std([r["wall_s"] for r in rs])[0]
            lines.append(
                f"| {model} | {r0['num_layers']} × {r0['dim']} | {r0['params'] / 1e6:.1f}M "
                f"({r0['active_params'] / 1e6:.1f}M) | {r0['compute_flops']:.3g} | {label(mode)} | {n} | "
                f"{fmt(m, s)} | {tps:,.0f} | {wall:.0f} |"
            )
    shared = [model for model in lay.scaling_models if model in common]
    seeds = {mode: {rs[0]["compute_flops"]: [r["val_loss"] for r in rs]
                    for rs in (groups.get((model, mode), []) for model in shared) if rs}
             for mode in points}
    if fits:
        lines += ["", f"| mode | a | b | b, {100 * stats.LEVEL:.0f} % interval (bootstrap over seeds) | "
                  "seeds per size | fitted on |", "|---|---:|---:|---|---|---|"]
        for mode, (a, b) in fits.items():
            ci = stats.power_law_interval(seeds[mode])
            sizes = ", ".join(p[4] for p in fitted[mode])
            lines.append(f"| {label(mode)} | {a:.4f} | {b:.5f} | [{ci['b_lo']:.5f}, {ci['b_hi']:.5f}] | "
                         f"{', '.join(map(str, ci['seeds_per_size']))} | {sizes} |")
        if left_out:
            lines.append(f"\nNot in the fits (sizes not every mode has): {', '.join(left_out)}.")
    base = fits.get("standard")
    if base is not None:
        lines += [
            "",
            "Compute-equivalence ratio vs the standard residual (the baseline's fitted law needs "
            "r × the compute to reach the variant's loss):",
            "",
            "| mode | " + " | ".join(f"{p[4]}, measured" for p in fitted["standard"]) + " | fit, at C̄ |",
            "|---|" + "---:|" * (len(fitted["standard"]) + 1),
        ]
        c_bar = math.exp(np.mean(np.log([p[0] for p in fitted["standard"]])))
        why = None
        for mode in lay.scaling_modes:
            if mode == "standard" or mode not in points:
                continue
            by_model = {p[4]: p for p in fitted[mode]}
            cells = []
            for p in fitted["standard"]:
                q = by_model.get(p[4])
                if q is None:
                    cells.append("–")
                    continue
                eq = stats.equivalence_interval(seeds[mode][q[0]], q[0], seeds["standard"])
                span = f" [{eq['lo']:.3f}, {eq['hi']:.3f}]" if eq["reason"] is None else " [unbounded]"
                cells.append(f"{compute_equivalence(q[1], q[0], base):.3f}{span}")
                why = eq["reason"] if eq["reason"] is not None else why
            fit_r = (
                f"{compute_equivalence(fits[mode][0] * c_bar ** fits[mode][1], c_bar, base):.3f}"
                if mode in fits
                else "–"
            )
            lines.append(f"| {label(mode)} | " + " | ".join(cells) + f" | {fit_r} |")
        lines.append(f"\n(C̄ = {c_bar:.3g} FLOPs, the geometric mean of the sizes' compute. In brackets: the "
                     f"{100 * stats.LEVEL:.0f} % bootstrap interval over seeds.)")
        if why is not None:
            lines.append(f"\nUnbounded: {why}.")
        firsts = [rs[0] for rs in (groups.get((m, "standard"), []) for m in shared) if rs]
        caveat = fixed_budget_caveat(firsts, base[1])
        if caveat:
            lines.append(f"\n{caveat}")
    return lines, fits


def fixed_budget_caveat(runs: list[dict[str, Any]], b: float) -> str | None:
    """Why the ratio above does not compare with a compute-optimal one, when every size trained on the
    same number of tokens (``runs``: one run per size): compute then grows only through the model, the
    baseline's law is a fixed-data law, and a ratio read off a law of exponent ``b`` is exponential in the
    gain (ln r = ln(L_std / L_var) / |b|). None when the token counts differ."""
    tokens = {r.get("tokens") for r in runs}
    if len(runs) < 2 or len(tokens) != 1 or None in tokens:
        return None
    per = sorted(r["tokens"] / r["active_params"] for r in runs)
    return (f"Every size trained on the same {tokens.pop():,} tokens ({per[-1]:.2g} down to {per[0]:.2g} per "
            "active parameter; compute-optimal training is ~20): compute grows only through model size, so "
            f"the standard law (b = {b:.4f}) is a fixed-data law, not a compute-optimal frontier, and a "
            "ratio read off it is exponential in the gain (ln r = ln(L_std / L_var) / |b|). These ratios do "
            "not compare with ratios from compute-optimal laws (the paper's ~1.25x).")


def val_curves(groups: dict, out: Path, lay: Layout) -> None:
    models = [m for m in lay.scaling_models if any((m, mode) in groups for mode in lay.scaling_modes)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for mode in lay.scaling_modes:
            for i, r in enumerate(groups.get((model, mode), [])):
                t = [p[1] for p in r["val_curve"]]
                ax.plot(
                    t,
                    [p[2] for p in r["val_curve"]],
                    "-o",
                    ms=2,
                    color=COLORS.get(mode),
                    alpha=1.0 if i == 0 else 0.5,
                    label=label(mode) if i == 0 else None,
                )
        _decorate(ax, "tokens", f"size {model}", "validation loss")
    _save(fig, out / "val_curves.png")


# ---------------------------------------------------------------------------- part 2: ablation


def ablation(groups: dict, out: Path, lay: Layout) -> list[str]:
    modes = [m for m in lay.ablation_modes if (lay.ablation_model, m) in groups]
    if not modes:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = list(range(len(modes)))
    stats = [mean_std([r["val_loss"] for r in groups[(lay.ablation_model, m)]]) for m in modes]
    ax.errorbar(
        xs,
        [s[0] for s in stats],
        yerr=[s[1] or 0.0 for s in stats],
        fmt="o-",
        capsize=3,
        color="tab:blue",
        label="AttnRes",
    )
    ticks = [("Full" if m == "full" else m.removeprefix("block")) for m in modes]
    lines = [
        "### Block count (size " + lay.ablation_model + ")",
        "",
        "| N | S (sublayers per block) | seeds | val loss |",
        "|---|---:|---:|---:|",
    ]
    base = groups.get((lay.ablation_model, "standard"))
    if base:
        m, s, n = mean_std([r["val_loss"] for r in base])
        ax.axhline(m, color="tab:gray", ls="--", label="standard")
        if s is not None:
            ax.axhspan(m - s, m + s, color="tab:gray", alpha=0.15)
        lines.append(f"| standard | – | {n} | {fmt(m, s)} |")
    for mode, tick, (m, s, n) in zip(modes, ticks, stats, strict=True):
        r0 = groups[(lay.ablation_model, mode)][0]
        size = 1 if mode == "full" else r0["num_sublayers"] // r0["num_blocks"]
        lines.append(f"| {tick} | {size} | {n} | {fmt(m, s)} |")
    ax.set_xticks(xs, ticks)
    _decorate(ax, "number of blocks N", f"block-count ablation, size {lay.ablation_model}",
              "final validation loss", fontsize=8)
    _save(fig, out / "ablation.png")
    return lines


# ---------------------------------------------------------------------------- part 3: dynamics


def dynamics(groups: dict, out: Path, lay: Layout) -> list[str]:
    models = [m for m in lay.scaling_models if any(groups.get((m, mode)) for mode in lay.scaling_modes)]
    if not models:
        return []
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 3.3 * len(models)), squeeze=False)
    lines = [
        "### Training dynamics (final weights, first 8 validation windows)",
        "",
        "| size | mode | output RMS last/first | hidden RMS last/first | grad norm max/min | grad norm CV |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row, model in zip(axes, models, strict=True):
        for mode in lay.scaling_modes:
            rs = [r for r in groups.get((model, mode), []) if r.get("final_stats")]
            if not rs:
                continue
            out_rms = np.array([r["final_stats"]["output_rms"] for r in rs])
            hid_rms = np.array([r["final_stats"]["hidden_rms"] for r in rs])
            keys = list(rs[0]["final_stats"]["grad_norms"])
            grads = np.array([[r["final_stats"]["grad_norms"][k] for k in keys] for r in rs])
            for ax, arr in zip(row, (out_rms, hid_rms, grads), strict=True):
                x = np.arange(1, arr.shape[1] + 1) if arr is out_rms else np.arange(arr.shape[1])
                mean = arr.mean(0)
                ax.plot(x, mean, "-o", ms=2, color=COLORS.get(mode), label=label(mode))
                if len(arr) > 1:
                    sd = arr.std(0, ddof=1)
                    ax.fill_between(x, mean - sd, mean + sd, color=COLORS.get(mode), alpha=0.2)
            g = grads.mean(0)
            lines.append(
                f"| {model} | {label(mode)} | {out_rms.mean(0)[-1] / out_rms.mean(0)[0]:.2f} | "
                f"{hid_rms.mean(0)[-1] / hid_rms.mean(0)[0]:.2f} | {g.max() / g.min():.2f} | "
                f"{g.std() / g.mean():.2f} |"
            )
        for ax, title in zip(
            row,
            ("sublayer output RMS", "hidden-state RMS (sublayer input)", "gradient norm per sublayer"),
            strict=True,
        ):
            ax.set_yscale("log")
            _decorate(ax, "depth (sublayer)", f"size {model}: {title}", title_size=9)
    _save(fig, out / "dynamics.png")
    return lines


# ---------------------------------------------------------------------------- part 4: depth vs width


def depth_width(groups: dict, out: Path, lay: Layout) -> list[str]:
    models = [m for m in lay.depth_width_models if any((m, mode) in groups for mode in lay.depth_width_modes)]
    if not models:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    lines = [
        "### Depth vs width (≈ equal parameters)",
        "",
        "| shape | layers × dim | params (active) | mode | seeds | val loss |",
        "|---|---|---:|---|---:|---:|",
    ]
    for mode in lay.depth_width_modes:
        pts = []
        for model in models:
            rs = groups.get((model, mode), [])
            if rs:
                m, s, n = mean_std([r["val_loss"] for r in rs])
                r0 = rs[0]
                pts.append((r0["num_layers"], m, s))
                lines.append(
                    f"| {model} | {r0['num_layers']} × {r0['dim']} | {r0['params'] / 1e6:.1f}M "
                    f"({r0['active_params'] / 1e6:.1f}M) | {label(mode)} | {n} | {fmt(m, s)} |"
                )
        if pts:
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0.0 for p in pts],
                fmt="o-",
                capsize=3,
                color=COLORS.get(mode),
                label=label(mode),
            )
    _decorate(ax, "layers (width shrinks to keep the parameter count)",
              "depth vs width at ≈ equal parameters", "final validation loss", fontsize=8)
    _save(fig, out / "depth_width.png")
    return lines


# ---------------------------------------------------------------------------- part 5: heatmaps


def lr_check(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """Validation loss vs learning rate for every (model, residual) that has runs of a tagged
    learning-rate sweep (``lr_hi``, ``lr_lo``), next to its untagged run(s) at the plan's rate.
    Partial runs count too: every run of one (model, residual) is also compared at the last
    validation step that all of them reached. Figure ``lr_check.png``: their validation curves."""
    by: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    checked = set()
    for r in runs:
        lr = run_lr(r)
        base = f"{r['model']}-{r['residual']}-seed{r['seed']}"
        plain = r["run_id"] == base and r["status"] == "complete"
        if lr is None or not (plain or r["run_id"][len(base) :].startswith("-lr")):
            continue
        by[(r["model"], r["residual"])].append((float(lr), r))
        if not plain:
            checked.add((r["model"], r["residual"]))
    if not checked:
        return []
    lines = [
        "### Learning-rate check",
        "",
        "| size | mode | lr | seed | status | steps | final val loss | val loss at step k | k |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in sorted(checked):
        group = sorted(by[key], key=lambda x: (x[0], x[1]["seed"]))
        curves = [{s: loss for s, _, loss in r["val_curve"]} for _, r in group]
        k = max(set.intersection(*(set(c) for c in curves)), default=None)
        for (lr, r), curve in zip(group, curves):
            at_k = f"{curve[k]:.4f}" if k is not None else "–"
            final = f"{r['val_loss']:.4f}" if r["status"] == "complete" else "–"
            lines.append(
                f"| {key[0]} | {label(key[1])} | {lr:g} | {r['seed']} | {r['status']} | {r['steps']} | "
                f"{final} | {at_k} | {k if k is not None else '–'} |"
            )
    keys = sorted(checked)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        group_ = sorted(by[key], key=lambda x: (x[0], x[1]["seed"]))
        rates = sorted({lr for lr, _ in group_})
        shades = plt.get_cmap("viridis")([0.75 * i / max(len(rates) - 1, 1) for i in range(len(rates))])
        for lr, r in group_:
            curve, done = r["val_curve"], r["status"] == "complete"
            name = f"lr {lr:g}" + ("" if done else f" (stopped at step {r['steps']})")
            steps, losses = [p[0] for p in curve], [p[2] for p in curve]
            ax.plot(steps, losses, "-o" if done else "--o", ms=2, color=shades[rates.index(lr)], label=name)
        _decorate(ax, "step", f"size {key[0]}, {label(key[1])}")
    axes[0][0].set_ylabel("validation loss")
    _save(fig, out / "lr_check.png")
    return lines


def of_sweep(run_id: str, base: str) -> bool:
    """Whether ``run_id`` is the run ``base`` (an id ending in a sweep's tag) or one of its
    learning-rate points, ``base-lr<scale>``."""
    return run_id == base or run_id.startswith(base + "-lr")


def audit_mode(r: dict[str, Any]) -> str:
    """An ``audit.py`` run's residual as the study names its modes (``block`` with 8 blocks: ``block8``)."""
    return r["residual"] + (str(r["num_blocks"]) if r["residual"] == "block" else "")


def by_rate(runs: list[dict[str, Any]], tag: str) -> dict[tuple[str, str], dict[float, list[dict[str, Any]]]]:
    """The complete runs of the sweeps tagged ``tag`` and ``tag-lr<scale>``, by (size, mode) and rate."""
    by: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        base = f"{r['model']}-{r['residual']}-seed{r['seed']}-{tag}"
        lr = run_lr(r)
        if r["status"] == "complete" and lr is not None and of_sweep(r["run_id"], base):
            by[(r["model"], r["residual"])][float(lr)].append(r)
    return by


def in_order(name: str, order: tuple[str, ...]) -> tuple[int, str]:
    """A sort key: the names of ``order`` in its order, any other after them by name."""
    return (order.index(name) if name in order else len(order), name)


def diff_cell(base: list[float], other: list[float]) -> str:
    """``other`` − ``base`` (seed means) with its bootstrap interval; none with one seed on each side, "–"
    without a base."""
    if not base or not other:
        return "–"
    d = stats.difference_interval(base, other)
    if len(base) == 1 and len(other) == 1:
        return f"{d['diff']:+.4f} (one seed each)"
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def by_seed(rates: dict[float, list[dict[str, Any]]], key: str) -> dict[float, dict[int, float]]:
    """``{lr: {seed: run[key]}}`` from ``{lr: [run, ...]}``: what :func:`stats.best_rate` compares on the
    seeds every rate has."""
    return {lr: {r["seed"]: r[key] for r in rs} for lr, rs in rates.items()}


def best_rate_groups(runs: list[dict[str, Any]], tag: str) -> tuple[dict, list[str]]:
    """Each (size, mode) at its own best rate (issue 25: every mode tuned): the groups ``group`` would
    give, but with the runs of the rate of lowest mean loss among the sweeps tagged ``tag`` and
    ``tag-lr<scale>``; and the table of those rates, seeds, losses and each mode's difference from the
    standard model of its size (each at its own best rate), with the bootstrap interval."""
    by = by_rate(runs, tag)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    rows = []
    lay = Layout()
    for key, rates in sorted(by.items(), key=lambda kv: (in_order(kv[0][0], lay.scaling_models),
                                                            in_order(kv[0][1], lay.scaling_modes))):
        best = stats.best_rate(by_seed(rates, "val_loss"))
        groups[key] = sorted(rates[best["best"]], key=lambda r: r["seed"])
        rows.append((key, best))
    if not rows:
        return groups, []
    lines = [f"### Each mode at its own best learning rate (runs tagged {tag})", "",
             "The rate of lowest seed-mean loss among the sweep's points (compared on the seeds every rate "
             "has, where they differ); a best rate at the sweep's edge "
             f"is marked (the optimum may lie beyond). Differences with a {stats.LEVEL:.0%} bootstrap "
             "interval over the seeds.", "",
             "| size | mode | best lr | rates tried | seeds | final val loss | − standard at its best rate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (model, mode), best in rows:
        losses = [r["val_loss"] for r in groups[(model, mode)]]
        base = [r["val_loss"] for r in groups.get((model, "standard"), [])]
        diff = "–" if mode == "standard" else diff_cell(base, losses)
        edge = " (edge)" if best["at_edge"] else ""
        lines.append(f"| {model} | {label(mode)} | {best['best']:g}{edge} | {best['points']} | "
                     f"{len(losses)} | {fmt(*mean_std(losses)[:2])} | {diff} |")
    return groups, lines


def lr_sweep(runs: list[dict[str, Any]], tag: str) -> list[str]:
    """Per (size, mode), the final validation loss at each rate of the sweeps tagged ``tag`` and
    ``tag-lr<scale>`` (complete runs, mean ± std over seeds), the best rate and whether it sits at the
    sweep's edge (``stats.best_rate``)."""
    by = {k: by_seed(v, "val_loss") for k, v in by_rate(runs, tag).items()}
    if not by:
        return []
    lines = [f"### Learning-rate sweep (runs tagged {tag})", "",
             "| size | mode | lr: final val loss | best lr | at the sweep's edge |", "|---|---|---|---:|---|"]
    for (model, mode), losses in sorted(by.items()):
        best = stats.best_rate(losses)
        cells = ", ".join(f"{lr:g}: {fmt(*mean_std(list(v.values()))[:2])} ({len(v)})"
                          for lr, v in sorted(losses.items()))
        if "compared_on" in best:
            cells += f"; compared on seed{'s' * (len(best['compared_on']) > 1)} " + \
                ", ".join(map(str, best["compared_on"]))
        lines.append(f"| {model} | {label(mode)} | {cells} | {best['best']:g} | "
                     f"{'yes: extend the sweep' if best['at_edge'] else 'no'} |")
    return lines


def load_audits(results: str | Path) -> list[dict[str, Any]]:
    """Every complete reference run of ``benchmarks/study/audit.py`` under ``results``."""
    out = []
    for p in sorted(Path(results).glob("*.json")) if Path(results).is_dir() else []:
        r = json.loads(p.read_text())
        if r.get("kind") == "baseline-audit" and r.get("status") == "complete":
            out.append(r)
    return out


AUDIT_ROWS = (  # (row name, where its runs come from, the residual or audit mode, colour, line)
    ("project standard", "study", "standard", "tab:gray", "-"),
    ("project Block N=8", "study", "block8", "tab:blue", "-"),
    ("reference (litgpt GPT)", "audit", "plain", "black", "--"),
    ("reference + Block N=8", "audit", "block8", "tab:cyan", "--"),
)


def audit(runs: list[dict[str, Any]], audits: list[dict[str, Any]], tag: str | None, out: Path) -> list[str]:
    """The baseline audit (issue 25, item 1): per size, the project's standard and Block models (study
    runs of ``tag``) beside the independent reference (litgpt's GPT) with and without Block AttnRes
    (``audit.py``'s runs, ids ``<size>-reference-<mode>-seed<k>[-tag]``), on the same data, tokens and
    validation windows: final validation loss (mean ± std over seeds), each row's difference from the
    project standard with its bootstrap interval, and ``audit.png``, the seed-mean validation curves."""
    from benchmarks.study.audit import default_run_id

    groups = group(runs, tag)
    ref: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    own: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)  # (model, suffix, mode)
    for r in audits:
        mode = audit_mode(r)
        rid = default_run_id(r["model"], r["arch"], r["residual"], r["num_blocks"], r["seed"], tag)
        if r["arch"] == "reference" and r["run_id"] == rid:
            ref[(r["model"], mode)].append(r)
        elif r["arch"] == "project" and r["run_id"].startswith(rid):  # audit.py's own project runs, by tag
            mode = "standard" if mode == "plain" else mode
            own[(r["model"], r["run_id"][len(rid):].lstrip("-"), mode)].append(r)

    def data(r: dict[str, Any]) -> str:  # the shards and windows an audit run trained on (not its seed)
        return json.dumps({k: v for k, v in r["settings"]["data"].items() if k != "seed"}, sort_keys=True)

    same_data = {(m, data(r)) for (m, _), rs in ref.items() for r in rs}
    own = defaultdict(list, {k: kept for k, rs in own.items()  # a tag on other data is not this table's
                             if (kept := [r for r in rs if (k[0], data(r)) in same_data])})
    sizes = sorted({m for m, _ in ref}, key=lambda m: in_order(m, Layout().scaling_models))
    if not sizes:
        return []

    def seeds_of(src: str, model: str, mode: str) -> list[dict[str, Any]]:
        """The runs of one row, by seed, as {curve, loss, tokens_per_s, tokens} (study and audit JSONs name
        the final loss differently); ``src``: study, audit (the reference) or the tag of audit.py's own
        project runs."""
        rs = (groups.get((model, mode), []) if src == "study" else ref.get((model, mode), [])
              if src == "audit" else own.get((model, src, mode), []))
        return [{"curve": r["val_curve"], "loss": r["val_loss"] if src == "study" else r["final_val_loss"],
                 "tokens_per_s": r.get("tokens_per_s") or 0.0, "tokens": r["tokens"],
                 "hidden": (r.get("final_stats") or {}).get("hidden_rms") if src == "study"
                 else r.get("hidden_rms")}
                for r in sorted(rs, key=lambda r: r["seed"])]

    lines = ["### Baseline audit: the project's models vs an independent decoder (litgpt's GPT)", "",
             f"Same shards, tokens, schedule and validation windows{f' (runs tagged {tag})' if tag else ''}; "
             f"differences from the project's standard model with a {stats.LEVEL:.0%} bootstrap interval "
             "over the seeds. Rows `[audit.py T]` are the project's decoder trained by audit.py's loop "
             "(runs tagged T: an init or an ablation, in the audit's README); their difference is from the "
             "standard model of the same T. Hidden RMS last/first: the residual stream's RMS where the "
             "final norm reads it over its RMS at the first sublayer's input (the embedding), final weights, "
             "first 8 validation windows, mean over the seeds that recorded it.", "",
             "| size | model | seeds | training tokens | final val loss | − project standard | tokens/s "
             "| hidden RMS last/first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    width = 4.6 + (3.2 if own else 0.0)  # room for the legend beside the panel
    fig, axes = plt.subplots(1, len(sizes), figsize=(width * len(sizes), 3.6), squeeze=False)
    for ax, model in zip(axes[0], sizes, strict=True):
        tags = sorted({s for m, s, _ in own if m == model})
        # audit.py's project runs: a colour per tag, dotted standard, dash-dot Block
        rows = list(AUDIT_ROWS) + [
            (f"{name} [audit.py {suffix}]" if suffix else f"{name} [audit.py]", suffix, mode,
             plt.cm.tab10(2 + k), ":" if mode == "standard" else "-.")
            for k, suffix in enumerate(tags) for name, _, mode, _, _ in AUDIT_ROWS[:2]]
        for name, src, mode, color, ls in rows:
            seeds = seeds_of(src, model, mode)
            if not seeds:
                continue
            losses = [r["loss"] for r in seeds]
            tokens = "/".join(f"{t:,}" for t in sorted({r["tokens"] for r in seeds}))
            base = [r["loss"] for r in seeds_of("study" if src == "audit" else src, model, "standard")]
            diff = "–" if mode == "standard" and src != "audit" else diff_cell(base, losses)
            loss = fmt(*mean_std(losses)[:2])
            growth = [g for r in seeds if (g := rms_growth(r["hidden"])) is not None]
            lines.append(f"| {model} | {name} | {len(seeds)} | {tokens} | {loss} | {diff} | "
                         f"{np.mean([r['tokens_per_s'] for r in seeds]):,.0f} | "
                         f"{f'{np.mean(growth):.1f}' if growth else '–'} |")
            common = sorted(set.intersection(*({p[0] for p in r["curve"]} for r in seeds)))
            curve = [np.mean([{p[0]: p[2] for p in r["curve"]}[k] for r in seeds]) for k in common]
            ax.plot(common, curve, ls, marker="o", ms=2, color=color, label=f"{name} ({len(seeds)} seeds)")
        _decorate(ax, "step", f"size {model}: validation loss, seed mean")
    axes[0][0].set_ylabel("validation loss")
    _save(fig, out / "audit.png")
    return lines


def heatmaps(groups: dict, out: Path) -> None:
    panels = []
    for (model, mode), rs in sorted(groups.items()):
        r = min(rs, key=lambda r: r["seed"])
        if r.get("final_stats") and r["final_stats"].get("depth_attention") is not None:
            panels.append(
                (f"{model}, {label(mode)} (seed {r['seed']})", mode, r["final_stats"]["depth_attention"])
            )
    if not panels:
        return
    from lightning_modules.plots import source_labels

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    for ax, (title, mode, matrix) in zip(axes.flat, panels, strict=False):
        m = np.array([[np.nan if x is None else x for x in row] for row in matrix], dtype=float)
        im = ax.imshow(
            np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        n_rows = m.shape[0]
        step = max(1, n_rows // 12)
        names = source_labels("block" if mode.startswith("block") else "full", n_rows)
        ax.set_yticks(range(0, n_rows, step), names[::step], fontsize=6)
        ax.set_xlabel("sublayer input → read-out (last column)", fontsize=7)
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _save(fig, out / "heatmaps.png")


# ---------------------------------------------------------------------------- per-run table


def run_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### Runs",
        "",
        "| run | status | seed | device | tokens | steps | wall s | tokens/s | val loss | command |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(runs, key=lambda r: r["run_id"]):
        dev = r["device"].get("name", r["device"].get("device"))
        vl = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "–"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–"
        lines.append(
            f"| {r['run_id']} | {r['status']} | {r['seed']} | {dev} | {r['tokens']:,} | {r['steps']} | "
            f"{r['wall_s']:.0f} | {tps} | {vl} | `{r.get('command') or ''}` |"
        )
    return lines


def _decorate(ax: Any, xlabel: str, title: str, ylabel: str | None = None, fontsize: int = 7,
              title_size: int | None = None) -> None:
    """A panel's labels, title, grid and legend, the same on every figure."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 6:  # many curves: the legend beside the panel, not on them
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=fontsize)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def rms_growth(hidden: list[float] | None) -> float | None:
    """The residual stream's RMS where the final norm reads it over its RMS at the first sublayer's input
    (a run's ``hidden_rms``, by depth); None for a run that did not record it."""
    return hidden[-1] / hidden[0] if hidden else None


def rated_runs(runs: list[dict[str, Any]], audits: list[dict[str, Any]], tag: str) -> dict:
    """``{(size, source, mode): {lr: [{"loss", "growth"}, ...]}}``: the project's runs of the sweep ``tag``
    and its rate sweeps (source ``study``, :func:`by_rate`) and the reference runs of those tags (source
    ``audit``, mode ``plain`` / ``block8``), by learning rate, one entry per seed."""
    from benchmarks.study.audit import default_run_id

    rated: dict[tuple[str, str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (model, mode), rates in by_rate(runs, tag).items():
        for lr, rs in rates.items():
            rated[(model, "study", mode)][lr] += [
                {"loss": r["val_loss"], "seed": r["seed"],
                 "growth": rms_growth((r.get("final_stats") or {}).get("hidden_rms"))}
                for r in rs]
    for r in audits:
        rid = default_run_id(r["model"], "reference", r["residual"], r["num_blocks"], r["seed"], tag)
        if r["arch"] == "reference" and of_sweep(r["run_id"], rid):
            lr = float(r["settings"]["lr"])
            rated[(r["model"], "audit", audit_mode(r))][lr].append(
                {"loss": r["final_val_loss"], "seed": r["seed"], "growth": rms_growth(r.get("hidden_rms"))})
    return rated


def audit_best_rates(rated: dict, tag: str) -> list[str]:
    """The audit with every model at its own best rate (issue 25: the baseline tuned as the reference
    is): the project's standard and Block models (the study's runs tagged ``tag`` and ``tag-lr<scale>``,
    :func:`by_rate`) and the reference with and without Block AttnRes (``audit.py``'s runs of those tags,
    ids ``<size>-reference-<mode>-seed<k>-<tag>[-lr<scale>]``), each at the rate of its lowest seed-mean
    loss; differences from the project's standard model at its best rate. ``rated``: :func:`rated_runs`.
    Empty unless some reference was trained at two rates or more."""
    if not any(len(rates) > 1 for (_, src, _), rates in rated.items() if src == "audit"):
        return []
    lines = [f"### Baseline audit, every model at its own best learning rate (runs tagged {tag})", "",
             "Each row at the rate of its lowest seed-mean loss among the rates it was trained at (an edge "
             "mark: the optimum may lie beyond); differences from the project's standard model at its own "
             f"best rate, {stats.LEVEL:.0%} bootstrap interval over the seeds; hidden RMS last/first as in "
             "the table above (mean over the seeds that recorded it).", "",
             "| size | model | best lr | rates tried | seeds | final val loss "
             "| − project standard at its best | hidden RMS last/first |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    losses_of = {k: by_seed(rates, "loss") for k, rates in rated.items()}
    at_best = {k: (p := stats.best_rate(losses_of[k]), rates[p["best"]]) for k, rates in rated.items()}
    for model in sorted({m for m, src, _ in rated if src == "audit"},
                        key=lambda m: in_order(m, Layout().scaling_models)):
        base = [r["loss"] for r in at_best.get((model, "study", "standard"), (None, []))[1]]
        for name, src, mode, *_ in AUDIT_ROWS:
            if (model, src, mode) not in at_best:
                continue
            point, seeds = at_best[(model, src, mode)]
            losses = [r["loss"] for r in seeds]
            diff = "–" if mode == "standard" and src == "study" else diff_cell(base, losses)
            edge = " (edge)" if point["at_edge"] else ""
            growth = [r["growth"] for r in seeds if r["growth"] is not None]
            lines.append(f"| {model} | {name} | {point['best']:g}{edge} | {point['points']} | "
                         f"{len(losses)} | {fmt(*mean_std(losses)[:2])} | {diff} | "
                         f"{f'{np.mean(growth):.1f}' if growth else '–'} |")
    return lines


def lr_sweep_figure(rated: dict, out: Path) -> Path | None:
    """``lr_sweep.png``: final validation loss against the learning rate (log scale), one panel per size
    with a sweep (some model at two rates or more) and one line per model and mode (seed mean, the seeds'
    spread as error bars), the reference dashed; None when no model was trained at two rates."""
    swept = {m for (m, _, _), rates in rated.items() if len(rates) > 1}  # sizes with a sweep to show
    if not swept:
        return None
    sizes = sorted(swept, key=lambda m: in_order(m, Layout().scaling_models))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.8), squeeze=False)
    names = {(src, mode): (name, color, ls) for name, src, mode, color, ls in AUDIT_ROWS}
    for ax, model in zip(axes[0], sizes, strict=True):
        for (m, src, mode), rates in sorted(rated.items()):
            if m != model:
                continue
            name, color, ls = names.get((src, mode), (f"project {label(mode)}", "tab:orange", "-"))
            lrs = sorted(rates)
            stats_ = [mean_std([r["loss"] for r in rates[lr]]) for lr in lrs]
            ax.errorbar(lrs, [st[0] for st in stats_], yerr=[st[1] or 0.0 for st in stats_], fmt="o",
                        ls=ls, ms=3, capsize=2, color=color, label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({lr for (m, _, _), rates in rated.items() if m == model for lr in rates})
        ax.set_xticks(ticks, [f"{lr:g}" for lr in ticks])
        ax.minorticks_off()
        _decorate(ax, "learning rate", f"size {model}: final validation loss vs learning rate")
    axes[0][0].set_ylabel("final validation loss (seed mean ± std)")
    return _save(fig, out / "lr_sweep.png")


def analyze(results: str | Path, out: str | Path, lay: Layout | None = None,
            tag: str | None = None, audits: str | Path = "benchmarks/results/audit",
            best_rates: bool = True) -> dict[str, Any]:
    """Write every figure and ``tables.md`` that the complete runs under ``results`` allow: the untagged
    runs, or (``tag``) those of the sweeps tagged ``tag`` and its learning-rate sweep, each mode at its
    own best rate (``best_rates``; else at the sweep ``tag``'s rate); the baseline audit first when
    ``audits`` holds reference runs of the same tag."""
    out = Path(out)
    lay = lay or Layout()
    runs = load_runs(results)
    if not runs:
        raise FileNotFoundError(f"no run JSON under {results}")
    groups, best_lines = best_rate_groups(runs, tag) if tag and best_rates else (group(runs, tag), [])
    lines: list[str] = []
    scaling_lines, fits = scaling(groups, out, lay)
    val_curves(groups, out, lay)
    found = load_audits(audits)
    rated = rated_runs(runs, found, tag) if tag else {}
    lr_sweep_figure(rated, out)
    for part in (
        audit(runs, found, tag, out),
        audit_best_rates(rated, tag) if tag and best_rates else [],
        best_lines,
        scaling_lines,
        ablation(groups, out, lay),
        dynamics(groups, out, lay),
        depth_width(groups, out, lay),
        lr_sweep(runs, tag) if tag else lr_check(runs, out),
    ):
        if part:
            lines += part + [""]
    heatmaps(groups, out)
    lines += run_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    written = sorted(p.name for p in out.glob("*.png"))
    print(
        f"{len(runs)} runs ({sum(r['status'] == 'complete' for r in runs)} complete) -> {out}: "
        f"{', '.join(written)}, tables.md"
    )
    return {"fits": fits, "figures": written, "runs": len(runs)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results/study")
    p.add_argument("--out", default="docs/images/study")
    p.add_argument("--tag", default=None,
                   help="the runs of the sweeps with this tag (e.g. pk: the package corpus)")
    p.add_argument("--audits", default="benchmarks/results/audit",
                   help="benchmarks/study/audit.py's reference runs (the baseline audit)")
    p.add_argument("--at_sweep_rate", action="store_true",
                   help="with --tag: every mode at the rate of the sweep TAG itself (x1), not at its own "
                        "best rate of the sweeps TAG and TAG-lr<scale>")
    a = p.parse_args(argv)
    analyze(a.results, a.out, tag=a.tag, audits=a.audits, best_rates=not a.at_sweep_rate)


if __name__ == "__main__":
    main()
