"""The shipped configs: one per model preset, and each documented composition validates on a CPU machine
(``--print_config`` needs no GPU; the composed model section builds a valid ``Config``, whose
``max_seq_len`` admits the composed ``data.seq_len``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from attnres.model import PRESETS
from lightning_modules.cli import run_lightning_cli
from lightning_modules.module import build_config

ROOT = Path(__file__).resolve().parents[1]
TYPED = ("residual", "num_blocks", "num_layers", "dim", "token_mixer", "moe", "num_experts", "top_k",
         "max_seq_len", "vocab_size")

GPU = {"accelerator": "gpu", "precision": "bf16-mixed", "max_steps": 10000}
# (config files after configs/default.yaml, what the composition must say)
COMPOSITIONS = {
    "cpu tiny": (["model/tiny.yaml", "trainer/cpu.yaml"], {"accelerator": "cpu", "precision": "32-true"}),
    "gpu small": (["model/small.yaml", "trainer/gpu.yaml"], GPU),  # the GPU quick start
    "gpu medium": (["model/medium.yaml", "trainer/gpu.yaml"], GPU),
    "fsdp 48b": (["model/kimi-linear-48b-a3b.yaml", "trainer/fsdp.yaml"], {"accelerator": "gpu"}),
}


def test_every_model_preset_has_a_config():
    assert {p.stem for p in (ROOT / "configs/model").glob("*.yaml")} == set(PRESETS)
    for name in PRESETS:
        assert yaml.safe_load((ROOT / f"configs/model/{name}.yaml").read_text())["model"]["preset"] == name


@pytest.mark.parametrize("case", list(COMPOSITIONS))
def test_composed_config_prints_and_validates_without_a_gpu(case, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnres"])  # pytest's own arguments are not the CLI's
    files, trainer = COMPOSITIONS[case]
    argv = ["fit", "-c", str(ROOT / "configs/default.yaml")]
    for f in files:
        argv += ["-c", str(ROOT / "configs" / f)]
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli([*argv, "--data.packing", "documents", "--print_config"])
    assert exc.value.code in (0, None)
    composed = yaml.safe_load(capsys.readouterr().out)
    for key, value in trainer.items():
        assert composed["trainer"][key] == value, key
    model = composed["model"]
    config = build_config(model["preset"], **(model["overrides"] or {}),
                          **{k: model[k] for k in TYPED if model[k] is not None})
    assert composed["data"]["seq_len"] <= config.max_seq_len
    assert composed["data"]["packing"] == "documents"
    if config.residual == "block":
        assert config.num_blocks == model["num_blocks"]  # not default.yaml's 4, which the deep presets reject
