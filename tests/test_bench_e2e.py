"""The end-to-end benchmark (``attnres.bench.e2e``): its quick CPU mode runs and writes well-formed JSON
with positive, finite numbers (no timing assertions), and its pieces compute what they claim."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from attnres import ops
from attnres.bench import e2e
from attnres.model import Decoder

ROW_STATUSES = {"ok", "oom", "error", "skipped"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and a loaded CI machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive_finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_with_every_row_and_positive_finite_numbers(tmp_path):
    path = tmp_path / "e2e_cpu.json"
    result = e2e.run_e2e_benchmark(
        quick=True, shapes=["dense", "medium"], kinds=["train", "prefill", "decode"],
        variants=["eager"], warmup=1, repeat=1, profile=False, device="cpu", out=path,
    )
    data = json.loads(path.read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("device", "versions", "command", "settings", "shapes", "residual_traffic", "ceilings"):
        assert key in data, key
    assert data["versions"]["torch"] == torch.__version__
    ceilings = data["ceilings"]
    assert _positive_finite(ceilings["matmul_tflops"]) and _positive_finite(ceilings["copy_gbps"])

    rows = data["rows"]
    assert {r["status"] for r in rows} <= ROW_STATUSES
    assert not [r for r in rows if r["status"] in ("error", "oom")], [r for r in rows if r["status"] != "ok"]
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"]
            continue
        assert _positive_finite(r["ms"]) and _positive_finite(r["tokens_per_s"]), r
        assert all(_positive_finite(t) for t in r["ms_samples"]), r
    # every shape x mode has its training rows (both optimizers), prefill and decode (both batches)
    for shape in ("dense", "medium"):
        for mode in e2e.MODES:
            got = {(r["kind"], r.get("optimizer"), r.get("batch")) for r in rows if r["status"] == "ok"
                   and r["shape"] == shape and r["mode"] == mode and r["impl"] == "attnres"}
            assert {("train", "none", 2), ("train", "adamw", 2), ("prefill", None, 1), ("decode", None, 1),
                    ("decode", None, 4)} <= got, (shape, mode, got)
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    assert all(r["source_bytes"] > 0 for r in train if r["mode"] != "standard")
    assert all(r["source_bytes"] == 0 for r in train if r["mode"] == "standard")
    # fla needs CUDA: its rows are there, skipped with the reason
    fla_rows = [r for r in rows if r["impl"] == "fla"]
    assert fla_rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in fla_rows)

    whats = {(q["kind"], q["shape"], q["what"]) for q in data["ratios"]}
    for shape in ("dense", "medium"):
        assert {("train", shape, "block/standard"), ("train", shape, "full/standard"),
                ("decode", shape, "block/standard")} <= whats
    assert all(_positive_finite(q["time_ratio"]) for q in data["ratios"])
    if any(r["kind"] == "template" and r["status"] == "ok" for r in rows):
        assert ("template", "dense", "template/hand-written") in whats
    assert "ratios (same run)" in e2e.format_table(data)

    merged = e2e.merge_results([path], tmp_path / "merged.json")
    assert json.loads((tmp_path / "merged.json").read_text())["rows"] == merged["rows"]
    assert len(merged["rows"]) == len(rows) and {r["run"] for r in merged["rows"]} == {"e2e_cpu"}
    assert merged["runs"][0]["command"] == data["command"] and len(merged["ratios"]) == len(data["ratios"])


def _naive_fla_attnres(
    query: torch.Tensor, residuals: Sequence[torch.Tensor], rms_weight: torch.Tensor, rms_eps: float = 1e-6,
) -> torch.Tensor:
    """fla-core 0.6.0's ``naive_attnres`` (its reference for ``fused_attnres``), transcribed."""
    d = residuals[0].shape[-1]
    v = torch.stack([r.reshape(-1, d) for r in residuals]).float()
    k = F.rms_norm(v, (d,), rms_weight.float(), rms_eps)
    p = torch.einsum("l...d,d->l...", k, query.float()).softmax(0)
    return torch.einsum("l...,l...d->...d", p, v).view(residuals[0].shape).to(residuals[0].dtype)


@pytest.mark.parametrize("mode", ["block", "full"])
def test_fla_residual_computes_the_same_loss_and_gradients_as_ours(mode):
    cfg = e2e.default_shapes(quick=True)["dense"].config.replace(residual=mode)
    torch.manual_seed(0)
    ours = Decoder(cfg).double()
    with torch.no_grad():  # non-zero pseudo-queries, so the softmax is not uniform
        for q in ours.residual.queries.values():
            q.weight.normal_()
            q.norm_weight.uniform_(0.5, 1.5)
    theirs = Decoder(cfg).double()
    theirs.load_state_dict(ours.state_dict())
    e2e.use_fla_residual(theirs, attnres_fn=_naive_fla_attnres)
    assert isinstance(theirs.residual, e2e.FlaResidual)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    ga = ours.residual.queries["3"].weight.grad
    gb = theirs.residual.queries["3"].weight.grad
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("mode", ["standard", "block", "full"])
def test_residual_traffic_counts_the_depth_ops_the_residual_path_calls(mode, monkeypatch):
    cfg = e2e.default_shapes(quick=True)["dense"].config.replace(residual=mode)
    counts = {"phase1": 0, "phase2": 0, "readout": 0}
    for name, key in (("phase1", "phase1"), ("phase2", "phase2"), ("depth_attention", "readout")):
        fn = getattr(ops, name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    model = Decoder(cfg)
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    expected = e2e.residual_traffic(cfg, 1, 8)["calls_per_forward"]
    if mode == "standard":
        assert counts == {"phase1": 0, "phase2": 0, "readout": 0} and expected == {"add": cfg.num_sublayers}
    else:
        assert counts == {k: expected[k] for k in counts}


def test_dense_config_has_the_parameters_of_the_issues_mha_model():
    d, layers, mlp, vocab = 2048, 16, 5632, 32000
    mha = layers * (4 * d * d + 3 * d * mlp + 2 * d) + 2 * vocab * d + d  # + PreNorms, final norm
    cfg = e2e.dense_config()
    assert cfg.mla_heads == 16 and cfg.mla_qk_nope_dim == 128 and cfg.mla_v_head_dim == 128
    assert abs(cfg.num_params() - mha) / mha < 0.005
    assert cfg.replace(residual="block").num_blocks == 8


def test_quick_template_rows_time_the_lightning_step_and_the_hand_written_one(tmp_path):
    pytest.importorskip("lightning_modules.module")
    result = e2e.run_e2e_benchmark(
        quick=True, shapes=["dense"], kinds=["template"], warmup=1, repeat=2, profile=False, device="cpu",
        out=tmp_path / "e2e_template.json",
    )
    rows = {r["impl"]: r for r in result["rows"]}
    # the template as `attnres fit` runs it, without the NaN guard's gradient check, without callbacks
    assert set(rows) == {"hand-written", "template", "template-nogradcheck", "template-bare"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["variant"] == "eager" and r["precision"] == "bf16-mixed"  # no compile on a CPU by default
        assert _positive_finite(r["ms"]) and _positive_finite(r["tokens_per_s"]) and r["steps"] >= 3
    assert rows["template"]["callbacks"] == ["StepMarks", "NaNGuard", "ThroughputMonitor"]
    assert rows["template"]["nan_guard"] == {} and rows["template-bare"]["callbacks"] == ["StepMarks"]
    assert rows["template-nogradcheck"]["nan_guard"] == {"check_gradients": False}
    for impl in ("template", "template-nogradcheck", "template-bare"):
        (ratio,) = [q for q in result["ratios"] if q["what"] == f"{impl}/hand-written"]
        assert _positive_finite(ratio["time_ratio"])


@pytest.mark.parametrize("name", ["s", "m"])
def test_the_study_shapes_are_the_study_yaml_models(name):
    import yaml

    model = yaml.safe_load((e2e.STUDY_MODELS / f"{name}.yaml").read_text())["model"]
    cfg = e2e.study_config(name)
    assert (cfg.num_layers, cfg.dim, cfg.num_experts, cfg.top_k) == (
        model["num_layers"], model["dim"], model["num_experts"], model["top_k"])
    for key, value in model["overrides"].items():
        if key != "kda_backend":
            assert getattr(cfg, key) == value, key
    assert cfg.kda_backend == "auto" and cfg.vocab_size == 8192
    shapes = e2e.default_shapes(quick=False)
    assert (shapes[name].batch, shapes[name].seq_len) == (32, 1024)
    assert shapes["small"].config.name == "small" and shapes["small"].config.max_seq_len >= 2048
