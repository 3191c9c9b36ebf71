"""Cookiecutter post-generation hook: derive the new project from the template repository's own files.

The repository is a working project at its root; the template folder holds only what is
template-only (the README head). This hook copies the root files into the generated
project (what git tracks or would track, so build outputs, virtual environments and logs stay
behind; without git, a walk that skips them), leaving out the template machinery itself, then:

* renames the package ``attnres`` everywhere it is a name: the package directory, imports, the
  extension ``attnres._C``, the op namespace (``TORCH_LIBRARY(attnres``, ``torch.ops.attnres``,
  ``"attnres::``), the console script, the ``ATTNRES_*`` environment variables and macros, file
  names, the Makefile, configs and README (the method's name ``AttnRes`` stays);
* writes the answers into ``pyproject.toml`` (description, author, license), ``setup.py`` (the
  CUDA build default), ``configs/default.yaml`` (preset, residual mode, num_blocks, MoE) and the
  per-preset ``configs/model/*.yaml`` (residual mode and MoE; num_blocks in the chosen preset's);
* appends the template README's sections (renamed) to the generated README's quick start, without the
  blocks between ``<!-- template-only -->`` and ``<!-- /template-only -->`` (the template's own measured
  results);
* writes the chosen licence's full text into ``LICENSE`` (from ``hooks/licenses/<answer>.txt``);
* for a preset that needs a GPU (any but ``tiny``), makes ``make train`` compose the preset's model
  config and the GPU trainer config, so it trains in bf16 on the GPUs, or on a machine without one
  stops at once (Lightning: no GPU for ``trainer.accelerator: gpu``) instead of running the model in
  fp32 on the CPU for hours.

Every edit of a file it expects to find fails loudly (exit 1, message on stderr) when the text it
edits is missing, so a change at the template's root that the hook does not follow is caught by
``tests/test_template.py`` rather than producing a quietly wrong project.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import yaml  # a dependency of cookiecutter itself

# Rendered by cookiecutter: the answers, and the template's root (see hooks/template_source.py).
ANSWERS = json.loads(r"""{{ cookiecutter | jsonify }}""")
TEMPLATE_ROOT = Path(r"""{{ template_root }}""")

# {% raw %} (cookiecutter renders this file with Jinja; nothing below is templated)
OLD = "attnres"
PKG = str(ANSWERS["package_name"])
CUDA_DEFAULT = {"auto": "auto", "yes": "1", "no": "0"}[ANSWERS["cuda_kernels"]]

# Not part of a generated project: the template machinery, and the template's own results (its committed
# benchmark results, the study that produced docs/results.md, and the study's test). configs/study stays:
# `attnres bench e2e` times its model files (shapes s and m).
TEMPLATE_ONLY = {"cookiecutter.json", "hooks", "tests/test_template.py", "docs/template.md",
                 "benchmarks/results", "benchmarks/study", "tests/test_study.py", "docs/results.md",
                 "docs/study_plan.md", "docs/images/study"}
# README.md: lines from a START to its END marker line are the template's own (its results).
TEMPLATE_ONLY_START, TEMPLATE_ONLY_END = "<!-- template-only -->", "<!-- /template-only -->"
# Build outputs, environments, caches and logs, for the walk without git (and as a safety net).
SKIP_ANYWHERE = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
                 ".ipynb_checkpoints"}
SKIP_TOP = {"build", "dist", "runs", "lightning_logs", ".cache", ".whl", ".gl", ".eggs"}
SKIP_SUFFIXES = {".so", ".pyd", ".pyc", ".pyo", ".o", ".ckpt", ".egg-info"}
# Presets a CPU trains in minutes; the others get the GPU set-up for ``make train``.
CPU_PRESETS = {"tiny"}
# README sections of the template that a generated project does not inherit (it has its own).
README_OWN_SECTIONS = {"quick start", "start your own project"}

# third-party names that contain the word and must stay: fla's module and op (``fla.ops.attnres``,
# ``fused_attnres``); its autograd class ``FusedAttnresFunction`` is left alone by case already
_LOWER = re.compile(rf"(?<![A-Za-z0-9])(?<!fla\.ops\.)(?<!fused_){OLD}(?![A-Za-z0-9])")
_UPPER = re.compile(rf"(?:(?<=-D)|(?<![A-Za-z0-9])){OLD.upper()}(?![A-Za-z0-9])")  # also -DATTNRES_...


class HookError(Exception):
    """A file of the template is not as this hook expects it."""


def rename(text: str) -> str:
    """``attnres`` -> the new package name wherever it stands as a name (``attnres._C``,
    ``torch.ops.attnres``, ``attnres::``, ``test_attnres_x``) and ``ATTNRES_CUDA`` -> ``<PKG>_CUDA``;
    a longer word that merely contains it (``AttnRes``, ``BlockAttnRes``) and fla's names
    (``fla.ops.attnres``, ``fused_attnres``) are left alone."""
    return _UPPER.sub(PKG.upper(), _LOWER.sub(PKG, text))


# ----------------------------------------------------------------------------- which files


def is_copied(rel: PurePosixPath) -> bool:
    parts = rel.parts
    template_only = any("/".join(parts[:k]) in TEMPLATE_ONLY for k in range(1, len(parts) + 1))
    if template_only or parts[0].startswith("{{"):
        return False
    if parts[0] in SKIP_TOP or any(p in SKIP_ANYWHERE or p.endswith(".egg-info") for p in parts):
        return False
    return rel.suffix not in SKIP_SUFFIXES


def source_files(root: Path) -> list[PurePosixPath]:
    """The template's files relative to ``root``: tracked or untracked-but-not-ignored when ``root``
    is in a git work tree (a local checkout, or cookiecutter's clone of a git URL), else all files."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True,
        ).stdout.decode()
        rels = [PurePosixPath(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_ANYWHERE]
            rels += [PurePosixPath(Path(dirpath, f).relative_to(root).as_posix()) for f in filenames]
    return sorted(r for r in rels if is_copied(r) and (root / r).is_file())


def rename_path(rel: PurePosixPath) -> PurePosixPath:
    return PurePosixPath(*(rename(p) for p in rel.parts))


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (copied as bytes, never renamed)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def copy_tree(root: Path, dst: Path) -> str:
    """Copy and rename the template's files into ``dst``; returns the template README's text
    (renamed). A file that the template folder already rendered into ``dst`` wins."""
    readme = ""
    for rel in source_files(root):
        src, out = root / rel, dst / rename_path(rel)
        text = read_text(src)
        if rel == PurePosixPath("README.md"):
            readme = rename(text or "")
            continue
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            shutil.copyfile(src, out)
        else:
            out.write_bytes(rename(text).encode("utf-8"))  # line endings as they are
        shutil.copymode(src, out)
    return readme


# ----------------------------------------------------------------------------- edits


def replace_one(text: str, pattern: str, repl: str, where: str) -> str:
    """Replace the one match of ``pattern`` (multiline); a missing or ambiguous match is an error."""
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n != 1:
        raise HookError(f"{where}: expected exactly one match of {pattern!r}, found {n}")
    return new


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def edit_pyproject(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    where, m = "pyproject.toml", re.MULTILINE
    description, author = (toml_str(ANSWERS[k]) for k in ("description", "author"))
    text = replace_one(text, r'^description = ".*"$', f"description = {description}", where)
    # PEP 639: an SPDX expression (a proprietary licence has no SPDX id: LicenseRef- is the escape)
    spdx = "LicenseRef-Proprietary" if ANSWERS["license"] == "Proprietary" else ANSWERS["license"]
    text = replace_one(text, r"^license = .*$", f"license = {toml_str(spdx)}", where)
    text = replace_one(text, r"^authors = \[.*\]$", f"authors = [{{ name = {author} }}]", where)
    # the template machinery's own entries: its extra, cookiecutter in dev, the template folder's exclude
    text = re.sub(r"^template = \[.*\]\n", "", text, flags=m)
    text = re.sub(r'^(dev = \[.*?)(, *"cookiecutter[^"]*"|"cookiecutter[^"]*", *)', r"\1", text, flags=m)
    text = re.sub(r"^extend-exclude = \[\"\{\{cookiecutter\.project_slug\}\}\"\]\n", "", text, flags=m)
    path.write_text(text, encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the edits above are still checked by their exact match
        return
    project = tomllib.loads(text)["project"]
    if project["scripts"].get(PKG) != "lightning_modules.main:main" or project["name"] != PKG:
        raise HookError(f"{where}: the project name or console script is not {PKG!r}: {project}")


def edit_setup(path: Path) -> None:
    """The default of ``<PKG>_CUDA`` (the variable setup.py reads) becomes the answer."""
    text = path.read_text(encoding="utf-8")
    var = f"{PKG.upper()}_CUDA"
    pattern = rf'^(\s*)(.*os\.environ\.get\(\s*"{var}"\s*,\s*)"auto"'
    note = rf"\1# this project's default ({var} unset), chosen when it was generated\n"
    text = replace_one(text, pattern, note + rf'\1\2"{CUDA_DEFAULT}"', "setup.py")
    text = text.replace(f"{var}=auto (default)", f"{var}=auto")
    path.write_text(text, encoding="utf-8")


def yaml_scalar(value: object) -> str:
    """``value`` as a YAML flow scalar: plain where YAML reads it back as the same string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", text) and yaml.safe_load(text) == text
    return text if plain else json.dumps(text)


def set_yaml_key(text: str, path: tuple[str, ...], value: object) -> str:
    """Set the scalar at ``path`` (nested block-mapping keys) in YAML ``text``, line by line so that
    comments and layout stay. A missing key is added at the end of its mapping (and missing parents
    with it); the caller reads the result back with a YAML parser, so a key this cannot place (under
    a flow mapping, say) is an error, never a silent no-op."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    lo, hi, parent_indent = 0, len(lines), -2
    for depth, key in enumerate(path):
        # the keys of this mapping are the content lines at the indent of its first content line
        content = [(i, ind) for i in range(lo, hi) if (ind := _indent_of(lines[i])) is not None]
        level = content[0][1] if content else parent_indent + 2
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*:(.*)$")
        at_level = (i for i, ind in content if ind == level)
        match = next(((i, m) for i in at_level if (m := pattern.match(lines[i].rstrip()))), None)
        if match is None:  # add the key (and the rest of the path) at the end of this mapping
            at = content[-1][0] + 1 if content else lo
            rest = path[depth:]
            lines[at:at] = [f"{' ' * (level + 2 * d)}{k}:\n" for d, k in enumerate(rest[:-1])] + [
                f"{' ' * (level + 2 * (len(rest) - 1))}{rest[-1]}: {yaml_scalar(value)}\n"
            ]
            return "".join(lines)
        i, m = match
        if depth == len(path) - 1:
            comment = re.search(r"\s+#.*$", m.group(1))
            lines[i] = f"{' ' * level}{key}: {yaml_scalar(value)}{comment.group(0) if comment else ''}\n"
            return "".join(lines)
        lo, parent_indent = i + 1, level
        hi = next((j for j, ind in content if j > i and ind <= level), hi)
    raise AssertionError("unreachable: path is not empty")


def _indent_of(line: str) -> int | None:
    """Indent of a line that holds content (None for blank and comment-only lines)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return len(line) - len(line.lstrip())


# The model answers: the preset (whose configs/model/<preset>.yaml block becomes default.yaml's) and
# Config fields, ``model.config.<key>`` in the configs (``model.init_args.config.<key>`` when the config
# names the model's class_path). num_blocks "preset": the preset's own.
PRESET = str(ANSWERS["model_preset"])
_PRESET_FILE = TEMPLATE_ROOT / "configs" / "model" / f"{PRESET}.yaml"
_PRESET_CONFIG = yaml.safe_load(_PRESET_FILE.read_text(encoding="utf-8"))["model"]["config"]
_NUM_BLOCKS = str(ANSWERS["num_blocks"]).strip()
MODEL_ANSWERS = {
    "residual": str(ANSWERS["residual_mode"]),
    "num_blocks": int(_PRESET_CONFIG["num_blocks"] if _NUM_BLOCKS == "preset" else _NUM_BLOCKS),
    "moe": bool(ANSWERS["moe"]),
}
# `model:`'s `config:` key and the lines of its body (deeper, or comments/blank lines among them)
CONFIG_BLOCK = re.compile(r"^(  config:\n)((?:    .*\n|\s*\n)*)", re.MULTILINE)


def load_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HookError(f"{where}: not valid YAML after editing the model keys: {exc}") from exc
    if not isinstance(data, dict):
        raise HookError(f"{where}: expected a mapping at the top, got {type(data).__name__}")
    return data


def edit_config(
    path: Path, answers: dict[str, object], describe: bool = False, block: str | None = None
) -> None:
    """Write ``answers`` as ``model.config`` fields of the config at ``path`` (after replacing the body of
    its ``model.config`` with ``block``, when given) and read them back."""
    where = path.relative_to(Path.cwd()).as_posix()
    if not path.is_file():
        raise HookError(f"{where} not found")
    text = path.read_text(encoding="utf-8")
    if block is not None:
        match = CONFIG_BLOCK.search(text)
        if match is None:
            raise HookError(f"{where}: no `  config:` block under `model:` to write the {PRESET} preset into")
        text = text[: match.start(2)] + block + text[match.end(2) :]
    model = load_yaml(text, where).get("model")
    base = ("model", "init_args") if isinstance(model, dict) and "init_args" in model else ("model",)
    base = (*base, "config")
    for key, value in answers.items():
        text = set_yaml_key(text, (*base, key), value)
    if describe:
        text = describe_model(text)
    data = load_yaml(text, where)
    for key, value in answers.items():
        got = data
        for k in (*base, key):
            got = got.get(k) if isinstance(got, dict) else None
        if got != value or type(got) is not type(value):
            raise HookError(f"{where}: {'.'.join((*base, key))} reads back as {got!r}, not {value!r}")
    path.write_text(text, encoding="utf-8")


def edit_configs(configs: Path) -> None:
    """``default.yaml`` gets every model answer. The per-preset model configs (``model/*.yaml``, composed
    on top of it) get the project-wide ones, residual mode and MoE, so that composing one does not
    switch them back; the chosen preset's own file gets its ``num_blocks`` too."""
    match = CONFIG_BLOCK.search((configs / "model" / f"{PRESET}.yaml").read_text(encoding="utf-8"))
    if match is None:
        raise HookError(f"configs/model/{PRESET}.yaml: no `  config:` block under `model:`")
    edit_config(configs / "default.yaml", MODEL_ANSWERS, describe=True, block=match.group(2))
    for path in sorted((configs / "model").glob("*.y*ml")):
        model = load_yaml(path.read_text(encoding="utf-8"), path.name).get("model")
        if not isinstance(model, dict):
            continue
        keys = ("residual", "moe", "num_blocks") if path.stem == PRESET else ("residual", "moe")
        edit_config(path, {k: MODEL_ANSWERS[k] for k in keys})


def model_summary() -> str:
    """The model answers in words, as the README head says them."""
    residual = {"block": f"Block AttnRes ({MODEL_ANSWERS['num_blocks']} blocks)", "full": "Full AttnRes",
                "standard": "the standard residual"}[MODEL_ANSWERS["residual"]]
    mlp = "MoE" if MODEL_ANSWERS["moe"] else "dense SwiGLU"
    return f"the {PRESET} preset with {residual} and {mlp} channel mixers"


def describe_model(text: str) -> str:
    """Replace the config's leading comment (which describes the template's default model) by one
    that describes the chosen one; its ``Compose ...`` usage line stays."""
    lines = text.splitlines(keepends=True)
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    kept = [line for line in lines[:n] if line.startswith("# Compose")]
    head = f"# `make train`: {model_summary()}\n# (the answers given when this project was generated).\n"
    return "".join([head, *kept, *lines[n:]])


def strip_template_only(text: str) -> str:
    """``text`` without its template-only blocks (each from a ``TEMPLATE_ONLY_START`` line to the next
    ``TEMPLATE_ONLY_END`` line, both included); an unclosed or stray marker is an error."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        marker = line.strip()
        if marker == TEMPLATE_ONLY_START:
            if inside:
                raise HookError(f"README.md:{number}: {TEMPLATE_ONLY_START} inside another such block")
            inside = True
        elif marker == TEMPLATE_ONLY_END:
            if not inside:
                raise HookError(f"README.md:{number}: {TEMPLATE_ONLY_END} without a {TEMPLATE_ONLY_START}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise HookError(f"README.md: a {TEMPLATE_ONLY_START} block is not closed")
    return "".join(out)


def compose_readme(path: Path, template_readme: str) -> None:
    """Append the template README's sections (from its first ``##`` heading, without the title, the
    intro, the sections a generated project has its own of and the template-only blocks) to the
    rendered README head."""
    sections: list[list[str]] = []
    fenced = False
    for line in strip_template_only(template_readme).splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if line.startswith("## ") and not fenced:
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    own = README_OWN_SECTIONS
    kept = ["".join(s).rstrip() + "\n" for s in sections if s[0][3:].strip().lower() not in own]
    head = path.read_text(encoding="utf-8").rstrip() + "\n"
    path.write_text("\n".join([head, *kept]), encoding="utf-8")


def write_license(path: Path) -> None:
    """``LICENSE``: the full text of the chosen licence (``hooks/licenses/<answer>.txt``), with this
    year and the author in its copyright line (MIT, BSD-3-Clause, Proprietary) or one put before it
    (Apache-2.0 and the GPL, whose texts are reproduced verbatim)."""
    source = TEMPLATE_ROOT / "hooks" / "licenses" / f"{ANSWERS['license']}.txt"
    if not source.is_file():
        raise HookError(f"no licence text for license={ANSWERS['license']!r} (expected {source})")
    text = source.read_text(encoding="utf-8")
    year, holder = str(datetime.datetime.now(datetime.timezone.utc).year), str(ANSWERS["author"])
    if "{holder}" in text:
        text = text.replace("{year}", year).replace("{holder}", holder)
    else:
        text = f"Copyright (c) {year} {holder}\n\n{text}"
    path.write_text(text, encoding="utf-8")


def gpu_train_config(makefile: Path, configs: Path) -> None:
    """``make train`` of a GPU preset: the default config, the preset's model config (its sequence
    length and batch) and the GPU trainer config (bf16 on every GPU of the host, compiled)."""
    preset = PRESET
    model_yaml, gpu_yaml = f"configs/model/{preset}.yaml", "configs/trainer/gpu.yaml"
    for rel in (model_yaml, gpu_yaml):
        if not (configs.parent / rel).is_file():
            raise HookError(f"{rel} not found (make train of the {preset} preset composes it)")
    text = makefile.read_text(encoding="utf-8")
    composed = f"configs/default.yaml -c {model_yaml} -c {gpu_yaml}"
    note = f"# the {preset} preset needs a GPU: bf16 on every GPU of the host (CONFIG=... to change)\n"
    text = replace_one(text, r"^CONFIG \?= configs/default\.yaml$", f"{note}CONFIG ?= {composed}", "Makefile")
    text = replace_one(text, r"^(train: .*## install, then train) configs/default\.yaml",
                       rf"\1 the {preset} preset on the GPUs", "Makefile")
    makefile.write_text(text, encoding="utf-8")


def main() -> None:
    dst = Path.cwd()
    try:
        readme = copy_tree(TEMPLATE_ROOT, dst)
        if not (dst / PKG / "__init__.py").is_file():
            raise HookError(f"the package {OLD}/ was not found in the template at {TEMPLATE_ROOT}")
        edit_pyproject(dst / "pyproject.toml")
        edit_setup(dst / "setup.py")
        edit_configs(dst / "configs")
        compose_readme(dst / "README.md", readme)
        write_license(dst / "LICENSE")
        if PRESET not in CPU_PRESETS:
            gpu_train_config(dst / "Makefile", dst / "configs")
    except HookError as exc:
        sys.exit(f"error: generating from {TEMPLATE_ROOT}: {exc}")
    where = "" if PRESET in CPU_PRESETS else " (on a machine with a CUDA GPU)"
    print(f"{ANSWERS['project_name']} (package {PKG}) is in {dst}")
    print(f"quick start: cd {dst} && make train{where}")


if __name__ == "__main__":
    main()
# {% endraw %}
