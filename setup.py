"""Build ``attnres._C``: the depth-attention ops (CPU always, CUDA when possible).

ATTNRES_CUDA=auto (default) builds the CUDA sources when torch was built with CUDA, nvcc is found and
there is an architecture to build for: a visible GPU, or TORCH_CUDA_ARCH_LIST (for example ``9.0`` for
H100/H200); otherwise it builds the CPU kernels and prints one line saying why. ATTNRES_CUDA=1 requires
the CUDA kernels (and fails loudly otherwise); ATTNRES_CUDA=0 skips them.

The wheel is tied to the torch it was compiled against (C++ extensions use torch's C++ ABI, which
changes between releases): its ``torch`` requirement is pinned to that release (``X.Y.*``), and
``attnres/_build_info.json`` records it so that ``import attnres`` can name both versions on a mismatch.
Build against the torch already installed with ``pip install --no-build-isolation .``.
"""

import json
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
NAME = "attnres"

# The run-time dependencies besides torch (whose pin is added from the torch this build uses).
REQUIRES = [
    "lightning>=2.5",
    "torchmetrics>=1.4",
    "jsonargparse[signatures]>=4.32",
    "matplotlib>=3.8",
    "tokenizers>=0.19",
    "rich>=13",
    "numpy>=1.26",
    "safetensors>=0.4",
]


def say(message: str) -> None:
    """One line on stderr (pip shows a build's stderr with -v, and always when the build fails)."""
    print(f"{NAME} setup: {message}", file=sys.stderr)


def torch_pin(version: str) -> str:
    """``torch>=X.Y,<X.Y+1`` for torch ``X.Y.Z[+local]``: the release this build's C++ ABI belongs to."""
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", version).groups())
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def cuda_plan(torch, cuda_home) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) from ATTNRES_CUDA, torch's CUDA, nvcc, and the architectures."""
    mode = os.environ.get("ATTNRES_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ATTNRES_CUDA={mode!r} is not valid: use auto, 0 or 1")
    if mode == "0":
        return False, "ATTNRES_CUDA=0"
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} has no CUDA (a CPU build)"
    elif cuda_home is None:
        missing = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        missing = "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (e.g. TORCH_CUDA_ARCH_LIST=9.0)"
    if missing is None:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "of the visible GPUs"
        return True, f"CUDA {torch.version.cuda}, archs {archs}"
    if mode == "1":
        sys.exit(f"ATTNRES_CUDA=1 but {missing}; fix that, or build the CPU kernels only with ATTNRES_CUDA=0")
    return False, missing


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def record_build(torch, cuda: bool) -> None:
    """attnres/_build_info.json: what this build holds, for the import-time check and `attnres info`."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": cuda,
        "cuda_arch_list": (os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs") if cuda else None,
    }
    (ROOT / "attnres" / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")


def extension_and_pin():
    """(the extension, the torch requirement): torch is imported only here, so that building an sdist
    (which compiles nothing) works without it."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = _rel(list(CSRC.glob("*.cpp")) + list((CSRC / "cpu").glob("*.cpp")))
    # no -std flag: torch's extension builder adds the standard its headers need (C++20 from 2.13)
    cxx = ["-O3", "-fopenmp", "-Wno-unused-function"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    cuda, why = cuda_plan(torch, CUDA_HOME)
    say(f"torch {torch.__version__}; " + ("building the CPU and CUDA kernels (" if cuda else
        "building the CPU kernels only: ") + why + (")" if cuda else ""))
    record_build(torch, cuda)
    common = dict(extra_link_args=["-fopenmp"], define_macros=define_macros, py_limited_api=True)
    if cuda:
        cuda_sources = _rel(list((CSRC / "cuda").glob("*.cu")) + list((CSRC / "cuda").glob("*.cpp")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "attnres._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DATTNRES_WITH_CUDA"], "nvcc": nvcc + ["-DATTNRES_WITH_CUDA"]},
            **common,
        )
    else:
        ext = CppExtension("attnres._C", sources, extra_compile_args={"cxx": cxx}, **common)
    return ext, torch_pin(torch.__version__)


def wants_extension() -> bool:
    """False for the commands that compile nothing (sdist, egg_info for an sdist, --help)."""
    return not any(cmd in sys.argv[1:] for cmd in ("sdist", "--help", "--help-commands", "clean"))


# configs/ ships inside the wheel as the data package attnres_configs (`attnres fit -c default` finds it)
CONFIG_DIRS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*") if p.is_dir())
config_packages = {"attnres_configs": "configs"}
config_packages.update({"attnres_configs." + ".".join(d.parts[1:]): str(d) for d in CONFIG_DIRS})

kwargs = {}
if wants_extension():
    from torch.utils.cpp_extension import BuildExtension

    ext, pin = extension_and_pin()
    kwargs = dict(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
else:
    pin = "torch>=2.11"

setup(
    packages=find_packages(include=["attnres", "attnres.*", "lightning_modules", "lightning_modules.*"])
    + sorted(config_packages),
    package_dir=config_packages,
    package_data={
        "attnres": ["_build_info.json", "py.typed"],
        "lightning_modules": ["autotune/*.tgz", "autotune/README.md"],
        **{p: ["*.yaml"] for p in config_packages},
    },
    install_requires=[pin, *REQUIRES],
    **kwargs,
)
