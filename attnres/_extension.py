"""Loading ``attnres._C``, and what to say when it cannot be loaded.

A C++ extension is compiled against one torch release's C++ ABI; under another release it fails to
load (an undefined symbol) or, worse, misbehaves. So the build records the torch it used
(``attnres/_build_info.json``, written by setup.py), and loading refuses a different release with an
ImportError that names both versions and the fix. Only where no extension was built at all (a source
checkout used in place) do the ops fall back to :mod:`attnres.reference`, with one warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import warnings
from pathlib import Path

import torch

BUILD_INFO = Path(__file__).with_name("_build_info.json")
REBUILD = (
    "rebuild attnres against the torch you run: `pip install --no-build-isolation --force-reinstall "
    "--no-deps <attnres source dir or sdist>` (or `make install` in a checkout)"
)


def build_info() -> dict | None:
    """What the build recorded (torch version, CUDA kernels, archs), or None without a build record."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``2.13.0+cpu``: the unit of its C++ ABI."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def mismatch(
    info: dict | None, runtime: str = torch.__version__, runtime_cuda: str | None = torch.version.cuda
) -> str | None:
    """Why a build described by ``info`` cannot run under this torch, or None if nothing says it can't."""
    if not info or "torch" not in info:
        return None
    built = info["torch"]
    if release(built) != release(runtime):
        same = built.split("+")[0]
        return (
            f"attnres._C was compiled against torch {built}, but torch {runtime} is installed; "
            f"{REBUILD}, or install the torch it was built for (pip install 'torch=={same}')"
        )
    if info.get("cuda") and runtime_cuda is None:
        return (
            f"attnres._C holds CUDA kernels (built with torch {built}, CUDA {info.get('torch_cuda')}), "
            f"but torch {runtime} is a CPU build; install a CUDA build of torch, or {REBUILD}"
        )
    return None


def load() -> str | None:
    """Import ``attnres._C`` (registers ``torch.ops.attnres.*``). Returns None when loaded, or the reason
    it is absent when no extension was built (the reference fallback, with a warning); raises
    ImportError when one was built but cannot run under this torch."""
    if importlib.util.find_spec("attnres._C") is None:
        reason = "not built"
        warnings.warn(
            "attnres._C is not built: the depth-attention ops run the PyTorch reference (slow). "
            "Build it with `pip install .` (or `pip install --no-build-isolation -e .` in a checkout)",
            stacklevel=3,
        )
        return reason
    info = build_info()
    why = mismatch(info)
    if why is not None:
        raise ImportError(why)
    try:
        importlib.import_module("attnres._C")
    except ImportError as exc:
        built = info["torch"] if info else "an unrecorded torch"
        raise ImportError(
            f"attnres._C (compiled against {built}) failed to load under torch {torch.__version__}: {exc}; "
            f"{REBUILD}"
        ) from exc
    return None
