"""Cookiecutter pre-generation hook: check the answers before anything is generated.

A bad answer stops generation with one line per problem on stderr (and exit status 1), so a typo
never turns into a project that fails later at build or training time. The hook needs only the
standard library (cookiecutter may run from its own environment, without torch): the model presets
are read from the template's ``attnres/model/config.py`` with ``ast``, not imported.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import sys
from collections.abc import Callable
from pathlib import Path

# Rendered by cookiecutter: the answers, and the template's root (see hooks/template_source.py).
ANSWERS = json.loads(r"""{{ cookiecutter | jsonify }}""")
TEMPLATE_ROOT = Path(r"""{{ template_root }}""")

# {% raw %} (cookiecutter renders this file with Jinja; nothing below is templated)
OLD_PACKAGE = "attnres"
CONFIG_PY = Path(OLD_PACKAGE, "model", "config.py")
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


def read_presets(config_py: Path) -> tuple[dict[str, int], Callable[[int], list[int]]]:
    """``({preset: num_layers}, valid_num_blocks)`` from the model's config registry, by parsing it.

    ``PRESETS`` is a dict of ``dict(...)`` calls (or dict literals) of literal keyword values;
    a preset without ``num_layers`` takes the ``Config`` default. ``valid_num_blocks(num_sublayers)``
    is the model's own rule, compiled from its source alone (it is pure Python).
    """
    if not config_py.is_file():
        sys.exit(f"error: the template has no model preset registry at {config_py}")
    tree = ast.parse(config_py.read_text(encoding="utf-8"), str(config_py))
    presets_node = rule_node = None
    default_layers: int | None = None
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(getattr(t, "id", None) == "PRESETS" for t in targets):
            presets_node = node.value
        elif isinstance(node, ast.FunctionDef) and node.name == "valid_num_blocks":
            rule_node = node
        elif isinstance(node, ast.ClassDef) and node.name == "Config":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == "num_layers":
                    default_layers = ast.literal_eval(item.value)
    if not isinstance(presets_node, ast.Dict) or rule_node is None:
        sys.exit(f"error: cannot read PRESETS (a dict) and valid_num_blocks() from {config_py}")
    depths: dict[str, int] = {}
    for key, value in zip(presets_node.keys, presets_node.values):
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
            fields = {kw.arg: kw.value for kw in value.keywords}
        elif isinstance(value, ast.Dict):
            fields = {ast.literal_eval(k): v for k, v in zip(value.keys, value.values)}
        else:
            sys.exit(f"error: preset {ast.unparse(key)} in {config_py} is not dict(...) or a dict literal")
        layers = ast.literal_eval(fields["num_layers"]) if "num_layers" in fields else default_layers
        depths[ast.literal_eval(key)] = int(layers)
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=[rule_node], type_ignores=[]), str(config_py), "exec"), namespace)
    return depths, namespace["valid_num_blocks"]  # type: ignore[return-value]


def check_model(answers: dict) -> list[str]:
    """Problems with the model answers: the preset exists and ``num_blocks`` splits its depth into
    blocks of whole decoder layers (checked whatever the residual mode, since it goes into the config)."""
    depths, valid_num_blocks = read_presets(TEMPLATE_ROOT / CONFIG_PY)
    preset = answers["model_preset"]
    if preset not in depths:
        return [f"model_preset {preset!r} is unknown; the presets are: {', '.join(depths)}"]
    raw = str(answers["num_blocks"]).strip()
    try:
        num_blocks = int(raw)
    except ValueError:
        return [f"num_blocks {raw!r} is not an integer"]
    layers = depths[preset]
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
