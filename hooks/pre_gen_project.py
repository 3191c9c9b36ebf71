"""Cookiecutter pre-generation hook: check the answers before anything is generated.

A bad answer stops generation with one line per problem on stderr (and exit status 1), so a typo
never turns into a project that fails later at build or training time. The hook needs only the
standard library and PyYAML (a dependency of cookiecutter itself, which may run from its own
environment, without torch): the model presets are read from the template's ``configs/model/*.yaml``,
which ``python -m lightning_modules.presets`` writes from ``attnres.model.PRESETS``.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from pathlib import Path

import yaml  # a dependency of cookiecutter itself

# Rendered by cookiecutter: the answers, and the template's root (see hooks/template_source.py).
ANSWERS = json.loads(r"""{{ cookiecutter | jsonify }}""")
TEMPLATE_ROOT = Path(r"""{{ template_root }}""")

# {% raw %} (cookiecutter renders this file with Jinja; nothing below is templated)
OLD_PACKAGE = "attnres"
PRESET_CONFIGS = Path("configs", "model")
# `num_blocks` answer that keeps the preset's own (cookiecutter.json's default)
PRESET_DEFAULT = "preset"
# Names a new package must not take besides the standard library: what the project imports or
# builds with, and torch's own op namespaces (the package name is also the TORCH_LIBRARY namespace).
TAKEN = {
    "torch", "torchvision", "torchaudio", "torchmetrics", "triton", "fla", "lightning", "lightning_fabric",
    "lightning_utilities", "pytorch_lightning", "jsonargparse", "numpy", "matplotlib", "tokenizers", "rich",
    "yaml", "setuptools", "pip", "wheel", "pybind11", "ninja", "pytest", "ruff", "cookiecutter",
    "transformers", "datasets", "safetensors", "aten", "prim", "prims", "quantized", "c10d", "build", "dist",
}


def check_package_name(name: str) -> list[str]:
    """Problems with ``package_name``: it becomes the import name, the extension ``<name>._C``, the
    console script and the C++ ``TORCH_LIBRARY(<name>, m)`` namespace, so it must be a lowercase
    ASCII identifier that shadows nothing the project imports."""
    if not name.isidentifier():
        return [
            f"package_name {name!r} is not a Python identifier: use lowercase letters, digits and "
            f"underscores, not starting with a digit (for example {suggest(name)!r})"
        ]
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return [
            f"package_name {name!r} must be lowercase ASCII ([a-z_][a-z0-9_]*): it is also a C++ "
            f"identifier (the torch op namespace) and a console script (for example {suggest(name)!r})"
        ]
    if keyword.iskeyword(name):
        return [f"package_name {name!r} is a Python keyword; `import {name}` would be a syntax error"]
    if name == OLD_PACKAGE:
        return [f"package_name {name!r} is the template's own package; choose a new name"]
    if name in getattr(sys, "stdlib_module_names", ()):
        return [f"package_name {name!r} shadows the standard-library module {name!r}; choose another name"]
    if name in TAKEN:
        return [f"package_name {name!r} shadows a module the project uses ({name!r}); choose another name"]
    if (TEMPLATE_ROOT / name).exists():
        return [f"package_name {name!r} clashes with the template's top-level {name!r}; choose another name"]
    return []


def check_project_slug(slug: str) -> list[str]:
    """Problems with ``project_slug``: it names the project's directory and its distribution
    (``pyproject.toml``'s ``name``), so it must be a valid distribution name without spaces."""
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", slug):
        fixed = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "my-project"
        return [
            f"project_slug {slug!r} is not a valid directory/distribution name: use letters, digits, '-', "
            f"'_' and '.', starting and ending with a letter or digit (for example {fixed!r})"
        ]
    return []


def suggest(name: str) -> str:
    """A valid package name close to ``name``."""
    s = re.sub(r"[^a-z0-9_]+", "_", name.strip().lower()).strip("_") or "my_project"
    return f"_{s}" if s[0].isdigit() else s


def read_presets(configs: Path) -> dict[str, dict]:
    """``{preset: its model.config fields}`` from the template's ``configs/model/<preset>.yaml``."""
    presets: dict[str, dict] = {}
    for path in sorted(configs.glob("*.yaml")):
        try:
            config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model", {}).get("config")
        except yaml.YAMLError as exc:
            sys.exit(f"error: the template's {path} is not valid YAML: {exc}")
        if not isinstance(config, dict) or "num_layers" not in config:
            sys.exit(f"error: the template's {path} has no model.config block with num_layers")
        presets[path.stem] = config
    if not presets:
        sys.exit(f"error: the template has no model preset configs in {configs}")
    return presets


def valid_num_blocks(num_sublayers: int) -> list[int]:
    """Block counts that divide ``num_sublayers`` into blocks of an even size (whole decoder layers):
    ``attnres.model.config.valid_num_blocks``, which this hook cannot import (no torch here);
    ``tests/test_template.py`` holds the two equal."""
    return [n for n in range(1, num_sublayers + 1) if num_sublayers % n == 0 and num_sublayers // n % 2 == 0]


def check_model(answers: dict) -> list[str]:
    """Problems with the model answers: the preset exists and ``num_blocks`` (``preset``: the preset's
    own) splits its depth into blocks of whole decoder layers (checked whatever the residual mode, since
    it goes into the config)."""
    presets = read_presets(TEMPLATE_ROOT / PRESET_CONFIGS)
    preset = answers["model_preset"]
    if preset not in presets:
        return [f"model_preset {preset!r} is unknown; the presets are: {', '.join(presets)}"]
    raw = str(answers["num_blocks"]).strip()
    if raw == PRESET_DEFAULT:
        return []
    try:
        num_blocks = int(raw)
    except ValueError:
        return [f"num_blocks {raw!r} is not an integer (or {PRESET_DEFAULT!r}: the preset's own)"]
    layers = int(presets[preset]["num_layers"])
    valid = valid_num_blocks(2 * layers)
    if num_blocks not in valid:
        return [
            f"num_blocks={num_blocks} does not split preset {preset!r} ({layers} decoder layers = "
            f"{2 * layers} sublayers) into blocks of whole decoder layers; "
            f"valid: {', '.join(map(str, valid))}"
        ]
    return []


def main() -> None:
    problems = check_project_slug(str(ANSWERS["project_slug"]))
    problems += check_package_name(str(ANSWERS["package_name"])) + check_model(ANSWERS)
    mode = ANSWERS["residual_mode"]
    if mode not in ("block", "full", "standard"):
        problems.append(f"residual_mode {mode!r} is unknown; valid: block, full, standard")
    if not isinstance(ANSWERS["moe"], bool):
        problems.append(f"moe {ANSWERS['moe']!r} is not a yes/no answer")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
# {% endraw %}
