"""The first step's long waits: announced before they happen, and fla's autotuning shipped where we can.

On a fresh GPU the first training step of a KDA model can take minutes: fla's Triton kernels benchmark
their configurations once per shape ("autotuning", 150-245 s per KDA shape measured on an H200) before
they run, and ``torch.compile`` compiles the model. Neither prints anything by itself. Here:

* :func:`seed_autotune` copies the autotune results this package ships (``autotune/kda_sm<arch>.tgz``:
  Triton's ``*.autotune.json`` files, made on our GPUs with the fla and Triton versions named in
  ``autotune/README.md``) into Triton's cache directory, so the kernels skip the benchmarking. Triton
  keys each result by its kernel source, its own version and the GPU target; entries that do not match
  (other versions) are simply not used;
* :func:`first_step_notices` says, in one line each, what is about to take long and about how long.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import torch
from torch import nn

AUTOTUNE_DIR = Path(__file__).with_name("autotune")
# measured on one H200 (session 9 notes, issue 24): a fresh GPU's autotuning per KDA shape
AUTOTUNE_S_PER_SHAPE = (150, 245)


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels and autotune results (``TRITON_CACHE_DIR`` or its default)."""
    env = os.environ.get("TRITON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".triton" / "cache"


def _kda_archive(device: torch.device) -> Path | None:
    major, minor = torch.cuda.get_device_capability(device)
    path = AUTOTUNE_DIR / f"kda_sm{major}{minor}.tgz"
    return path if path.is_file() else None


def seed_autotune(device: torch.device, cache: Path | None = None) -> int:
    """Unpack the shipped autotune results for this GPU's architecture into Triton's cache (files that
    are already there are kept). Returns the number of results added."""
    archive = _kda_archive(device) if device.type == "cuda" else None
    if archive is None:
        return 0
    cache = triton_cache_dir() if cache is None else cache
    added = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            # members are triton/<key>/<kernel>.autotune.json; nothing else is written
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".autotune.json"):
                continue
            dst = cache / parts[1] / parts[2]
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(tar.extractfile(member).read())
            tmp.replace(dst)
            added += 1
    return added


def kda_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """The distinct (heads, head dim) of the KDA layers that run fla's kernels (each one autotunes)."""
    from attnres.model.kda import KimiDeltaAttention, fla_available

    shapes = set()
    for m in model.modules():
        if isinstance(m, KimiDeltaAttention) and m.backend != "torch" and fla_available():
            shapes.add((m.num_heads, m.head_dim))
    return shapes


# fla's intra-chunk KDA kernel, autotuned once per shape: its key starts (H, HV, K, ...) (fla 0.6)
_SHAPE_KERNEL = "chunk_kda_fwd_kernel_inter_solve_fused.autotune.json"


def tuned_kda_shapes(cache: Path) -> set[tuple[int, int]]:
    """The (heads, head dim) whose fla KDA autotune results Triton's cache ``cache`` holds (read from the
    key of fla's intra-chunk kernel, ``[H, HV, K, ...]``)."""
    shapes = set()
    for path in cache.glob(f"*/{_SHAPE_KERNEL}") if cache.is_dir() else ():
        try:
            key = json.loads(path.read_text(encoding="utf-8"))["key"]
            shapes.add((int(key[0]), int(key[2])))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # a result of another fla version or a damaged file: it tells us nothing
    return shapes


def first_step_notices(model: nn.Module, device: torch.device, compiled: bool, seeded: int = 0) -> list[str]:
    """One line for each long first-step wait ahead: fla's autotuning of the KDA shapes Triton's cache holds
    no results for, and ``torch.compile``."""
    notes = []
    shapes = kda_shapes(model) if device.type == "cuda" else set()
    if shapes:
        cache = triton_cache_dir()
        untuned = sorted(shapes - tuned_kda_shapes(cache))
        if untuned:
            lo, hi = (len(untuned) * s for s in AUTOTUNE_S_PER_SHAPE)
            names = ", ".join(f"{h} heads x {k}" for h, k in untuned)
            notes.append(
                f"first use of fla's KDA kernels at {names} on this GPU: Triton autotunes them before the "
                f"first step (~{lo}-{hi} s, measured on an H100/H200); the results are cached in {cache} "
                "for later runs"
            )
        elif seeded:
            notes.append(f"fla's KDA autotuning: {seeded} shipped result(s) put into {cache} (no tuning)")
    if compiled:
        notes.append(
            "torch.compile compiles the model during the first step (a minute or more for the GPU presets; "
            f"cached in {os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'the Inductor cache'} for later runs)"
        )
    return notes
