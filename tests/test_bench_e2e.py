"""The end-to-end benchmark (``attnres.bench.e2e``, the template rows of
``lightning_modules.bench_template``): its quick CPU mode runs and writes well-formed JSON with positive,
finite numbers (no timing assertions), its pieces compute what they claim, and the ratios stored in the
committed results are what :func:`attnres.bench.report.compute_ratios` computes from their rows."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnres import ops
from attnres.bench import e2e, report
from attnres.bench import peers as peer
from attnres.bench import rows as rows_mod
from attnres.bench.shapes import STUDY_MODELS, default_shapes, dense_config, residual_traffic, study_config
from attnres.model import Decoder

ROW_STATUSES = {"ok", "oom", "error", "skipped"}


# tiny models run faster on one thread, and a loaded CI machine does not stall them (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert "ratios (same run)" in report.format_table(data)

    merged = report.merge_results([path], tmp_path / "merged.json")
    assert json.loads((tmp_path / "merged.json").read_text())["rows"] == merged["rows"]
    assert len(merged["rows"]) == len(rows) and {r["run"] for r in merged["rows"]} == {"e2e_cpu"}
    assert merged["runs"][0]["command"] == data["command"] and len(merged["ratios"]) == len(data["ratios"])


def test_quick_packed_rows_train_on_documents_and_give_the_packed_ratio(tmp_path):
    # attnres-packed: the same model and tokens with documents packed into each row (segment ids passed
    # to the decoder, as data.packing: documents does); its rows say how many documents, and each mode
    # has the ratio packed/unpacked
    data = e2e.run_e2e_benchmark(
        quick=True, shapes=["medium"], modes=["standard", "block"], kinds=["train"], variants=["eager"],
        impls=["attnres", "attnres-packed"], warmup=1, repeat=1, profile=False, device="cpu",
        out=tmp_path / "e2e.json",
    )
    assert data["settings"]["batch"] is None
    packed = [r for r in data["rows"] if r["impl"] == "attnres-packed"]
    assert len(packed) == 4 and all(r["status"] == "ok" for r in packed), packed
    batch = packed[0]["batch"]
    assert all(r["documents"]["mean_tokens"] == 8 and r["documents"]["count"] > 2 * batch for r in packed)
    whats = {q["what"] for q in data["ratios"] if q["kind"] == "train"}
    assert {"standard packed/unpacked", "block packed/unpacked", "block/standard"} <= whats
    assert not any("packed" in q["what"] and "/standard" in q["what"] for q in data["ratios"])


def test_quick_fla_plain_rows_build_the_model_with_fla_fused_off(tmp_path, monkeypatch):
    # attnres-fla-plain: our decoder with Config.fla_fused false (on a CPU both run the same plain code:
    # this checks the rows, their config and the ratio, not a speed)
    from attnres.bench import rows

    seen = []
    decoder_init = rows.Decoder.__init__
    monkeypatch.setattr(rows.Decoder, "__init__", lambda self, cfg: seen.append(cfg.fla_fused)
                        or decoder_init(self, cfg))
    data = e2e.run_e2e_benchmark(
        quick=True, shapes=["medium"], modes=["standard"], kinds=["train"], variants=["eager"],
        impls=["attnres", "attnres-fla-plain"], warmup=1, repeat=1, profile=False, device="cpu", out=None,
    )
    assert sorted(seen) == [False, True]
    assert all(r["status"] == "ok" for r in data["rows"] if r["impl"].startswith("attnres"))
    assert "standard fla-fused/fla-plain" in {q["what"] for q in data["ratios"]}


def test_quick_torch_standard_rows_are_the_plain_torch_baseline_of_every_mode(monkeypatch):
    # torch-standard: the standard residual as plain torch code (fla_fused off, every RMSNorm torch's own
    # F.rms_norm); standard rows only; every mode of ours gets a ratio against it
    from attnres.bench import rows

    seen = []  # every model a row builds
    decoder_init = rows.Decoder.__init__
    monkeypatch.setattr(rows.Decoder, "__init__",
                        lambda self, cfg: seen.append(self) or decoder_init(self, cfg))
    data = e2e.run_e2e_benchmark(
        quick=True, shapes=["medium"], modes=["standard", "block"], kinds=["train"], variants=["eager"],
        impls=["attnres", "torch-standard"], warmup=1, repeat=1, profile=False, device="cpu", out=None,
    )
    native = [r for r in data["rows"] if r["impl"] == "torch-standard"]
    assert [(r["mode"], r["optimizer"], r["status"]) for r in native] == [("standard", "none", "ok"),
                                                                          ("standard", "adamw", "ok")]
    kinds = sorted((m.config.fla_fused, sorted({n.backend for n in m.modules()
                                                if isinstance(n, rows.RMSNorm)})) for m in seen)
    # ours: the decoder's norms on fla where it runs (auto), the mixers' inner norms ours (torch)
    assert kinds == [(False, ["native"]), (True, ["auto", "torch"]), (True, ["auto", "torch"])], kinds
    whats = {q["what"]: q for q in data["ratios"] if q["kind"] == "train"}
    assert {"standard/standard(torch-native)", "block/standard(torch-native)"} <= set(whats)
    ours = {(r["mode"], r["optimizer"]): r for r in data["rows"] if r["impl"] == "attnres"}
    base = {r["optimizer"]: r for r in native}
    block = [q for q in data["ratios"] if q["what"] == "block/standard(torch-native)"]
    for q in block:
        assert q["time_ratio"] == ours[("block", q["optimizer"])]["ms"] / base[q["optimizer"]]["ms"]


def test_batch_overrides_every_shapes_training_batch(tmp_path):
    data = e2e.run_e2e_benchmark(
        quick=True, shapes=["medium"], modes=["standard"], kinds=["train"], variants=["eager"],
        impls=["attnres"], batch=3, warmup=1, repeat=1, profile=False, device="cpu", out=None,
    )
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(rows) == 2 and all(r["batch"] == 3 for r in rows) and data["settings"]["batch"] == 3
    assert rows[0]["tokens_per_s"] == pytest.approx(3 * rows[0]["seq_len"] / (rows[0]["ms"] * 1e-3))
    with pytest.raises(ValueError, match="batch=0"):
        e2e.run_e2e_benchmark(quick=True, shapes=["medium"], kinds=["train"], batch=0, device="cpu")


def test_random_documents_cover_each_row_with_exponential_lengths():
    from attnres.bench.rows import random_documents

    seg = random_documents(3, 4096, torch.device("cpu"), mean=512)
    assert seg.shape == (3, 4096) and (seg[:, 0] == 0).all()
    steps = seg.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all()  # ids count up by one at each document start
    counts = (steps == 1).sum(dim=1) + 1
    assert counts.min() >= 4 and counts.max() <= 20  # ~8 per row at a mean of 512
    assert torch.equal(seg, random_documents(3, 4096, torch.device("cpu"), mean=512))  # seeded


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
    cfg = default_shapes(quick=True)["dense"].config.replace(residual=mode)
    torch.manual_seed(0)
    ours = Decoder(cfg).double()
    with torch.no_grad():  # non-zero pseudo-queries, so the softmax is not uniform
        for q in ours.residual.queries.values():
            q.weight.normal_()
            q.norm_weight.uniform_(0.5, 1.5)
    theirs = Decoder(cfg).double()
    theirs.load_state_dict(ours.state_dict())
    peer.use_fla_residual(theirs, attnres_fn=_naive_fla_attnres)
    assert isinstance(theirs.residual, peer.FlaResidual)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    ga = ours.residual.queries["3"].weight.grad
    gb = theirs.residual.queries["3"].weight.grad
    # fla's naive_attnres computes in fp32 (``.float()``) inside the fp64 model: fp32 agreement, 1.8e-5
    # relative here; a key-norm eps 10x off gives 1e-2 (checked), a wrong source more
    assert float((ga - gb).norm() / ga.norm()) < 1e-4
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-5 * float(ga.abs().max()))


@pytest.mark.parametrize("mode", ["standard", "block", "full"])
def test_residual_traffic_counts_the_depth_ops_the_residual_path_calls(mode, monkeypatch):
    cfg = default_shapes(quick=True)["dense"].config.replace(residual=mode)
    counts = {"phase1": 0, "phase2": 0, "readout": 0}
    for name, key in (("phase1", "phase1"), ("phase2", "phase2"), ("depth_attention", "readout")):
        fn = getattr(ops, name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    model = Decoder(cfg)
    model(torch.randint(0, cfg.vocab_size, (1, 8)))
    expected = residual_traffic(cfg, 1, 8)["calls_per_forward"]
    if mode == "standard":
        assert counts == {"phase1": 0, "phase2": 0, "readout": 0} and expected == {"add": cfg.num_sublayers}
    else:
        assert counts == {k: expected[k] for k in counts}


def test_dense_config_has_the_parameters_of_the_issues_mha_model():
    d, layers, mlp, vocab = 2048, 16, 5632, 32000
    mha = layers * (4 * d * d + 3 * d * mlp + 2 * d) + 2 * vocab * d + d  # + PreNorms, final norm
    cfg = dense_config()
    assert cfg.mla_heads == 16 and cfg.mla_qk_nope_dim == 128 and cfg.mla_v_head_dim == 128
    assert abs(cfg.num_params() - mha) / mha < 0.005
    assert cfg.replace(residual="block").num_blocks == 8


def test_quick_template_rows_time_the_lightning_step_and_the_hand_written_one(tmp_path):
    from lightning_modules.bench_template import template_rows

    result = e2e.run_e2e_benchmark(
        quick=True, shapes=["dense"], kinds=["template"], warmup=1, repeat=2, profile=False, device="cpu",
        out=tmp_path / "e2e_template.json", template_rows=template_rows,
    )
    rows = {r["impl"]: r for r in result["rows"]}
    # the template as `attnres fit` runs it on a GPU, the guard deciding on the host, without the guard's
    # gradient check, without callbacks
    assert set(rows) == {"hand-written", "template", "template-sync", "template-nogradcheck", "template-bare"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["variant"] == "eager" and r["precision"] == "bf16-mixed"  # no compile on a CPU by default
        assert _positive_finite(r["ms"]) and _positive_finite(r["tokens_per_s"]) and r["steps"] >= 3
    assert rows["template"]["callbacks"] == ["StepMarks", "NaNGuard", "ThroughputMonitor", "RichLossBar"]
    assert rows["template"]["nan_guard"] == {"defer": True} and rows["template-sync"]["nan_guard"] == {}
    assert rows["template-bare"]["callbacks"] == ["StepMarks"]
    assert rows["template-nogradcheck"]["nan_guard"] == {"check_gradients": False, "defer": True}
    for impl in ("template", "template-sync", "template-nogradcheck", "template-bare"):
        (ratio,) = [q for q in result["ratios"] if q["what"] == f"{impl}/hand-written"]
        assert _positive_finite(ratio["time_ratio"])


@pytest.mark.parametrize("name", ["s", "m"])
def test_the_study_shapes_are_the_study_yaml_models(name):
    import yaml

    model = yaml.safe_load((STUDY_MODELS / f"{name}.yaml").read_text())["model"]["config"]
    cfg = study_config(name)
    assert (cfg.num_layers, cfg.dim, cfg.num_experts, cfg.top_k) == (
        model["num_layers"], model["dim"], model["num_experts"], model["top_k"])
    for key, value in model.items():
        if key != "kda_backend":
            assert getattr(cfg, key) == value, key
    assert cfg.kda_backend == "auto" and cfg.vocab_size == 8192
    shapes = default_shapes(quick=False)
    assert (shapes[name].batch, shapes[name].seq_len) == (32, 1024)
    assert shapes["small"].config.name == "small" and shapes["small"].config.max_seq_len >= 2048


# ----------------------------------------------------------------------------- fla's KDAForCausalLM peer


def test_kda_dense_maps_to_flas_kda_config_layer_for_layer():
    cfg = default_shapes(quick=False)["kda-dense"].config
    assert cfg.layer_kinds() == [("kda", "dense")] * 16
    for mode, block_size in (("standard", None), ("block", 4), ("full", 1)):
        kw = peer.fla_model_kwargs(cfg.replace(residual=mode))
        shape = (kw["hidden_size"], kw["num_hidden_layers"], kw["num_heads"], kw["head_dim"])
        assert shape == (2048, 16, 16, 128)
        assert (cfg.dim, cfg.num_layers, cfg.kda_heads, cfg.kda_head_dim) == (2048, 16, 16, 128)
        assert kw["expand_v"] == 1.0 and kw["num_v_heads"] is None  # value heads = key heads, V = K (ours)
        assert kw["intermediate_size"] == cfg.mlp_dim == 5632 and kw["hidden_act"] == "swish"
        assert kw["vocab_size"] == cfg.vocab_size == 32000 and kw["tie_word_embeddings"] is False
        assert kw["conv_size"] == cfg.kda_conv_size == 4 and kw["use_short_conv"] is True
        assert kw["attn"] is None and kw["norm_eps"] == cfg.rms_norm_eps
        assert kw["attnres_block_size"] == block_size, mode
    # fla's default KDAConfig (hidden_ratio 4 -> intermediate 5632) at 16 layers is this shape
    defaults = dict(hidden_size=2048, num_hidden_layers=16, num_heads=16, head_dim=128, conv_size=4,
                    vocab_size=32000, hidden_ratio=4)
    assert peer.fla_kda_num_params(defaults) == cfg.num_params() == 970_985_728


@pytest.mark.parametrize("num_layers", [4, 12, 16])
def test_flas_block_size_puts_the_block_boundaries_where_ours_are(num_layers):
    """fla: sublayer j starts a block when j % attnres_block_size == 0 (even, or 1 = Full); ours: blocks of
    num_sublayers / num_blocks sublayers, so every sublayer reads the same sources on both sides."""
    from attnres.model import valid_num_blocks
    from attnres.residual import make_residual

    base = peer.kda_dense_config(dim=64, num_layers=num_layers, heads=2, head_dim=32, mlp_dim=128,
                                 vocab_size=264, chunk_size=16)
    L2 = 2 * num_layers
    for n in valid_num_blocks(L2):
        cfg = base.replace(residual="block", num_blocks=n)
        size = peer.fla_block_size(cfg)
        assert size >= 2 and size % 2 == 0  # fla's validate_attnres_config
        ours = make_residual("block", cfg.dim, L2, n)
        assert [j % size == 0 for j in range(L2)] == [j % ours.block_size == 0 for j in range(L2)], n
        assert L2 // size == n
    assert peer.fla_block_size(base.replace(residual="full")) == 1 == make_residual("full", 64, L2).block_size
    assert peer.fla_block_size(base.replace(residual="standard")) is None


@pytest.mark.parametrize("mode", ["standard", "block", "full"])
def test_our_decoder_at_the_peer_shape_has_flas_analytic_parameter_count(mode):
    quick = default_shapes(quick=True)["kda-dense"].config.replace(residual=mode)
    model = Decoder(quick)
    n = sum(p.numel() for p in model.parameters())
    assert n == quick.num_params() == peer.fla_kda_num_params(peer.fla_model_kwargs(quick))
    full = default_shapes(quick=False)["kda-dense"].config.replace(residual=mode)
    with torch.device("meta"):  # the 0.97B model, counted without memory
        big = Decoder(full)
    n = sum(p.numel() for p in big.parameters())
    assert n == full.num_params() == peer.fla_kda_num_params(peer.fla_model_kwargs(full))
    described = default_shapes(quick=False)["kda-dense"].describe()["fla_model"][mode]
    assert described["params_analytic"] == described["ours_params"] == n
    assert described["kda_config"]["attnres_block_size"] == peer.fla_block_size(full)


def test_peer_shapes_without_a_fla_model_say_why():
    shapes = default_shapes(quick=False)
    assert "MLA" in peer.fla_model_mismatch(shapes["dense"].config)
    assert peer.fla_model_mismatch(shapes["medium"].config)
    assert peer.fla_model_mismatch(shapes["kda-dense"].config) is None
    assert "fla_model" not in shapes["dense"].describe()
    with pytest.raises(ValueError, match="moe"):
        peer.fla_model_kwargs(shapes["kda-dense"].config.replace(moe=True))


def test_quick_run_has_the_fla_model_rows_skipped_with_the_reason_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the fla-model rows run (tests/gpu/test_fla_model_gpu.py)")
    e2e.run_e2e_benchmark(
        quick=True, shapes=["kda-dense", "dense"], modes=["standard", "block"], kinds=["train"],
        variants=["eager"], impls=["attnres", "fla-model"], warmup=1, repeat=1, profile=False, device="cpu",
        out=tmp_path / "e2e_peer.json",
    )
    data = json.loads((tmp_path / "e2e_peer.json").read_text())
    assert data["fla_model"] == {"available": False, "reason": peer.fla_model_status()}
    rows = data["rows"]
    ours = [r for r in rows if r["impl"] == "attnres" and r["shape"] == "kda-dense"]
    assert {(r["mode"], r["optimizer"]) for r in ours if r["status"] == "ok"} == {
        ("standard", "none"), ("standard", "adamw"), ("block", "none"), ("block", "adamw")}
    described = data["shapes"]["kda-dense"]["fla_model"]
    assert all(r["params"] == described[r["mode"]]["ours_params"] for r in ours)
    theirs = [r for r in rows if r["impl"] == "fla-model" and r["shape"] == "kda-dense"]
    assert {(r["mode"], r["optimizer"]) for r in theirs} == {
        ("standard", "none"), ("standard", "adamw"), ("block", "none"), ("block", "adamw")}
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in theirs), theirs
    (other,) = [r for r in rows if r["impl"] == "fla-model" and r["shape"] == "dense"]
    assert other["status"] == "skipped" and "token_mixer=kda" in other["reason"]
    assert described["block"]["kda_config"]["attnres_block_size"] == 2  # quick: 8 sublayers, 4 blocks
    assert "FusedLinearCrossEntropyLoss" in described["note"]


class _FakeKDAForCausalLM(torch.nn.Module):
    """transformers-style stand-in for fla's model on a CPU: ``(input_ids=, labels=, use_cache=) -> .loss``
    (our decoder inside, so the step does real work)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.decoder = Decoder(cfg)

    def forward(self, input_ids, labels=None, use_cache=None):
        assert use_cache is False
        return type("Out", (), {"loss": self.decoder(input_ids, labels=labels).loss})()


def test_fla_model_rows_time_the_wrapped_model_and_give_the_peer_ratios(tmp_path, monkeypatch):
    """The whole fla-model path on a CPU, fla's model replaced by a transformers-style stand-in: rows ok,
    ours/fla's ratios per mode (with the <= 1 verdict) and fla's block against its own standard."""
    built = []

    def fake_build(cfg, device, dtype):
        built.append(cfg.residual)
        return peer.FlaModel(_FakeKDAForCausalLM(cfg)).to(device=device, dtype=dtype)

    monkeypatch.setattr(rows_mod, "build_fla_model", fake_build)
    monkeypatch.setattr(e2e, "fla_model_status", lambda: None)
    result = e2e.run_e2e_benchmark(
        quick=True, shapes=["kda-dense"], modes=["standard", "block"], kinds=["train"], variants=["eager"],
        impls=["attnres", "fla-model"], warmup=1, repeat=2, profile=False, device="cpu",
        out=tmp_path / "e2e_peer.json",
    )
    assert built == ["standard", "block"]
    rows = [r for r in result["rows"] if r["impl"] == "fla-model"]
    assert len(rows) == 4 and all(r["status"] == "ok" and _positive_finite(r["ms"]) for r in rows), rows
    assert all(r["ops_backend"] == "fla" and (r["source_bytes"] > 0) == (r["mode"] == "block") for r in rows)
    whats = {(q["what"], q["optimizer"]): q for q in result["ratios"]}
    for mode in ("standard", "block"):
        for opt in ("none", "adamw"):
            q = whats[(f"attnres/fla-model {mode}", opt)]
            assert _positive_finite(q["time_ratio"]) and q["time_target_met"] == (q["time_ratio"] <= 1)
    assert ("block(fla-model)/standard(fla-model)", "none") in whats
    assert [q for q in result["ratios"] if q["what"] == "block/standard"]  # ours, unchanged
    assert len([q for q in result["ratios"] if q["what"] == "block/standard"]) == 2  # not fla's rows too
    table = report.format_table(result)
    assert "attnres/fla-model block" in table and "target <= 1" in table


def test_fla_model_wrapper_returns_the_loss_and_a_zero_balance_loss():
    cfg = default_shapes(quick=True)["kda-dense"].config
    inner = _FakeKDAForCausalLM(cfg)
    wrapped = peer.FlaModel(inner)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = wrapped(ids, labels=ids)
    torch.testing.assert_close(out.loss, inner.decoder(ids, labels=ids).loss)
    assert out.aux_loss.item() == 0.0 and out.aux_loss.dtype == out.loss.dtype


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.skipif(not RESULTS.is_dir(), reason="no committed results (a generated project leaves them out)")
def test_committed_ratios_are_what_compute_ratios_gives_from_their_rows():
    """Every committed e2e JSON: the ratios stored are recomputed from its rows. A merged file
    (``merge_results``: rows and ratios tagged with their ``run``) is checked run by run, for the runs whose
    tag is unique in it (two parts with one tag share a name, so their rows cannot be told apart)."""
    checked = 0
    for path in sorted(RESULTS.glob("e2e_*.json")):
        data = json.loads(path.read_text())
        if "ratios" not in data:
            continue
        if "runs" not in data:
            assert report.compute_ratios(data["rows"]) == data["ratios"], path.name
            checked += 1
            continue
        names = [r["run"] for r in data["runs"]]
        for name in (n for n in names if names.count(n) == 1):
            rows = [{k: v for k, v in r.items() if k != "run"} for r in data["rows"] if r["run"] == name]
            stored = [q for q in data["ratios"] if q["run"] == name]
            assert [{**q, "run": name} for q in report.compute_ratios(rows)] == stored, (path.name, name)
            checked += 1
    assert checked >= 10


def _fake_fast_attnres(root):
    """A stand-in for fast-attnres 2.1.0 installed apart: a package named ``attnres`` (as theirs is) whose
    ``attnres(values, query, eps=)`` is their documented math: keys are the sources RMS-normalised without
    a weight, one static query, softmax over the sources, the full-width mixture."""
    pkg = root / "attnres"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .api import attnres\n__version__ = 'fake'\n")
    (pkg / "api.py").write_text(
        "import torch\n"
        "def attnres(values, query, *, eps=1e-6, scale=1.0):\n"
        "    v = torch.stack(list(values))\n"
        "    k = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)\n"
        "    p = (scale * (k * query).sum(-1)).softmax(0)\n"
        "    return (p.unsqueeze(-1) * v).sum(0)\n")


@pytest.mark.parametrize("mode", ["block", "full"])
def test_fast_attnres_loads_apart_from_ours_and_computes_our_loss_and_gradients(mode, tmp_path, monkeypatch):
    import sys

    import attnres

    monkeypatch.delitem(sys.modules, "fast_attnres", raising=False)
    with pytest.raises(ImportError, match="--target DIR fast-attnres"):
        peer.load_fast_attnres(tmp_path)
    _fake_fast_attnres(tmp_path)
    fa = peer.load_fast_attnres(tmp_path)
    assert fa.__version__ == "fake" and sys.modules["attnres"] is attnres  # ours is still `attnres`
    cfg = default_shapes(quick=True)["dense"].config.replace(residual=mode)
    torch.manual_seed(0)
    ours = Decoder(cfg).double()
    with torch.no_grad():
        for q in ours.residual.queries.values():
            q.weight.normal_()
            q.norm_weight.uniform_(0.5, 1.5)  # folded into fast-attnres's query
    theirs = Decoder(cfg).double()
    theirs.load_state_dict(ours.state_dict())
    peer.use_fla_residual(theirs, attnres_fn=peer.fast_attnres_fn(fa))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for name in ("3", "out"):
        for p in ("weight", "norm_weight"):
            torch.testing.assert_close(getattr(theirs.residual.queries[name], p).grad,
                                       getattr(ours.residual.queries[name], p).grad)


def test_bench_e2e_seeds_and_pins_kda_autotuning_on_a_gpu_and_records_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lightning_modules import bench_template, warmup

    calls = []
    monkeypatch.setattr(warmup, "seed_autotune", lambda device: calls.append(("seed", device.type)) or 7)
    monkeypatch.setattr(warmup, "pin_untuned_kda", lambda: calls.append(("pin",)) or ["k1", "k2"])
    assert bench_template.prepare_kda_autotune(torch.device("cpu")) is None and calls == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "fla" else real(name, *a))
    got = bench_template.prepare_kda_autotune(torch.device("cuda"))
    assert calls == [("seed", "cuda"), ("pin",)]
    assert got == {"seeded": 7, "pinned": ["k1", "k2"], "autotune_env": None}
    assert "7 shipped results seeded, 2 kernels" in capsys.readouterr().out
    # the command records what was done in its JSON
    monkeypatch.setattr(bench_template, "prepare_kda_autotune",
                        lambda device: {"seeded": 3, "device": device.type})
    out = tmp_path / "e2e.json"
    bench_template.bench_e2e(quick=True, shapes=["dense"], modes=["standard"], kinds=["prefill"],
                             impls=["attnres"], warmup=1, repeat=1, profile=False, device="cpu", out=str(out))
    assert json.loads(out.read_text())["kda_autotune"] == {"seeded": 3, "device": "cpu"}


def test_the_reduce_overhead_variant_graphs_our_model_and_starts_a_graph_step_per_step(tmp_path, monkeypatch):
    modes, steps, peaks = [], [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw) or model)  # eager stand-in
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    # graphs replay in their pool without allocating (session 20: an AdamW row "peaked" at 0.94 GiB of a
    # 14.8 GiB step): their rows ask for reserved bytes; the other rows for allocated ones
    monkeypatch.setattr(e2e, "peak_memory", lambda device, reserved=False: peaks.append(reserved) or 7)
    result = e2e.run_e2e_benchmark(
        quick=True, shapes=["dense"], modes=["standard"], kinds=["train"], impls=["attnres"],
        variants=["reduce-overhead", "eager"], warmup=1, repeat=2, profile=False, device="cpu",
        out=tmp_path / "e2e.json",
    )
    rows = [r for r in result["rows"] if r.get("variant") == "reduce-overhead"]
    assert {r["optimizer"] for r in rows} == {"none", "adamw"} and all(r["status"] == "ok" for r in rows)
    assert modes == [{"mode": "reduce-overhead"}]  # one model, compiled once for both rows
    assert all(r["cudagraph_skips"] == 0 for r in rows)  # recorded: whether Inductor fell back
    assert all("compile_breakdown_s" in r for r in rows)  # where the first call's compile time went
    assert len(steps) == 2 * (1 + 2)  # every step: the first call and the two timed ones, per row
    assert [r["peak_mem_kind"] for r in rows] == ["reserved"] * 2 and peaks.count(True) == 2
    eager = [r for r in result["rows"] if r.get("variant") == "eager"]
    assert [r["peak_mem_kind"] for r in eager] == ["allocated"] * 2 and peaks.count(False) == 2


@pytest.mark.parametrize("cpu_ops", [True, False])
def test_the_kernel_only_profile_records_no_operator_events_on_a_gpu(monkeypatch, cpu_ops):
    # `--profile kernels`: on a GPU only the kernels are recorded (a `medium` step's operator events took
    # the profiler minutes to parse); the CPU keeps its operators (it has no kernels)
    import torch.profiler

    from attnres.bench import timing

    seen = []

    class Avg:  # a name's summed events, as key_averages() gives them
        def __init__(self, i):
            self.key, self.count, self.self_device_time_total, self.self_cpu_time_total = f"k{i}", 1, i, i

    class FakeProfile:
        def __init__(self, activities):
            seen.append(activities)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return []

        def key_averages(self):
            return [Avg(i) for i in range(50)]

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(timing, "sync", lambda device: None)
    acts = torch.profiler.ProfilerActivity
    got = timing.profile_step(lambda: None, torch.device("cuda"), cpu_ops=cpu_ops)
    assert seen[-1] == ([acts.CPU, acts.CUDA] if cpu_ops else [acts.CUDA])
    assert got["recorded"] == ("operators and kernels" if cpu_ops else "kernels")
    # operators: the 40 heaviest; kernels only: every name (40 left a sixth of a step unnamed), heaviest first
    assert [o["op"] for o in got["top_ops"]] == [f"k{i}" for i in range(49, 49 - (40 if cpu_ops else 50), -1)]
    assert timing.profile_step(lambda: None, torch.device("cpu"), cpu_ops=cpu_ops)["recorded"] == "operators"
    assert seen[-1] == [acts.CPU]


def test_compile_time_breakdown_reports_the_phases_spent_since_the_snapshot(monkeypatch):
    # a compiled first call's time by phase (Dynamo, AOT, Inductor, Triton's workers): issue 24's first
    # step <= 60 s needs to know which phase to cut; phases under min_s are left out, longest first
    import torch._dynamo.utils as dynamo_utils

    from attnres.bench import timing

    metrics = {"bytecode_tracing": [1.0], "async_compile.wait": [2.0]}
    monkeypatch.setattr(dynamo_utils, "compilation_time_metrics", metrics)
    before = timing.compile_time_snapshot()
    assert before == {"bytecode_tracing": 1.0, "async_compile.wait": 2.0}
    metrics["bytecode_tracing"].append(0.3)  # under min_s: left out
    metrics["async_compile.wait"].append(40.0)
    metrics["compile_fx_inner"] = [5.0, 20.0]  # a phase first seen after the snapshot, two graphs
    assert timing.compile_time_breakdown(before) == {"async_compile.wait": 40.0, "compile_fx_inner": 25.0}
    assert list(timing.compile_time_breakdown(before, min_s=0.1)) == [
        "async_compile.wait", "compile_fx_inner", "bytecode_tracing"]


def test_full_group_sets_full_attnres_group_in_every_shape():
    # Full AttnRes' phase-1 calls group `full_group` sublayers (issue 28: groups of 4 halve the calls)
    data = e2e.run_e2e_benchmark(
        quick=True, shapes=["dense"], modes=["full"], kinds=["train"], variants=["eager"],
        impls=["attnres"], full_group=4, warmup=1, repeat=1, profile=False, device="cpu", out=None,
    )
    assert data["settings"]["full_group"] == 4 and data["shapes"]["dense"]["config"]["full_group"] == 4
    calls = data["residual_traffic"]["dense"]["full"]["calls_per_forward"]
    sublayers = 2 * data["shapes"]["dense"]["config"]["num_layers"]
    assert calls["phase1"] == -(-sublayers // 4)  # one phase-1 call per group of 4
    assert all(r["status"] == "ok" for r in data["rows"])
    with pytest.raises(ValueError, match="full_group"):
        e2e.run_e2e_benchmark(quick=True, shapes=["dense"], kinds=["train"], full_group=0, device="cpu")


def test_profile_diff_lines_up_two_profiles_kernel_by_kernel(tmp_path, capsys):
    # benchmarks/profile_diff.py: the first profiled row matching the filters on each side, every kernel's
    # change (absent on one side = 0 there), sorted; the summary numbers of each side
    import json

    from benchmarks import profile_diff

    def row(mode, ms, ops, profiled=True):
        prof = {"device_ms": ms - 1, "kernels": 10, "top_ops": [{"op": k, "count": c, "self_ms": t}
                                                                 for k, c, t in ops]}
        return {"mode": mode, "variant": "eager", "optimizer": "none", "ms": ms,
                "profile": prof if profiled else None}

    base = {"rows": [row("standard", 9.0, [], profiled=False),
                     row("standard", 10.0, [("gemm", 2, 4.0), ("gather", 3, 2.5)]),
                     row("block", 11.0, [("p1", 1, 1.0)])]}
    new = {"rows": [row("standard", 8.0, [("gemm", 2, 4.5), ("triton_gather", 3, 0.5)])]}
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps(new))
    d = profile_diff.main([str(tmp_path / "b.json"), str(tmp_path / "n.json"), "--mode", "standard",
                           "--out", str(tmp_path / "d.json")])
    assert [(c["kernel"], c["delta_ms"], c["base_calls"], c["new_calls"]) for c in d["changes"]] == [
        ("gather", -2.5, 3, 0), ("gemm", 0.5, 2, 2), ("triton_gather", 0.5, 0, 3)]
    assert d["base"] == {"step_ms": 10.0, "device_ms": 9.0, "kernels": 10, "named": 2}
    assert d["families"] == {"GEMM": {"base_ms": 4.0, "new_ms": 4.5, "delta_ms": 0.5},  # largest first
                             "other": {"base_ms": 2.5, "new_ms": 0.0, "delta_ms": -2.5},
                             "Inductor": {"base_ms": 0.0, "new_ms": 0.5, "delta_ms": 0.5}}  # triton_*
    assert list(d["families"]) == ["GEMM", "other", "Inductor"]
    assert json.loads((tmp_path / "d.json").read_text()) == d
    out = capsys.readouterr().out
    assert "   -2.50     2.50     0.00        3->0  gather" in out
    with pytest.raises(SystemExit, match="no profiled row"):
        profile_diff.main([str(tmp_path / "b.json"), str(tmp_path / "n.json"), "--mode", "block"])


def test_kernel_families_sort_a_profiles_kernels_by_where_they_come_from():
    # every kernel to its first matching family (real names from session 22's H100 profiles), the rest
    # "other"; device ms summed per family, largest first
    from attnres.bench.timing import kernel_families

    names = {
        "chunk_kda_bwd_kernel_intra": "fla KDA", "recompute_w_u_fwd_kda_kernel": "fla KDA",
        "causal_conv1d_fwd_kernel": "fla norms, conv, SwiGLU, loss", "layer_norm_bwd_kernel_row":
        "fla norms, conv, SwiGLU, loss", "moe_gather_sum_kernel": "MoE Triton (ours)",
        "void attnres_cuda::p1_bwd_coef_kernel<__nv_bfloat16, 8, 4, 1, true>(attnres_cuda::P1BwdArgs)":
        "depth attention (ours)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention (SDPA)",
        "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversal"
        "INS5_17GroupProblemShapeIN4cu": "grouped GEMM",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMM",
        "triton_poi_fused_cat_mul_silu_silu_backward_split_7": "Inductor",
        "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long, long, long,"
        " long, bool)": "torch elementwise, copies, gathers",
        "something_else": "other",
    }
    for i, (name, family) in enumerate(names.items()):
        assert kernel_families([{"op": name, "count": 1, "self_ms": 1.0 + i}]) == {family: 1.0 + i}, name
    ops = [{"op": n, "count": 1, "self_ms": 1.0} for n in names]
    fam = kernel_families(ops)
    assert list(fam)[:2] == ["fla KDA", "fla norms, conv, SwiGLU, loss"] and sum(fam.values()) == len(names)
