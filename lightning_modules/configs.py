"""Finding a config by name: ``attnres fit -c default`` works from a wheel install, outside a checkout.

The YAML files of ``configs/`` ship inside the wheel as the data package ``attnres_configs`` (setup.py
maps it to ``configs/``). A ``-c`` value that is an existing file is used as it is; otherwise it is
looked up there, as ``default``, ``default.yaml``, ``model/small`` or ``configs/model/small.yaml``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CONFIG_FLAGS = ("-c", "--config")


def config_root() -> Path | None:
    """The shipped configs: the installed ``attnres_configs`` package, else ``configs/`` beside the
    package sources (a checkout used in place)."""
    spec = importlib.util.find_spec("attnres_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    here = Path(__file__).resolve().parent.parent / "configs"
    return here if here.is_dir() else None


def available() -> list[str]:
    """The shipped config names, relative to the root, without ``.yaml`` (``default``, ``model/small``)."""
    root = config_root()
    if root is None:
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve(value: str) -> str:
    """The path of config ``value``: ``value`` itself when it is a file (or not a name we ship)."""
    if Path(value).is_file():
        return value
    root = config_root()
    if root is None:
        return value
    name = value.removeprefix("configs/")
    for candidate in (name, f"{name}.yaml"):
        path = root / candidate
        if path.is_file():
            return str(path)
    return value


def resolve_args(argv: list[str]) -> list[str]:
    """``argv`` with each ``-c X`` / ``--config X`` / ``--config=X`` resolved by :func:`resolve`."""
    out: list[str] = []
    expect = False
    for arg in argv:
        if expect:
            out.append(resolve(arg))
            expect = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out
