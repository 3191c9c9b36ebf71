"""The baseline audit (benchmarks/study/audit.py, issue 25 item 1) on CPU: the reference's parameter
matching, a few optimizer steps, the Block AttnRes wrapper at init, and a whole run on a tiny corpus.
Everything that builds litgpt's GPT is skipped when litgpt is not importable; ``--help`` is checked
without it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.study import audit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def litgpt():
    return pytest.importorskip("litgpt.model")


def tiny_shape(vocab: int = 64) -> dict:
    return {"n_layer": 2, "n_embd": 64, "n_head": 1, "intermediate_size": 96, "vocab_size": vocab}


def test_help_and_describe_work_without_litgpt():
    code = ("import sys; sys.modules['litgpt'] = None; from benchmarks.study.audit import main; "
            "main(sys.argv[1:])")
    for args in (["--help"], ["--describe"]):
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    assert "| s | 8 x 256 |" in r.stdout


@pytest.mark.parametrize("model", ["s", "m", "l", "dw8", "dw24", "dw32"])
def test_matched_shape_counts_are_those_of_the_built_models(litgpt, model):
    """The counts matched_shape claims equal sum(p.numel()) of the built reference (on the meta
    device) and, for s, of the built project decoder; the reference is within 10 % (in fact 1 %)."""
    from litgpt.model import GPT

    pc = audit.project_config(model)
    shape = audit.matched_shape(pc)
    with torch.device("meta"):
        gpt = GPT(audit.litgpt_config(shape, 1024))
    assert sum(p.numel() for p in gpt.parameters()) == shape["reference_total"]
    assert audit.active_params(gpt) == shape["reference_active"]
    assert sum(p.numel() for n, p in gpt.named_parameters() if n != "transformer.wte.weight") \
        == shape["reference_active"]
    assert abs(shape["ratio"] - 1) < 0.01
    assert (shape["n_layer"], shape["n_embd"]) == (pc.num_layers, pc.dim)
    if model == "s":
        from attnres.model import Decoder

        with torch.device("meta"):
            dec = Decoder(pc)
        assert dec.num_parameters(active=True) == shape["project_active"]
        assert dec.num_parameters() == shape["project_total"]


def test_lr_schedule_is_the_study_schedule():
    from lightning_modules.module import LRSchedule

    ref = LRSchedule(50, 512, "cosine", 0.1)
    for step in range(0, 600, 7):
        assert audit.lr_multiplier(step, 50, 512, 0.1) == pytest.approx(ref(step), abs=1e-12)


@pytest.mark.parametrize("residual", ["plain", "block"])
def test_three_steps_lower_the_loss_on_a_fixed_batch(litgpt, one_thread, residual):
    torch.manual_seed(0)
    model = audit.build_reference(tiny_shape(), 32, residual, num_blocks=2)
    opt = audit.make_optimizer(model, 3e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    ids = torch.randint(0, 64, (4, 33))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    losses = [audit.train_step(model, batch, opt, 3e-3, 1.0, None) for _ in range(3)]
    with torch.no_grad():
        logits = model(batch["input_ids"])
    final = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    losses.append(final)
    assert all(math.isfinite(x) for x in losses)
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[0] == pytest.approx(math.log(64), abs=0.5)  # near-uniform logits at init


def test_wrapper_with_the_standard_residual_is_litgpts_forward(litgpt, one_thread):
    torch.manual_seed(0)
    plain = audit.build_reference(tiny_shape(), 32, "plain")
    wrapped = audit.AttnResGPT(plain, "standard")
    ids = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(wrapped(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_stream_rms_reads_the_residual_stream_the_same_way_for_every_model(litgpt, one_thread):
    # litgpt's own forward (hooks on its norms) and the standard residual through attnres (the capture)
    # see the same stream; the read-out is the RMS of what the final norm reads; the project's decoder
    # gives its own hidden_rms (one per sublayer input, then the read-out)
    torch.manual_seed(0)
    plain = audit.build_reference(tiny_shape(), 32, "plain")
    ids = torch.randint(0, 64, (2, 32))
    hooked = audit.stream_rms(plain, ids, None)
    captured = audit.stream_rms(audit.AttnResGPT(plain, "standard"), ids, None)
    assert len(hooked) == 2 * 2 + 1 and hooked == pytest.approx(captured, rel=1e-5)
    with torch.no_grad():
        emb = plain.transformer.wte(ids)
    assert hooked[0] == pytest.approx(float(emb.pow(2).mean().sqrt()), rel=1e-6)
    assert plain.training  # back in training mode
    pc = audit.project_config("s", 64).replace(num_layers=2, dim=64, max_seq_len=32)
    project = audit.ProjectLM(pc)
    rms = audit.stream_rms(project, ids, None)
    assert len(rms) == 2 * 2 + 1 and all(math.isfinite(r) and r > 0 for r in rms)
    with torch.no_grad():
        assert rms[0] == pytest.approx(float(project.model.embed(ids).pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("init", audit.INITS)
def test_reference_inits_have_their_stated_scales(litgpt, one_thread, init):
    """litgpt's init: sqrt(2 / 5d) everywhere, 1 / (sqrt(d) L) for the residual writers; GPT-2's (the
    ablation): 0.02 and 0.02 / sqrt(2 L). Measured on a shape wide enough for a 3 % check."""
    shape = {"n_layer": 4, "n_embd": 256, "n_head": 4, "intermediate_size": 512, "vocab_size": 512}
    torch.manual_seed(0)
    gpt = audit.build_reference(shape, 32, "plain", init=init)
    d, L = shape["n_embd"], shape["n_layer"]
    std, out = ((math.sqrt(2 / 5 / d), 1 / math.sqrt(d) / L) if init == "litgpt"
                else (0.02, 0.02 / math.sqrt(2 * L)))
    writers = {id(m) for b in gpt.transformer.h for m in (b.attn.proj, b.mlp.proj)}
    seen = 0
    for module in gpt.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            expected = out if id(module) in writers else std
            assert float(module.weight.std()) == pytest.approx(expected, rel=0.03), module
            seen += 1
    assert seen == 1 + 5 * L + 1  # embedding; qkv, proj, fc_1, fc_2, proj per block; head
    with pytest.raises(ValueError, match="init='xavier': expected one of litgpt, gpt2"):
        audit.build_reference(shape, 32, "plain", init="xavier")


def test_block_attnres_at_init_reads_the_embedding_then_uniform_means(litgpt, one_thread):
    """Zero pseudo-queries: uniform depth weights. Sublayer 0 reads the embedding alone, sublayer 1
    the mean of the embedding and the partial block sum (the attention output), the read-out the mean
    of the embedding and the two block summaries."""
    torch.manual_seed(0)
    model = audit.build_reference(tiny_shape(), 32, "block", num_blocks=2)
    assert all(float(q.weight.detach().abs().max()) == 0 for q in model.residual.queries.values())
    gpt = model.gpt
    ids = torch.randint(0, 64, (2, 32))
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        model(ids, capture=captured)
        emb = gpt.transformer.wte(ids)
        b0 = gpt.transformer.h[0]
        cos, sin = gpt.cos[:32].unsqueeze(0), gpt.sin[:32].unsqueeze(0)
        v0 = b0.attn(b0.norm_1(emb), cos, sin, None)
    assert len(captured) == 5  # the four sublayer inputs, then the read-out
    torch.testing.assert_close(captured[0], emb, rtol=0, atol=0)
    torch.testing.assert_close(captured[1], (emb + v0) / 2, rtol=1e-5, atol=1e-6)
    # sublayer 2 opens block 1: the embedding and block 0's summary v0 + v1, weighted equally
    with torch.no_grad():
        v1 = b0.mlp(b0.norm_2(captured[1]))
    torch.testing.assert_close(captured[2], (emb + v0 + v1) / 2, rtol=1e-5, atol=1e-6)


def tiny_run_args(tmp_path: Path, steps: int = 4) -> list[str]:
    """audit.py's arguments for ``steps`` steps of a 2 x 64 reference with Block AttnRes (N = 2) on a small
    files corpus (byte tokenizer, 2 x 32 tokens a step), validating every 2 steps, JSON to run.json."""
    txt = tmp_path / "txt"
    txt.mkdir(exist_ok=True)
    for i in range(6):
        (txt / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 40)
    return [
        "--model", "s", "--layers", "2", "--dim", "64", "--residual", "block", "--num_blocks", "2",
        "--device", "cpu", "--precision", "32", "--tokens", str(steps * 2 * 32), "--val_every", "2",
        "--limit_val_batches", "2", "--warmup_steps", "1", "--lr", "3e-3",
        "--data.corpus", "files", "--data.files", str(txt / "*.txt"), "--data.tokenizer", "byte",
        "--data.seq_len", "32", "--data.batch_size", "2", "--data.num_workers", "0",
        "--output", str(tmp_path / "run.json"),
    ]


def test_a_whole_run_on_a_tiny_corpus(litgpt, one_thread, tmp_path):
    """The CLI end to end: the project's DataModule on a small files corpus, 4 steps, validation at
    steps 2 and 4, a JSON with the curve and the settings."""
    out = tmp_path / "run.json"
    result = audit.main(tiny_run_args(tmp_path))
    saved = json.loads(out.read_text())
    assert saved["status"] == "complete"
    assert saved["settings"]["init"] == "litgpt" and saved["settings"]["init_std"] is None  # reference
    assert saved["run_id"] == result["run_id"] == "s-reference-block2-seed0"
    assert [row[0] for row in saved["val_curve"]] == [2, 4]
    assert [row[1] for row in saved["val_curve"]] == [128, 256]
    assert all(math.isfinite(row[2]) for row in saved["val_curve"])
    assert saved["steps"] == 4 and saved["settings"]["lr"] == 3e-3
    assert len(saved["hidden_rms"]) == 2 * 2 + 1 and all(r > 0 for r in saved["hidden_rms"])
    assert saved["shape"]["n_layer"] == 2 and saved["shape"]["n_embd"] == 64
    assert saved["params"]["active"] == saved["shape"]["reference_active"] + 2 * 64 * 5  # + the depth queries


def test_an_interrupted_run_keeps_its_validated_curve(litgpt, one_thread, tmp_path, monkeypatch):
    """The device scripts stop a run at the call's limit with SIGINT: the JSON then holds the steps done
    and every validation so far, marked ``cut`` (the analysis reads complete runs only); interrupted
    before its first validation, a run writes nothing."""
    from benchmarks.study.analyze import load_audits

    real_step, calls = audit.train_step, []

    def stop_at(n):
        def step(*args, **kwargs):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(n)
            return real_step(*args, **kwargs)
        return step

    out = tmp_path / "run.json"
    monkeypatch.setattr(audit, "train_step", stop_at(5))  # steps 1-5 run, the 6th is interrupted
    result = audit.main(tiny_run_args(tmp_path, steps=8))
    saved = json.loads(out.read_text())
    assert saved["status"] == result["status"] == "cut"
    assert saved["steps"] == 5 and saved["tokens"] == 5 * 64
    assert [row[0] for row in saved["val_curve"]] == [2, 4]
    assert saved["final_val_loss"] == saved["val_curve"][-1][2] and saved["hidden_rms"] is None
    assert load_audits(tmp_path) == []  # the analysis reads complete runs only

    # killed outright (SIGKILL, a crash) after two validations: the JSON written at the last one stays
    out.unlink()
    calls.clear()

    def crash_at_6(*args, **kwargs):
        if len(calls) == 5:
            raise RuntimeError("the process dies here")
        calls.append(5)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(audit, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="dies here"):
        audit.main(tiny_run_args(tmp_path, steps=8))
    saved = json.loads(out.read_text())
    assert saved["status"] == "partial" and [row[0] for row in saved["val_curve"]] == [2, 4]
    assert saved["steps"] == 4 and load_audits(tmp_path) == []

    out.unlink()
    calls.clear()
    monkeypatch.setattr(audit, "train_step", stop_at(1))
    assert audit.main(tiny_run_args(tmp_path, steps=8))["status"] == "cut"
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_config_overrides_parse_yaml_values_and_name_a_bad_field():
    assert audit.config_overrides(["init_std=0.04", "moe=false", "token_mixer=mla"]) == {
        "init_std": 0.04, "moe": False, "token_mixer": "mla"}
    assert audit.config_overrides([]) == {}
    with pytest.raises(ValueError, match="'init_sd' is not one"):
        audit.config_overrides(["init_sd=0.04"])
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        audit.config_overrides(["init_std"])
    # applied to the project's config after the shape is matched
    cfg = audit.project_config("s").replace(**audit.config_overrides(["num_layers=2", "moe=false"]))
    assert cfg.num_layers == 2 and cfg.moe is False and cfg.dim == 256


def test_default_run_ids_name_the_mode_blocks_and_tag():
    assert audit.default_run_id("s", "reference", "block", 8, 0, "pk") == "s-reference-block8-seed0-pk"
    assert audit.default_run_id("m", "reference", "plain", 8, 2) == "m-reference-plain-seed2"
    assert audit.default_run_id("s", "project", "plain", 8, 1) == "s-project-standard-seed1"
