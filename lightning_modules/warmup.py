"""The first step's long waits: announced before they happen, and fla's autotuning shipped where we can.

On a fresh GPU the first training step of a KDA model can take minutes: fla's Triton kernels benchmark
their configurations once per shape ("autotuning", 150-245 s per KDA shape measured on an H200) before
they run, and ``torch.compile`` compiles the model. Neither prints anything by itself. Here:

* :func:`seed_autotune` copies the autotune results this package ships (``autotune/kda_sm<arch>.tgz``:
  Triton's ``*.autotune.json`` files, made on our GPUs with the fla and Triton versions named in
  ``autotune/README.md``) into Triton's cache directory, so the kernels skip the benchmarking. Triton
  keys each result by its kernel source, its own version and the GPU target; entries that do not match
  (other versions) are simply not used;
* :func:`pin_untuned_kda`: for a KDA shape those results do not cover, fla's autotuned kernels take the
  fastest configuration of the nearest tuned shape (same head dim first) instead of benchmarking, so the
  first step of any preset starts within seconds; ``ATTNRES_KDA_AUTOTUNE=1`` autotunes instead, and
  ``ATTNRES_KDA_AUTOTUNE=0`` never autotunes (a shape with no tuned neighbour, e.g. on a GPU we ship no
  results for, takes each kernel's first configuration that launches);
* :func:`first_step_notices` says, in one line each, what is about to take long and about how long.

fla 0.6 has a config cache of its own (``FLA_CACHE_MODE`` / ``FLA_CONFIG_DIR``, ``fla.ops.utils.cache``),
not used here because: its mode is read once, when fla is first imported (a library cannot count on
setting it first in a user's process); its fuzzy match takes the first entry of the same key layout
whatever its numbers (a head dim 64 configuration for a head dim 128 key), where the nearest key of the
same head dim is what carries over; and a cached configuration that fails to compile at the new shape
raises instead of falling back to tuning. Triton's own ``*.autotune.json`` results, which these
functions reuse, are what any GPU run writes (``TRITON_CACHE_DIR``), so collecting more needs no tool.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import math
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

AUTOTUNE_DIR = Path(__file__).with_name("autotune")
# measured on one H200 (session 9 notes, issue 24): a fresh GPU's autotuning per KDA shape
AUTOTUNE_S_PER_SHAPE = (150, 245)
# the versions the shipped results were made with (autotune/README.md): their configurations are reused
# for other shapes only with the same kernels
PIN_VERSIONS = {"fla-core": "0.6.0", "triton": "3.6"}


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


def untuned_kda_shapes(model: nn.Module, device: torch.device) -> list[tuple[int, int]]:
    """The model's fla KDA shapes (heads, head dim) that Triton's cache holds no autotune results for."""
    shapes = kda_shapes(model) if device.type == "cuda" else set()
    return sorted(shapes - tuned_kda_shapes(triton_cache_dir())) if shapes else []


def never_tune() -> bool:
    """``ATTNRES_KDA_AUTOTUNE=0``: fla's kernels never benchmark; a key with no tuned neighbour takes the
    kernel's first configuration that launches (:func:`pin_untuned_kda` with ``untuned="first"``)."""
    return os.environ.get("ATTNRES_KDA_AUTOTUNE") == "0"


def first_step_notices(model: nn.Module, device: torch.device, compiled: bool | str, seeded: int = 0,
                       pinned: bool = False, dtype: torch.dtype = torch.float32) -> list[str]:
    """One line for each long first-step wait ahead: fla's autotuning of the KDA shapes Triton's cache holds
    no results for (or, ``pinned``, that they take the nearest tuned shape's configurations), and
    ``torch.compile`` (``compiled``: ``True``, ``"regional"``, ``"reduce-overhead"``, ``"nested"`` or
    ``False``). ``dtype``: the dtype the sublayers compute in (bf16 under ``bf16-mixed``)."""
    notes = []
    shapes = kda_shapes(model) if device.type == "cuda" else set()
    if shapes:
        cache = triton_cache_dir()
        untuned = untuned_kda_shapes(model, device)
        names = ", ".join(f"{h} heads x {k}" for h, k in untuned)
        lo_s, hi_s = AUTOTUNE_S_PER_SHAPE
        if untuned and pinned and never_tune():
            notes.append(
                f"fla's KDA kernels at {names}: no autotune results for this shape on this GPU; "
                "ATTNRES_KDA_AUTOTUNE=0: no autotuning, each kernel takes the nearest tuned shape's "
                "configuration, else its own first one (a quick first step; the steps may be slower)")
        elif untuned and pinned:
            notes.append(
                f"fla's KDA kernels at {names}: no autotune results for this shape on this GPU; they take "
                "the configurations tuned for the nearest shipped shape (no autotuning; "
                f"ATTNRES_KDA_AUTOTUNE=1 tunes them instead, ~{lo_s}-{hi_s} s once)")
        elif untuned:
            lo, hi = (len(untuned) * s for s in AUTOTUNE_S_PER_SHAPE)
            notes.append(
                f"first use of fla's KDA kernels at {names} on this GPU: Triton autotunes them before the "
                f"first step (~{lo}-{hi} s, measured on an H100/H200); the results are cached in {cache} "
                "for later runs (ATTNRES_KDA_AUTOTUNE=0 skips the tuning: each kernel's first configuration, "
                "a quick first step, possibly slower steps)"
            )
        elif seeded:
            notes.append(f"fla's KDA autotuning: {seeded} shipped result(s) put into {cache} (no tuning)")
    inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "the Inductor cache"
    if compiled in ("regional", "nested"):
        from attnres.model.moe import MoE

        kinds = sorted({type(m).__name__ for layer in getattr(model, "layers", {}).values()
                        for m in (layer.attn, layer.mlp)
                        # nested: the MoE's experts a region only where the decoder makes them one
                        if compiled == "regional" or not isinstance(m, MoE)
                        or m.mix_region_runs(device, dtype, dtype)})
        whole = " and the model around them" if compiled == "nested" else ""
        notes.append(
            f"torch.compile compiles each kind of sublayer ({', '.join(kinds)}) once{whole} during the first "
            f"step (cached in {inductor_cache} for later runs)")
    elif compiled:
        graphs = (", then records its CUDA graphs over the next steps (mode reduce-overhead)"
                  if compiled == "reduce-overhead" and device.type == "cuda" else "")
        notes.append(
            "torch.compile compiles the model during the first step (a minute or more for the GPU presets; "
            f"cached in {inductor_cache} for later runs){graphs}"
        )
    return notes


def best_configs(cache: Path) -> dict[str, list[tuple[tuple, dict[str, Any]]]]:
    """Per kernel name, every autotune result in Triton's cache ``cache``: (its key, the fields of its
    fastest configuration). Unreadable files are skipped."""
    found: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
    for path in cache.glob("*/*.autotune.json") if cache.is_dir() else ():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key, timings = (ast.literal_eval(v) if isinstance(v, str) else v
                            for v in (data["key"], data["configs_timings"]))
            config, _ = min(timings, key=lambda ct: ct[1][0] if isinstance(ct[1], list | tuple) else ct[1])
        except (OSError, ValueError, SyntaxError, KeyError, TypeError, IndexError):
            continue
        found.setdefault(path.name.removesuffix(".autotune.json"), []).append((tuple(key), config))
    return found


def nearest_config(entries: list[tuple[tuple, dict[str, Any]]], key: tuple) -> dict[str, Any] | None:
    """The configuration of the entry whose key is nearest ``key``: the same length and the same
    non-numeric fields (flags, dtypes), then the least sum of ``|log2(a / b)|`` over the numeric fields (a
    head dim that matches outweighs a head count that differs by less than 2x). Failing that, an entry
    whose dtypes differ in one field while another matches (a bf16 kernel whose weight is fp32 under
    autocast, e.g. fla's gated norm in bf16-mixed training, against a result made with bf16 weights):
    a configuration that does not fit the other dtype fails before its launch, and the caller falls back.
    None if none fits."""
    def numeric(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def dtype(v: Any) -> bool:
        return isinstance(v, str) and v.startswith("torch.")

    def distance(other: tuple) -> tuple[int, float]:
        if len(other) != len(key) or any(numeric(a) != numeric(b) or (not numeric(a) and a != b
                                                                      and not (dtype(a) and dtype(b)))
                                         for a, b in zip(other, key)):
            return (2, math.inf)
        dtypes = [(a, b) for a, b in zip(other, key) if dtype(a)]
        differ = sum(a != b for a, b in dtypes)
        if differ > 1 or (differ == 1 and len(dtypes) - differ < 1):
            return (2, math.inf)
        return (differ, sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in zip(other, key) if numeric(a)))

    best = min(entries, key=lambda e: distance(e[0]), default=None)
    return best[1] if best is not None and distance(best[0])[1] < math.inf else None


def _version_ok() -> bool:
    try:
        fla = importlib.metadata.version("fla-core")
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return fla == PIN_VERSIONS["fla-core"] and triton.startswith(PIN_VERSIONS["triton"] + ".")


def _autotuners(modules: list) -> list:
    """The Triton autotuners defined in ``modules`` (also under ``triton.heuristics`` wrappers)."""
    from triton.runtime.autotuner import Autotuner

    found = []
    for module in modules:
        for obj in list(vars(module).values()):
            while obj is not None and not isinstance(obj, Autotuner) and hasattr(obj, "fn"):
                obj = obj.fn
            if isinstance(obj, Autotuner) and all(obj is not f for f in found):
                found.append(obj)
    return found


def _kernel_name(tuner: Any) -> str:
    """The name of the ``@triton.jit`` function under ``tuner`` (under ``triton.heuristics`` too: fla 0.6
    puts some autotuners above a heuristics wrapper, which has ``arg_names`` but no name)."""
    fn = tuner.fn
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


def prepare_kda_autotune(device: torch.device) -> dict[str, Any] | None:
    """Before a first step on ``device`` (``attnres fit``, ``bench e2e``, the study's audit runs alike): the
    shipped autotune results seeded into Triton's cache (:func:`seed_autotune`), then every fla kernel's key
    without a result pinned to the nearest tuned configuration (:func:`pin_untuned_kda`), whatever the
    model's KDA shape: a tuned KDA shape does not make the fused norms, SwiGLU, gates or loss around it
    tuned at this width, and Triton would benchmark each of those (minutes, on a GPU shared by several
    runs even more). ``ATTNRES_KDA_AUTOTUNE=1``: nothing pinned (Triton tunes every new key); ``=0``: a key
    with no tuned neighbour takes the kernel's first configuration. None off CUDA or without fla; else
    what was done: ``{"seeded": results added, "pinned": kernel names, "autotune_env": the variable}``."""
    from attnres.model.backends import fla_available

    if device.type != "cuda" or not fla_available():
        return None
    seeded = seed_autotune(device)
    return {"seeded": seeded, "pinned": pin_untuned_kda(),
            "autotune_env": os.environ.get("ATTNRES_KDA_AUTOTUNE")}


def pin_untuned_kda(
    cache: Path | None = None, modules: list | None = None, untuned: str | None = None
) -> list[str]:
    """Make fla's autotuned kernels take, for a key Triton holds no result for, the fastest configuration
    of the nearest key in ``cache`` (default: Triton's cache, after :func:`seed_autotune`) instead of
    benchmarking every configuration. Only with the fla and Triton versions the shipped results were
    made with, and not when ``ATTNRES_KDA_AUTOTUNE=1``. ``modules``: where the kernels are (default: every
    loaded ``fla`` module, after importing ``fla.ops.kda`` and ``fla.modules``: the KDA kernels and the
    fused ones around them that the eager model calls). ``untuned``: what a key with no tuned
    neighbour does: ``"tune"`` (Triton benchmarks, as without pinning) or ``"first"`` (no benchmarking at
    all: the kernel's configurations in their order, the first that launches; every autotuned kernel of
    ``modules`` is pinned, by default after importing all of ``fla.ops`` too: for tests, which check
    numbers, not speed); default: ``"first"``
    under ``ATTNRES_KDA_AUTOTUNE=0`` (:func:`never_tune`), else ``"tune"``. Returns the names of the
    kernels pinned."""
    if untuned is None:
        untuned = "first" if never_tune() else "tune"
    if untuned not in ("tune", "first"):
        raise ValueError(f"untuned={untuned!r}: use 'tune' or 'first'")
    first = untuned == "first"
    if os.environ.get("ATTNRES_KDA_AUTOTUNE") == "1" or (modules is None and not first and not _version_ok()):
        return []
    tuned = best_configs(triton_cache_dir() if cache is None else cache)
    if modules is None:
        import fla.modules  # noqa: F401  (the fused norms, SwiGLU, cross-entropy the eager model calls)
        import fla.ops.kda  # noqa: F401  (loads the KDA kernels and the common ones they use)

        if first:
            import fla.ops  # noqa: F401
        modules = [m for name, m in list(sys.modules.items()) if name.startswith("fla.") and m is not None]
    pinned = []
    for tuner in _autotuners(modules):
        name = _kernel_name(tuner)
        if (name not in tuned and not first) or getattr(tuner, "_attnres_pinned", False):
            continue
        _pin(tuner, tuned.get(name, []), first)
        pinned.append(name)
    return sorted(pinned)


def _pin(tuner: Any, entries: list[tuple[tuple, dict[str, Any]]], first: bool = False) -> None:
    import triton

    run = tuner.run
    refused: set[tuple] = set()  # keys whose borrowed configs did not launch: Triton tunes those

    def pinned_run(*args: Any, **kwargs: Any) -> Any:
        # Triton's own key (triton.runtime.autotuner.Autotuner.run): the key arguments, then every dtype
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in tuner.arg_names}
        key = tuple([named[k] for k in tuner.keys if k in named]
                    + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
        if key in tuner.cache or key in refused:
            return run(*args, **kwargs)
        fields = nearest_config(entries, key)
        candidates = []
        if fields is not None and set(fields.get("kwargs", {})) <= set(tuner.arg_names):
            candidates.append(triton.Config(
                fields["kwargs"], num_warps=fields["num_warps"], num_stages=fields["num_stages"],
                num_ctas=fields.get("num_ctas", 1), maxnreg=fields.get("maxnreg")))
        if first:  # then the configurations the kernel itself would benchmark (some prune by shape)
            prune = getattr(tuner, "early_config_prune", None)
            candidates += (prune(tuner.configs, dict(zip(tuner.arg_names, args)), **kwargs)
                           if prune else tuner.configs)
        for config in candidates:
            tuner.cache[key] = config
            try:
                return run(*args, **kwargs)
            except Exception:  # noqa: BLE001 - e.g. the config needs more shared memory at this shape
                tuner.cache.pop(key, None)  # compile and resource errors come before the launch
        refused.add(key)
        return run(*args, **kwargs)

    tuner.run = pinned_run
    tuner._attnres_pinned = True
