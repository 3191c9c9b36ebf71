"""``configs/model/<preset>.yaml``, generated from :data:`attnres.model.PRESETS`.

Each file is the preset's whole ``model.config`` block (every :class:`attnres.model.Config` field but
``vocab_size``, which ``attnres fit`` links to ``data.tokenizer``) plus the training settings that go
with the size (learning rate, warmup, sequence length and batch). ``configs/default.yaml`` holds the
``tiny`` block too, so that ``attnres fit -c default`` alone trains it. ``tests/test_configs.py`` holds
the files equal to what this module renders; after changing a preset, rewrite them with::

    python -m lightning_modules.presets
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnres.model import PRESETS, Config, get_config

# `attnres fit` sets it from the tokenizer (lightning_modules/cli.py links data.tokenizer to it)
LINKED_FIELDS = ("vocab_size",)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class PresetRun:
    """What a preset's YAML adds to its :class:`Config`.

    Attributes:
        comment: the file's leading comment (what the model is, where it runs).
        config: fields set differently from the preset in the YAML (each with its reason in ``why``).
        why: one comment line per ``config`` key, written above it.
        model: other ``LanguageModel`` arguments (``lr``, ``warmup_steps``).
        data: ``TextDataModule`` arguments (``seq_len``, ``batch_size``).
    """

    comment: str
    config: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


GPU_BATCH = "Sequence and batch sized for one 80 GB GPU in bf16 (not measured here: adjust data.batch_size)."
RUNS: dict[str, PresetRun] = {
    "tiny": PresetRun(
        comment="~1.9M parameters (0.95M active): 4 layers (KDA, KDA, KDA, MLA), dim 128, 8 experts top-2 "
        "+ 1 shared.",
        # the aux-loss-free router bias moves 1e-3 per step by default: too slow for 150 steps (max/mean
        # expert load stays ~3.3); 0.01 balances it (~1.6) and lowers the validation loss
        config={"router_bias_update_rate": 0.01},
        why={"router_bias_update_rate": "short CPU runs: a faster aux-loss-free balancing (preset: 1e-3)"},
    ),
    "small": PresetRun(
        comment="~240M parameters (~90M active): 16 layers, dim 768, 16 experts top-2 + 1 shared. One GPU.\n"
        + GPU_BATCH,
        model={"lr": 0.001, "warmup_steps": 500},
        data={"seq_len": 2048, "batch_size": 16},
    ),
    "medium": PresetRun(
        comment="~1B parameters (~0.3B active): 24 layers, dim 1024, 32 experts top-4 + 1 shared.\n"
        + GPU_BATCH,
        model={"lr": 0.0006, "warmup_steps": 1000},
        data={"seq_len": 2048, "batch_size": 8},
    ),
    "kimi-linear-48b-a3b": PresetRun(
        comment="\n".join([
            "Kimi-Linear-48B-A3B's shape (27 layers, dim 2304, KDA 3 : 1 MLA at 1-based layers 4, 8, ...,",
            "24, 27; 256 experts top-8 + 1 shared; ~48B total, ~3B active per token). It does NOT fit one",
            "GPU (96 GB of bf16 weights alone, plus fp32 master weights and AdamW state): shard it with",
            "FSDP2 over many GPUs, e.g.",
            "  attnres fit -c configs/default.yaml -c configs/model/kimi-linear-48b-a3b.yaml \\",
            "      -c configs/trainer/fsdp.yaml --trainer.num_nodes 8 \\",
            "      --data.tokenizer <a 163840-entry tokenizer.json>",
            "(docs/distributed.md). Not trained in this repository; lr and warmup are starting points.",
            "num_blocks 9: 54 sublayers make blocks of 3 layers (1, 3, 9 or 27 blocks are valid).",
        ]),
        model={"lr": 0.0003, "warmup_steps": 2000},
        data={"seq_len": 4096, "batch_size": 1},
    ),
}


def run_of(name: str) -> PresetRun:
    """:data:`RUNS`' entry of preset ``name`` (a preset without one gets a file with only its config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    return RUNS.get(name, PresetRun(comment=f"The {name} preset (attnres.model.PRESETS)."))


def preset_config(name: str) -> Config:
    """The :class:`Config` that ``configs/model/<name>.yaml`` holds: the preset with its YAML's changes."""
    return get_config(name, **run_of(name).config)


def config_block(name: str) -> dict[str, Any]:
    """``model.config`` of preset ``name``: every field of :func:`preset_config` but the linked ones."""
    fields = dataclasses.asdict(preset_config(name))
    return {k: v for k, v in fields.items() if k not in LINKED_FIELDS}


def _scalar(value: Any) -> str:
    """``value`` as YAML flow text (``null``, ``true``, ``1.0e-05``, ``[3, 7]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def config_lines(name: str, indent: int = 4) -> list[str]:
    """The lines of ``model.config``'s body for preset ``name``, ``indent`` spaces deep, with a comment
    above each field the YAML changes from the preset and one saying where ``vocab_size`` comes from."""
    pad = " " * indent
    why = run_of(name).why
    lines = [f"{pad}# vocab_size: set by attnres fit from data.tokenizer (preset {name}: "
             f"{PRESETS[name]['vocab_size']})"]
    for key, value in config_block(name).items():
        if key in why:
            lines.append(f"{pad}# {why[key]}")
        lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def preset_yaml(name: str) -> str:
    """The text of ``configs/model/<name>.yaml``."""
    run = run_of(name)
    lines = [f"# {line}" if line else "#" for line in run.comment.splitlines()]
    lines.append("# Generated from attnres.model.PRESETS by `python -m lightning_modules.presets`: edit the")
    lines.append("# preset (or lightning_modules/presets.py), not this file.")
    lines += ["model:", "  config:", *config_lines(name)]
    lines += [f"  {k}: {_scalar(v)}" for k, v in run.model.items()]
    if run.data:
        lines += ["data:", *(f"  {k}: {_scalar(v)}" for k, v in run.data.items())]
    return "\n".join(lines) + "\n"


# `model:`'s `config:` key in configs/default.yaml and the lines of its body (deeper than 2 spaces, or
# comments/blank lines among them)
_DEFAULT_BLOCK = re.compile(r"^(  config:\n)((?:    .*\n|\s*\n)*)", re.MULTILINE)


def default_yaml(text: str, name: str = "tiny") -> str:
    """``configs/default.yaml``'s ``text`` with its ``model.config`` body replaced by preset ``name``'s
    (the rest of the file, comments included, as it is)."""
    match = _DEFAULT_BLOCK.search(text)
    if match is None:
        raise ValueError("configs/default.yaml has no `  config:` block under `model:`")
    body = "\n".join(config_lines(name)) + "\n"
    return text[: match.start(2)] + body + text[match.end(2) :]


def write(root: Path = CONFIGS) -> list[Path]:
    """Rewrite ``<root>/model/<preset>.yaml`` for every preset and the block of ``<root>/default.yaml``;
    the paths whose text changed."""
    changed = []
    targets = {root / "model" / f"{name}.yaml": preset_yaml(name) for name in PRESETS}
    default = root / "default.yaml"
    targets[default] = default_yaml(default.read_text(encoding="utf-8"))
    for path, text in targets.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
