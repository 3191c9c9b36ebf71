"""Build ``attnres._C``: the depth-attention ops (CPU always, CUDA when possible).

ATTNRES_CUDA=auto (default) builds the CUDA sources when torch was built with CUDA and nvcc is
found; ATTNRES_CUDA=1 requires them (and fails loudly otherwise); ATTNRES_CUDA=0 skips them.
The CUDA architectures come from TORCH_CUDA_ARCH_LIST (for example ``9.0`` for H100/H200).
"""

import os
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _cuda_wanted() -> bool:
    mode = os.environ.get("ATTNRES_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ATTNRES_CUDA={mode!r} is not valid: use auto, 0 or 1")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        why = (
            "torch has no CUDA (torch.version.cuda is None)"
            if torch.version.cuda is None
            else "nvcc not found"
        )
        sys.exit(
            f"ATTNRES_CUDA=1 but {why}; install a CUDA build of torch and the CUDA toolkit, "
            "or use ATTNRES_CUDA=0"
        )
    return mode == "1" or (mode == "auto" and available)


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def extension():
    sources = _rel(list(CSRC.glob("*.cpp")) + list((CSRC / "cpu").glob("*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wno-unused-function"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if _cuda_wanted():
        cuda_sources = _rel(list((CSRC / "cuda").glob("*.cu")) + list((CSRC / "cuda").glob("*.cpp")))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "attnres._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DATTNRES_WITH_CUDA"], "nvcc": nvcc + ["-DATTNRES_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=True,
        )
    return CppExtension(
        "attnres._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
