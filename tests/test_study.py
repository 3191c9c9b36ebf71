"""The study pipeline (benchmarks/study) at CPU scale: the runner on a micro sweep (a tiny model, 4
steps, 2 runs, one of them cut and resumed), the analysis on its output, and the maths of the
analysis (power-law fit, compute-equivalence ratio) on synthetic numbers with known answers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.study import analyze, run

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [
    "abc.py",
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "heapq.py",
    "keyword.py",
    "fnmatch.py",
    "glob.py",
    "linecache.py",
    "queue.py",
]


def micro_plan(tmp: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    for name in FILES:
        shutil.copy(STDLIB / name, data / name)
    plan = {
        "configs": ["configs/default.yaml"],
        "steps": 4,
        "batch_size": 2,
        "seq_len": 32,
        "args": [
            "--data.corpus=files",
            f'--data.files=["{data}/*.py"]',
            "--data.val_fraction=0.2",
            f"--data.cache_dir={tmp / 'cache'}",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--checkpoint.every_n_train_steps=2",
            "--plots.every_n_steps=2",
            "--plots.plots=false",
            "--progress_bar=tqdm",
            "--trainer.enable_progress_bar=false",
            "--model.warmup_steps=1",
            "--trainer.logger=true",
        ],
        "models": {"tiny": "configs/model/tiny.yaml"},
        "residuals": {"standard": {"residual": "standard"}, "block4": {"residual": "block", "num_blocks": 4}},
        "sweeps": {"micro": {"grid": [{"model": ["tiny"], "residual": ["standard", "block4"], "seed": [3]}]}},
    }
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_study_plan_expands_to_valid_runs():
    plan = run.load_plan(ROOT / "configs/study/sweeps.yaml")
    ids = {s: [r.id for r in run.expand(plan, s)] for s in plan["sweeps"]}
    assert ids["seeds"] == [f"s-{m}-seed{k}" for m in ("standard", "block8", "full") for k in (0, 1)]
    assert set(ids["seeds"]) <= set(ids["scaling"]) and "m-block8-seed0" in ids["ablation"]
    assert "m-block8-seed0" in ids["depth_width"] and all(i.endswith("-probe") for i in ids["probe"])
    assert all(r.tokens == 512 * 32 * 1024 for r in run.expand(plan, "scaling"))
    for sweep in plan["sweeps"]:  # every run's model config passes the start-up checks (e.g. N | depth)
        for r in run.expand(plan, sweep):
            config = run.model_config(plan, r.model, r.model_args)
            assert config.residual == r.model_args["residual"] and config.max_seq_len >= r.seq_len
            if config.residual == "block":
                assert config.num_blocks == r.model_args["num_blocks"]
    assert "| m | 16 | 384 |" in run.describe(ROOT / "configs/study/sweeps.yaml")


def test_package_corpus_sweeps_compose_the_data_config_and_scale_each_models_lr():
    plan = run.load_plan(ROOT / "configs/study/sweeps.yaml")
    lrs = {}
    for sweep, scale in (("pk_lr0.5", 0.5), ("pk", 1.0), ("pk_lr2", 2.0)):
        for r in run.expand(plan, sweep):
            assert r.configs == [*plan["configs"], "configs/data/packages.yaml", plan["models"][r.model]]
            argv = run.fit_argv(r, Path("/tmp/w"))
            lr = float(next(a for a in argv if a.startswith("--model.lr=")).split("=")[1])
            file_lr = yaml.safe_load((ROOT / plan["models"][r.model]).read_text())["model"]["lr"]
            assert lr == pytest.approx(file_lr * scale)
            assert argv.index("configs/data/packages.yaml") < argv.index(plan["models"][r.model])
            lrs.setdefault(r.id.split("-pk")[0], []).append(lr)
    # three log-spaced points per (size, mode) of xs, s and m: x0.5, x1, x2 of the model file's rate
    assert len(lrs) == 9 and all(v[1] / v[0] == pytest.approx(2) and v[2] / v[1] == pytest.approx(2)
                                 for v in lrs.values())


def test_runner_and_analysis_on_a_micro_sweep(tmp_path, monkeypatch):
    from lightning_modules import warmup

    prepared = []  # the statistics pass pins fla's untuned kernels first, as `attnres fit` does
    monkeypatch.setattr(warmup, "prepare_kda_autotune", lambda device: prepared.append(device.type))
    plan_path = micro_plan(tmp_path)
    results, work, figs = tmp_path / "results", tmp_path / "work", tmp_path / "figs"
    runs = run.expand(run.load_plan(plan_path), "micro")
    assert [r.id for r in runs] == ["tiny-standard-seed3", "tiny-block4-seed3"]

    # a run cut after 2 of its 4 steps (as the device's time limit would): the runner resumes it
    argv = run.fit_argv(runs[0], work)
    argv[argv.index("--trainer.max_steps") + 1] = "2"
    subprocess.run([sys.executable, "-m", "lightning_modules", *argv], cwd=ROOT, check=True,
                   capture_output=True)
    assert run.checkpoint_step(run.last_checkpoint(work, runs[0].id)) == 2

    records = run.run_sweep(  # both runs at once (the device shares its GPU the same way)
        plan_path,
        "micro",
        results=results,
        work=work,
        budget_s=300,
        device="cpu",
        log_dir=tmp_path / "logs",
        parallel=2,
    )
    assert [r["run_id"] for r in records] == [r.id for r in runs]
    assert prepared == ["cpu", "cpu"]  # once per run's statistics
    for rec, r in zip(records, runs, strict=True):
        saved = json.loads((results / f"{r.id}.json").read_text())
        assert saved["status"] == "complete" and saved["steps"] == 4 and saved["seed"] == 3
        assert saved["tokens"] == 4 * 2 * 32 and saved["compute_flops"] == saved["flops_per_token"] * 256
        assert saved["device"]["device"] == "cpu" and saved["device"]["torch"]
        residual = saved["config"]["model"]["config"]["residual"]
        assert residual == ("standard" if "standard" in r.id else "block")
        assert saved["config"]["seed_everything"] == 3 and saved["config"]["data"]["seed"] == 3
        assert [p[0] for p in saved["val_curve"]] == [2, 4] and saved["val_loss"] == saved["val_curve"][-1][2]
        assert math.isfinite(saved["val_loss"]) and saved["wall_s"] > 0
        stats = saved["final_stats"]
        assert len(stats["output_rms"]) == 8 and len(stats["hidden_rms"]) == 9
        assert len(stats["grad_norms"]) == 8 and all(g > 0 for g in stats["grad_norms"].values())
        assert (results / f"{r.id}.json").stat().st_size < 16 * 2**20
        assert rec["val_loss"] == saved["val_loss"]
    resumed = json.loads((results / f"{runs[0].id}.json").read_text())["invocations"]
    assert len(resumed) == 1 and resumed[0]["resumed_from"].endswith("last.ckpt")
    block = json.loads((results / f"{runs[1].id}.json").read_text())["final_stats"]["depth_attention"]
    assert len(block[0]) == 9  # 8 sublayers + the read-out; each column sums to 1 over its sources
    for c in range(9):
        assert sum(row[c] for row in block if row[c] is not None) == pytest.approx(1.0, abs=1e-4)
    assert json.loads((results / f"{runs[1].id}.json").read_text())["invocations"][0]["concurrent"] == 2
    # the device replaces the tree between calls: a complete run's copy in its run directory is restored
    saved0 = (results / f"{runs[0].id}.json").read_text()
    (results / f"{runs[0].id}.json").unlink()
    assert run.run_sweep(plan_path, "micro", results=results, work=work, budget_s=60, device="cpu") == []
    assert (results / f"{runs[0].id}.json").read_text() == saved0
    walls = [json.loads((results / f"{r.id}.json").read_text())["wall_s"] for r in runs]
    assert run._expected_wall(results, runs[1]) == walls[1]  # what the runner budgets for a rerun

    # a synthetic third size with a known law lets the analysis draw every figure from these records
    base = json.loads((results / f"{runs[0].id}.json").read_text())
    for model, c in (("syn0", 1e15), ("syn1", 4e15)):
        for mode in ("standard", "block4"):
            fake = dict(
                base,
                run_id=f"{model}-{mode}-seed3",
                model=model,
                residual=mode,
                compute_flops=c,
                val_loss=2.0 * c**-0.05 * (0.98 if mode == "block4" else 1.0),
            )
            (results / f"{fake['run_id']}.json").write_text(json.dumps(fake))
    # a learning-rate check of the standard run at twice its rate (a tagged run: not in the fits)
    cfg = json.loads(json.dumps(base["config"]))
    cfg["model"]["lr"] = 2 * base["config"]["model"]["lr"]
    tagged = dict(base, run_id=f"{runs[0].id}-lr2x", config=cfg, val_loss=9.5)
    (results / f"{tagged['run_id']}.json").write_text(json.dumps(tagged))
    # and at half its rate, cut after step 2: compared with the others at step 2, their last common one
    cfg = json.loads(json.dumps(base["config"]))
    cfg["model"]["lr"] = base["config"]["model"]["lr"] / 2
    cut = dict(base, run_id=f"{runs[0].id}-lr0.5x", config=cfg, status="partial", steps=2)
    cut["val_curve"] = [[2, 128, 9.7]]
    (results / f"{cut['run_id']}.json").write_text(json.dumps(cut))
    lay = analyze.Layout(
        scaling_models=("syn0", "syn1"),
        scaling_modes=("standard", "block4"),
        ablation_model="tiny",
        ablation_modes=("block4",),
        depth_width_models=("tiny",),
        depth_width_modes=("standard", "block4"),
    )
    out = analyze.analyze(results, figs, lay)
    assert out["fits"]["standard"] == pytest.approx((2.0, -0.05), rel=1e-9)
    for name in (
        "scaling.png",
        "val_curves.png",
        "ablation.png",
        "dynamics.png",
        "depth_width.png",
        "heatmaps.png",
        "lr_check.png",
    ):
        assert (figs / name).stat().st_size > 5000, name
    tables = (figs / "tables.md").read_text()
    ratio = 0.98 ** (1 / -0.05)  # block4 = standard at 0.98**(1/b) times the compute
    assert f"{ratio:.3f}" in tables and "tiny-block4-seed3" in tables
    assert "python -m lightning_modules fit" in tables
    lr = base["config"]["model"]["lr"]
    at2, final = base["val_curve"][0][2], base["val_loss"]
    assert f"| tiny | standard | {lr / 2:g} | 3 | partial | 2 | – | 9.7000 | 2 |" in tables
    assert f"| tiny | standard | {lr:g} | 3 | complete | 4 | {final:.4f} | {at2:.4f} | 2 |" in tables
    assert f"| tiny | standard | {2 * lr:g} | 3 | complete | 4 | 9.5000 | {at2:.4f} | 2 |" in tables


def test_scaling_fits_every_mode_on_the_sizes_every_mode_has(tmp_path):
    """A size only one mode has (xs at one rate, say) stays in the table and out of the laws: laws over
    different sizes do not compare, and the compute-equivalence uses the shared sizes only."""

    def rec(model, mode, c, loss):
        return dict(model=model, residual=mode, compute_flops=c, val_loss=loss, num_layers=2, dim=8,
                    params=1e6, active_params=5e5, tokens_per_s=1.0, wall_s=1.0)

    laws = {"standard": 1.0, "block4": 0.98}
    groups = {(m, mode): [rec(m, mode, c, 2.0 * c**-0.05 * k)]
              for m, c in (("syn0", 1e15), ("syn1", 4e15)) for mode, k in laws.items()}
    groups[("syn2", "block4")] = [rec("syn2", "block4", 1.6e16, 9.0)]  # far off the law
    lay = analyze.Layout(scaling_models=("syn0", "syn1", "syn2"), scaling_modes=("standard", "block4"))
    lines, fits = analyze.scaling(groups, tmp_path, lay)
    assert fits["standard"] == pytest.approx((2.0, -0.05), rel=1e-9)
    assert fits["block4"] == pytest.approx((2.0 * 0.98, -0.05), rel=1e-9)
    text = "\n".join(lines)
    assert "Not in the fits (sizes not every mode has): syn2 (Block N=4)." in text
    assert "| syn2 | 2 × 8 |" in text  # still in the loss table
    assert f"{0.98 ** (1 / -0.05):.3f}" in text and "syn2, measured" not in text
    assert "fixed-data law" not in text  # records without token counts: no claim about the budget


def test_a_ratio_from_sizes_of_one_token_budget_carries_the_fixed_data_caveat(tmp_path):
    def rec(model, mode, c, loss, tokens, active):
        return dict(model=model, residual=mode, compute_flops=c, val_loss=loss, num_layers=2, dim=8,
                    params=2 * active, active_params=active, tokens=tokens, tokens_per_s=1.0, wall_s=1.0)

    lay = analyze.Layout(scaling_models=("syn0", "syn1"), scaling_modes=("standard", "block4"))
    for tokens1, caveat in ((1_000_000, True), (4_000_000, False)):
        groups = {(m, mode): [rec(m, mode, c, 2.0 * c**-0.02 * k, tok, act)]
                  for m, c, tok, act in (("syn0", 1e15, 1_000_000, 2e5), ("syn1", 4e15, tokens1, 8e5))
                  for mode, k in (("standard", 1.0), ("block4", 0.95))}
        text = "\n".join(analyze.scaling(groups, tmp_path, lay)[0])
        head = "Every size trained on the same 1,000,000 tokens (5 down to 1.2 per active parameter"
        assert (head in text) is caveat
        assert ("the standard law (b = -0.0200) is a fixed-data law" in text) is caveat


def test_power_law_fit_recovers_known_coefficients():
    c = np.geomspace(1e17, 1e21, 7)
    for a, b in [(1.891, -0.057), (1.870, -0.058), (12.0, -0.3)]:
        assert analyze.fit_power_law(c, a * c**b) == pytest.approx((a, b), rel=1e-9)
    with pytest.raises(ValueError, match="two or more"):
        analyze.fit_power_law([1e18, 1e18], [2.0, 2.0])


def test_compute_equivalence_recovers_the_compute_multiplier():
    # a variant whose loss at C is the baseline's loss at k*C is worth k times the compute, at every C
    a, b, k = 1.891, -0.057, 1.25
    for c in (1e17, 1e19, 1e21):
        assert analyze.compute_equivalence(a * (k * c) ** b, c, (a, b)) == pytest.approx(k, rel=1e-9)
    # the paper's fitted laws, Block 1.870 C^-0.058 vs baseline 1.891 C^-0.057, at C = 1 of the paper's
    # compute unit: (1.870 / 1.891) ** (1 / -0.057) = 1.217 (the ratio moves with C as the exponents differ)
    assert analyze.compute_equivalence(1.870, 1.0, (1.891, -0.057)) == pytest.approx(1.2164, abs=1e-4)
    # the ratio at a given physical compute does not depend on the unit the laws are fitted in
    c = np.geomspace(1e15, 1e17, 3)
    fit_flops = analyze.fit_power_law(c, 1.891 * (c / 1e15) ** -0.057)
    fit_units = analyze.fit_power_law(c / 1e15, 1.891 * (c / 1e15) ** -0.057)
    loss = 1.870 * (2e16 / 1e15) ** -0.058
    assert analyze.compute_equivalence(loss, 2e16, fit_flops) == pytest.approx(
        analyze.compute_equivalence(loss, 20.0, fit_units), rel=1e-6
    )


def test_concurrent_runs_fit_the_memory_budget(tmp_path, monkeypatch):
    """The scheduler starts runs while the plan's memory_gb of the running ones fits, in plan order,
    letting a smaller later run go first; every run of the sweep gets its turn."""
    plan = yaml.safe_load(micro_plan(tmp_path).read_text())
    plan["models"] = {"big": "configs/model/tiny.yaml", "small": "configs/model/tiny.yaml"}
    plan["memory_gb"] = {"big": 20, "small": 5}
    plan["sweeps"]["micro"]["grid"] = [{"model": ["big", "small"], "residual": ["standard"], "seed": [0, 1]}]
    path = tmp_path / "plan2.yaml"
    path.write_text(yaml.safe_dump(plan))
    events, active = [], {}

    def fake_run(run_, work, results, deadline, device, sweep, log_dir, concurrent, lock, start_all):
        active[run_.id] = plan["memory_gb"][run_.model]
        events.append((run_.id, sum(active.values()), concurrent))
        time.sleep(0.2)
        del active[run_.id]

    monkeypatch.setattr(run, "_one_run", fake_run)
    run.run_sweep(
        path, "micro", results=tmp_path / "r", work=tmp_path / "w", device="cpu", parallel=3, memory_gb=27
    )
    assert sorted(e[0] for e in events) == sorted(
        f"{m}-standard-seed{k}" for m in ("big", "small") for k in (0, 1)
    )
    assert max(e[1] for e in events) <= 27 and max(e[2] for e in events) >= 2
    ids = [e[0] for e in events]  # big-seed1 does not fit next to big-seed0: small-seed0 goes first
    assert ids.index("small-standard-seed0") < ids.index("big-standard-seed1")


def test_runs_start_in_the_order_given(tmp_path, monkeypatch):
    """``only`` (``--runs``) picks runs and sets their start order (longest first packs a call best)."""
    plan = yaml.safe_load(micro_plan(tmp_path).read_text())
    plan["sweeps"]["micro"]["grid"] = [{"model": ["tiny"], "residual": ["standard"], "seed": [0, 1, 2]}]
    path = tmp_path / "plan3.yaml"
    path.write_text(yaml.safe_dump(plan))
    started = []
    monkeypatch.setattr(run, "_one_run", lambda run_, *a: started.append(run_.id))
    only = ["tiny-standard-seed2", "tiny-standard-seed0"]
    run.run_sweep(path, "micro", only, results=tmp_path / "r", work=tmp_path / "w", device="cpu")
    assert started == only
    with pytest.raises(ValueError, match="not in sweep"):
        run.run_sweep(path, "micro", ["tiny-standard-seed9"], results=tmp_path / "r", work=tmp_path / "w")
