"""The shipped configs: one per model preset, generated from ``PRESETS`` and held equal to it, and each
documented composition validates on a CPU machine (``--print_config`` needs no GPU; the composed
``model.config`` builds a valid ``Config``, the last preset's whole, whose ``max_seq_len`` admits the
composed ``data.seq_len``)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from attnres.model import PRESETS, Config, get_config
from lightning_modules import presets
from lightning_modules.cli import run_lightning_cli
from lightning_modules.module import as_config

ROOT = Path(__file__).resolve().parents[1]

GPU = {"accelerator": "gpu", "precision": "bf16-mixed", "max_steps": 10000}
# (config files after configs/default.yaml, the preset they compose, what the composition must say)
COMPOSITIONS = {
    "cpu tiny": (["model/tiny.yaml", "trainer/cpu.yaml"], "tiny",
                 {"accelerator": "cpu", "precision": "32-true"}),
    "gpu small": (["model/small.yaml", "trainer/gpu.yaml"], "small", GPU),  # the GPU quick start
    "gpu medium": (["model/medium.yaml", "trainer/gpu.yaml"], "medium", GPU),
    "fsdp 48b": (["model/kimi-linear-48b-a3b.yaml", "trainer/fsdp.yaml"], "kimi-linear-48b-a3b",
                 {"accelerator": "gpu"}),
}
TOKENIZER_VOCAB = 264  # data.tokenizer byte: what `attnres fit` links model.config.vocab_size to


def test_every_model_preset_has_a_config_generated_from_presets():
    assert {p.stem for p in (ROOT / "configs/model").glob("*.yaml")} == set(PRESETS)
    text = {name: (ROOT / f"configs/model/{name}.yaml").read_text() for name in PRESETS}
    stale = [name for name in PRESETS if text[name] != presets.preset_yaml(name)]
    assert not stale, f"configs/model/ {stale} differ from PRESETS: run python -m lightning_modules.presets"
    for name in PRESETS:
        block = yaml.safe_load((ROOT / f"configs/model/{name}.yaml").read_text())["model"]["config"]
        # the whole Config but the linked vocabulary, and the preset's values (but for the YAML's changes)
        assert set(block) == {f.name for f in dataclasses.fields(Config)} - {"vocab_size"}
        vocab = PRESETS[name]["vocab_size"]
        assert Config(**block, vocab_size=vocab) == get_config(name, **presets.run_of(name).config)
        assert block["name"] == name


def test_default_config_holds_the_tiny_preset():
    text = (ROOT / "configs/default.yaml").read_text()
    assert presets.default_yaml(text) == text, "run python -m lightning_modules.presets"
    default = yaml.safe_load(text)["model"]["config"]
    assert default == yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())["model"]["config"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs/study/model").glob("*.yaml")))
def test_study_model_configs_are_the_small_preset_with_their_fields(name):
    """The study's sizes set every field where the small preset (which they started from) differs from
    Config's defaults: composed on base.yaml (no preset block) they build the same models."""
    fields = yaml.safe_load((ROOT / f"configs/study/model/{name}.yaml").read_text())["model"]["config"]
    assert yaml.safe_load((ROOT / "configs/study/base.yaml").read_text())["model"].get("config") is None
    own = {k: v for k, v in fields.items() if k != "name"}
    for residual in ({"residual": "standard"}, {"residual": "block", "num_blocks": 8}):
        assert Config(**fields, vocab_size=8192, **residual) == get_config(
            "small", **own, vocab_size=8192, **residual)


@pytest.mark.parametrize("case", list(COMPOSITIONS))
def test_composed_config_prints_and_validates_without_a_gpu(case, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnres"])  # pytest's own arguments are not the CLI's
    files, preset, trainer = COMPOSITIONS[case]
    argv = ["fit", "-c", str(ROOT / "configs/default.yaml")]
    for f in files:
        argv += ["-c", str(ROOT / "configs" / f)]
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli([*argv, "--data.packing", "documents", "--print_config"])
    assert exc.value.code in (0, None)
    composed = yaml.safe_load(capsys.readouterr().out)
    for key, value in trainer.items():
        assert composed["trainer"][key] == value, key
    config = as_config(composed["model"]["config"])
    # the preset's whole block: nothing left of default.yaml's tiny one (num_blocks 4, which the deep
    # presets reject; router_bias_update_rate 0.01)
    assert config == presets.preset_config(preset).replace(vocab_size=TOKENIZER_VOCAB)
    assert composed["data"]["seq_len"] <= config.max_seq_len
    assert composed["data"]["packing"] == "documents"


def test_one_field_changes_from_the_command_line_or_a_later_yaml(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["attnres"])
    (tmp_path / "full.yaml").write_text("model:\n  config:\n    residual: full\n")
    argv = ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/model/small.yaml"),
            "-c", str(tmp_path / "full.yaml"), "--model.config.full_group", "1", "--print_config"]
    with pytest.raises(SystemExit):
        run_lightning_cli(argv)
    config = as_config(yaml.safe_load(capsys.readouterr().out)["model"]["config"])
    assert config == presets.preset_config("small").replace(
        vocab_size=TOKENIZER_VOCAB, residual="full", full_group=1)


def test_the_vocabulary_is_linked_to_the_tokenizer(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnres"])
    from attnres.errors import ParseError

    with pytest.raises(ParseError, match="model.config.vocab_size.*data.tokenizer"):
        run_lightning_cli(["fit", "-c", str(ROOT / "configs/default.yaml"),
                           "--model.config.vocab_size", "300"])
