"""The study's noise estimates (benchmarks/study/stats.py) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.study import stats
from benchmarks.study.analyze import compute_equivalence, fit_power_law


def _points(a: float, b: float, cs, noise: float, seeds: int, rng) -> dict[float, list[float]]:
    return {c: list(a * c**b * np.exp(noise * rng.standard_normal(seeds))) for c in cs}


def test_the_fit_is_the_seed_means_least_squares_and_its_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    cs = [1e15, 3e15, 1e16, 3e16]
    pts = _points(30.0, -0.08, cs, 0.01, 3, rng)
    out = stats.power_law_interval(pts)
    a, b = fit_power_law(cs, [np.mean(v) for v in pts.values()])  # the study's own fit, numpy.polyfit
    assert out["a"] == pytest.approx(a, rel=1e-9) and out["b"] == pytest.approx(b, rel=1e-9)
    assert out["b_lo"] < b < out["b_hi"] and out["b_lo"] < -0.08 < out["b_hi"]
    assert out["seeds_per_size"] == [3, 3, 3, 3]
    # coverage over repeated experiments: a 90 % interval holds the true exponent most of the time
    intervals = [stats.power_law_interval(_points(30.0, -0.08, cs, 0.01, 3, rng), n=400) for _ in range(40)]
    hits = sum(o["b_lo"] < -0.08 < o["b_hi"] for o in intervals)
    assert hits >= 28  # 40 experiments; the bootstrap of 3 seeds is a little narrow, never this far off


def test_one_seed_per_size_gives_a_zero_width_interval():
    out = stats.power_law_interval({1e15: [3.0], 1e16: [2.5]})
    assert out["b_lo"] == pytest.approx(out["b"]) and out["b_hi"] == pytest.approx(out["b"])


def test_equivalence_matches_the_point_formula_and_brackets_it():
    rng = np.random.default_rng(2)
    cs = [1e15, 3e15, 1e16, 3e16]
    base = _points(30.0, -0.08, cs, 0.005, 3, rng)
    variant = list(0.98 * 30.0 * 1e16**-0.08 * np.exp(0.005 * rng.standard_normal(3)))
    out = stats.equivalence_interval(variant, 1e16, base)
    fit = fit_power_law(cs, [np.mean(v) for v in base.values()])
    assert out["ratio"] == pytest.approx(compute_equivalence(float(np.mean(variant)), 1e16, fit), rel=1e-9)
    assert out["reason"] is None and out["lo"] < out["ratio"] < out["hi"]
    # 2 % lower loss at b = -0.08 is 0.98 ** (1 / -0.08) = 1.29x the compute
    assert out["lo"] < 0.98 ** (1 / -0.08) < out["hi"]


def test_a_flat_baseline_gives_no_interval_and_says_why():
    rng = np.random.default_rng(3)
    base = _points(3.0, -0.002, [1e15, 3e15, 1e16, 3e16], 0.02, 3, rng)  # noise >> the trend
    out = stats.equivalence_interval([2.6, 2.61, 2.59], 1e16, base)
    assert out["lo"] is None and out["hi"] is None and "unbounded" in out["reason"]
    assert out["share_of_draws_with_b_at_least_0"] > 0.05


def test_best_rate_and_the_edge():
    assert stats.best_rate({1e-3: [3.0, 3.2], 2e-3: [2.9, 3.0], 4e-3: [3.1]}) == {
        "best": 2e-3, "means": {1e-3: 3.1, 2e-3: 2.95, 4e-3: 3.1}, "at_edge": False, "points": 3}
    assert stats.best_rate({1e-3: [3.0], 2e-3: [2.9], 4e-3: [2.8]})["at_edge"]
    assert not math.isnan(stats.best_rate({1e-3: [3.0]})["best"])


def test_rates_with_different_seeds_are_compared_on_the_seeds_they_share():
    # the study's m (session 22): x1 at seeds 0-2 (3.8164, 3.8603, 3.9004: mean 3.859), x2 at seed 0
    # only (3.8493): all-seed means would pick x2 although x1 is better at the one seed both have
    m = {1.5e-3: {0: 3.8164, 1: 3.8603, 2: 3.9004}, 3e-3: {0: 3.8493}, 7.5e-4: {0: 4.0075}}
    out = stats.best_rate(m)
    assert out["best"] == 1.5e-3 and out["compared_on"] == [0] and not out["at_edge"]
    assert out["means"][1.5e-3] == pytest.approx(3.859033, abs=1e-6)
    assert stats.best_rate({lr: list(v.values()) for lr, v in m.items()})["best"] == 3e-3  # lists: all seeds
    same = stats.best_rate({1e-3: {0: 3.0, 1: 3.2}, 2e-3: {0: 2.9, 1: 3.0}})
    assert same["best"] == 2e-3 and "compared_on" not in same  # nothing to match
    with pytest.raises(ValueError):
        stats.best_rate({})


def test_tagged_groups_and_the_lr_sweep_table():
    from benchmarks.study.analyze import group, lr_sweep

    def run(rid, lr, loss, status="complete"):
        model, residual, seed = rid.split("-")[:3]
        return {"run_id": rid, "model": model, "residual": residual, "seed": int(seed.removeprefix("seed")),
                "status": status, "val_loss": loss, "config": {"model": {"lr": lr}}}

    runs = [run("s-standard-seed0", 2e-3, 3.0),  # untagged: not in the pk family
            run("s-standard-seed0-pk", 2e-3, 2.8), run("s-standard-seed1-pk", 2e-3, 2.9),
            run("s-standard-seed0-pk-lr0.5", 1e-3, 2.95), run("s-standard-seed0-pk-lr2", 4e-3, 2.7),
            run("s-standard-seed0-pk-lr4", 8e-3, 2.6, status="running")]  # incomplete: left out
    tagged = [r["run_id"] for r in group(runs, "pk")[("s", "standard")]]
    assert tagged == ["s-standard-seed0-pk", "s-standard-seed1-pk"]
    assert [r["run_id"] for r in group(runs)[("s", "standard")]] == ["s-standard-seed0"]
    table = lr_sweep(runs, "pk")
    row = next(line for line in table if line.startswith("| s |"))
    assert "0.001: 2.9500" in row and "0.002: 2.8500 ± 0.0707" in row and "0.004: 2.7000" in row
    assert row.endswith("| 0.004 | yes: extend the sweep |") and "0.008" not in row


def test_difference_interval_is_the_mean_difference_and_brackets_it():
    base, other = [3.0, 3.1, 3.2], [2.9, 2.95, 3.0]
    d = stats.difference_interval(base, other)
    assert d["diff"] == pytest.approx(2.95 - 3.1, abs=1e-12) and d["seeds"] == [3, 3]
    # the extremes a draw can reach: every resample of other at its min/max minus base at its max/min
    assert -0.3 - 1e-12 <= d["lo"] < d["diff"] < d["hi"] <= 0.1 + 1e-12
    one = stats.difference_interval([3.0], [2.5])
    assert one["lo"] == one["hi"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="at least one loss"):
        stats.difference_interval([], [1.0])


def test_the_audit_table_and_figure(tmp_path):
    from benchmarks.study.analyze import audit

    def study(model, residual, seed, loss):
        return {"run_id": f"{model}-{residual}-seed{seed}-pk", "model": model, "residual": residual,
                "seed": seed, "status": "complete", "val_loss": loss, "tokens_per_s": 100.0, "tokens": 64,
                "val_curve": [[64, 1, loss + 1], [128, 2, loss]],
                "final_stats": {"hidden_rms": [1.0, 5.0, 10.0 + seed]}}  # grows 10, 11, 12x

    def ref(model, residual, seed, loss, blocks=8, tag="-pk", arch="reference", shards="pk"):
        mode = residual + (str(blocks) if residual == "block" else "")
        return {"kind": "baseline-audit", "status": "complete", "arch": arch, "model": model,
                "residual": residual, "num_blocks": blocks, "seed": seed, "final_val_loss": loss,
                "run_id": f"{model}-{arch}-{mode}-seed{seed}{tag}", "tokens_per_s": 200.0, "tokens": 64,
                "val_curve": [[64, 1, loss + 1], [128, 2, loss]],
                "hidden_rms": [2.0, 4.0] if arch == "reference" else None,
                "settings": {"data": {"shards_dir": shards, "seq_len": 8, "seed": seed}}}

    runs = [study("s", "standard", k, 3.0 + 0.1 * k) for k in range(3)] + [study("s", "block8", 0, 2.9)]
    audits = ([ref("s", "plain", k, 2.8 + 0.1 * k) for k in range(3)] + [ref("s", "block", 0, 2.7)]
              + [ref("s", "plain", 5, 1.0, tag="")]  # another tag: left out
              # audit.py's own project runs, tagged i04 (an ablation): compared with their own standard
              + [ref("s", "standard", k, 2.6 + 0.1 * k, tag="-pk-i04", arch="project") for k in range(2)]
              + [ref("s", "block", k, 2.5 + 0.1 * k, tag="-pk-i04", arch="project") for k in range(2)]
              + [ref("s", "standard", 0, 1.0, tag="-pk-x", arch="project", shards="other")])  # other data
    lines = audit(runs, audits, "pk", tmp_path)
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| s |")}
    assert rows["project standard"].endswith("| 3 | 64 | 3.1000 ± 0.1000 | – | 100 | 11.0 |")
    assert rows["reference (litgpt GPT)"].endswith("| 200 | 2.0 |")
    assert "| 3 | 64 | 2.9000 ± 0.1000 | -0.2000 [" in rows["reference (litgpt GPT)"]
    assert "| 1 | 64 | 2.7000 | -0.4000 [" in rows["reference + Block N=8"]
    assert "| 1 | 64 | 2.9000 | -0.2000 [" in rows["project Block N=8"]
    assert rows["project standard [audit.py i04]"].endswith("| 2 | 64 | 2.6500 ± 0.0707 | – | 200 | – |")
    assert "| 2 | 64 | 2.5500 ± 0.0707 | -0.1000 [" in rows["project Block N=8 [audit.py i04]"]
    assert not any("audit.py x" in name for name in rows)
    assert (tmp_path / "audit.png").is_file()
    assert audit(runs, [], "pk", tmp_path) == []


def test_each_mode_is_taken_at_its_own_best_rate():
    from benchmarks.study.analyze import best_rate_groups

    def run(residual, seed, tag, lr, loss, model="s"):
        return {"run_id": f"{model}-{residual}-seed{seed}-{tag}", "model": model, "residual": residual,
                "seed": seed, "status": "complete", "val_loss": loss, "config": {"model": {"lr": lr}}}

    runs = ([run("standard", k, "pk", 2e-3, 3.0 + 0.1 * k) for k in range(3)]        # mean 3.1
            + [run("standard", 0, "pk-lr2", 4e-3, 3.05), run("standard", 0, "pk-lr0.5", 1e-3, 3.4)]
            + [run("block8", 0, "pk", 2e-3, 2.8), run("block8", 1, "pk", 2e-3, 2.9)]  # mean 2.85: its best
            + [run("block8", 0, "pk-lr2", 4e-3, 2.95), run("block8", 0, "pk-lr0.5", 1e-3, 3.3)]
            + [run("block8", 0, "pk-x", 4e-3, 1.0)]  # another tag (not an LR point of pk): left out
            + [run("standard", 0, "pk", 2e-3, 4.0, model="xs")])  # a smaller size: its rows come first
    groups, lines = best_rate_groups(runs, "pk")
    # x2's one seed (3.05) beats x1's three-seed mean (3.1), but not x1 at the seed both have (3.0)
    assert [r["val_loss"] for r in groups[("s", "standard")]] == [3.0, 3.1, 3.2]
    assert [r["val_loss"] for r in groups[("s", "block8")]] == [2.8, 2.9]
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| s |")}
    assert rows["standard"] == "| s | standard | 0.002 | 3 | 3 | 3.1000 ± 0.1000 | – |"
    assert rows["Block N=8"].startswith("| s | Block N=8 | 0.002 | 3 | 2 | 2.8500 ± 0.0707 | -0.2500 [")
    sizes = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert sizes == ["| xs", "| s", "| s"]  # sizes in the study's order (xs, s, m, l), not by name
    assert best_rate_groups(runs, "other") == ({}, [])


def test_the_audit_at_each_models_best_rate(tmp_path):
    from benchmarks.study.analyze import audit_best_rates, lr_sweep_figure, rated_runs

    def study(residual, seed, tag, lr, loss, hidden=None):
        return {"run_id": f"s-{residual}-seed{seed}-{tag}", "model": "s", "residual": residual, "seed": seed,
                "status": "complete", "val_loss": loss, "config": {"model": {"lr": lr}},
                "final_stats": {"hidden_rms": hidden}}

    def ref(residual, seed, tag, lr, loss, blocks=8, hidden=None):
        mode = residual + (str(blocks) if residual == "block" else "")
        return {"kind": "baseline-audit", "status": "complete", "arch": "reference", "model": "s",
                "residual": residual, "num_blocks": blocks, "seed": seed, "final_val_loss": loss,
                "run_id": f"s-reference-{mode}-seed{seed}-{tag}", "settings": {"lr": lr},
                "hidden_rms": hidden}

    runs = ([study("standard", k, "pk", 2e-3, 3.0 + 0.1 * k) for k in range(3)]       # mean 3.1
            + [study("standard", k, "pk-lr2", 4e-3, 2.9 + 0.1 * k, [1.0, 2.0, 10.0 + 10 * k])
               for k in range(2)]
            + [study("standard", 0, "pk-lr4", 8e-3, 3.2), study("block8", 0, "pk", 2e-3, 2.7)])
    # best rates: the standard model's 4e-3 (mean 2.95; hidden RMS grows 10x and 20x), the reference's 2e-3
    # (mean 3.1; one seed recorded a growth of 4x)
    audits = ([ref("plain", k, "pk", 2e-3, 3.0 + 0.1 * k, hidden=[0.5, 2.0] if k == 1 else None)
               for k in range(3)]
              + [ref("plain", 0, "pk-lr2", 4e-3, 3.3), ref("block", 0, "pk", 2e-3, 2.9)]
              + [ref("plain", 0, "other", 4e-3, 1.0)])  # another tag: left out
    # the reference at one rate only: nothing to add to the audit table
    one_rate = [a for a in audits if "lr2" not in a["run_id"]]
    assert audit_best_rates(rated_runs(runs, one_rate, "pk"), "pk") == []
    lines = audit_best_rates(rated_runs(runs, audits, "pk"), "pk")
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| s |")}
    assert rows["project standard"] == "| s | project standard | 0.004 | 3 | 2 | 2.9500 ± 0.0707 | – | 15.0 |"
    assert rows["project Block N=8"].startswith(
        "| s | project Block N=8 | 0.002 | 1 | 1 | 2.7000 | -0.2500 [")
    assert rows["reference (litgpt GPT)"].startswith(
        "| s | reference (litgpt GPT) | 0.002 (edge) | 2 | 3 | 3.1000 ± 0.1000 | +0.1500 [")
    assert rows["reference (litgpt GPT)"].endswith("] | 4.0 |")
    # the same runs as a figure: one panel (size s has a sweep), written; no sweep anywhere: no figure
    rated = rated_runs(runs, audits, "pk")
    assert sorted(rated[("s", "study", "standard")]) == [2e-3, 4e-3, 8e-3]
    assert [r["loss"] for r in rated[("s", "audit", "plain")][4e-3]] == [3.3]
    path = lr_sweep_figure(rated, tmp_path)
    assert path == tmp_path / "lr_sweep.png" and path.stat().st_size > 1000
    assert lr_sweep_figure(rated_runs(runs[:3], [], "pk"), tmp_path / "none") is None
    assert rows["project Block N=8"].endswith("] | – |")
    assert rows["reference + Block N=8"].startswith(
        "| s | reference + Block N=8 | 0.002 | 1 | 1 | 2.9000 | -0.0500 [")
