"""The one timer of every benchmark, and what each run records beside its times.

:class:`Timer` times a call with CUDA events on a GPU (the device's time, not the launch's) and with
``time.perf_counter`` elsewhere; the op, end-to-end and scaling benchmarks and the study's step
profile all use it. Also here: peak memory, the device-to-device copy bandwidth (the memory ceiling
the op rows are a share of), library versions and the short device tag used in file names.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Timer",
    "cleanup",
    "command_line",
    "copy_bandwidth",
    "device_name",
    "device_slug",
    "measure_ceilings",
    "peak_memory",
    "profile_step",
    "reset_peak_memory",
    "sync",
    "versions",
]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Milliseconds of ``fn()`` on ``device``: CUDA events around the calls on a GPU, else a host clock.

    A sample is ``calls`` back-to-back calls divided by ``calls`` (several calls per sample amortise the
    event overhead of sub-millisecond kernels); ``warmup`` calls run first (compilation, autotuning,
    lazy state), then the device is synchronised.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def samples_ms(
        self, fn: Callable[[], object], warmup: int, repeats: int, calls: int = 1
    ) -> list[float]:
        """``repeats`` samples (ms per call) of ``fn()`` after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        sync(self.device)
        out = []
        for _ in range(repeats):
            start = self.mark()
            for _ in range(calls):
                fn()
            out.append(self.elapsed_ms(start, self.mark()) / calls)
        return out

    def median_ms(self, fn: Callable[[], object], warmup: int, repeats: int, calls: int = 1) -> float:
        """The median of :meth:`samples_ms`."""
        return statistics.median(self.samples_ms(fn, warmup, repeats, calls))

    def mark(self) -> torch.cuda.Event | float:
        """A point in the device's time: a recorded CUDA event, or the host clock (s)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        sync(self.device)  # the host clock counts only once the device's queue is done
        return time.perf_counter()

    def elapsed_ms(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        """Milliseconds from mark ``start`` to mark ``end`` (waits for ``end`` on a GPU)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def intervals_ms(self, marks: Sequence[torch.cuda.Event | float]) -> list[float]:
        """Milliseconds between consecutive marks (a loop that marks each step start, then its end)."""
        sync(self.device)
        return [self.elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]


def copy_bandwidth(
    device: torch.device | str, nbytes: int, warmup: int = 2, repeats: int = 5, calls: int = 1
) -> float:
    """GB/s of copying an ``nbytes`` buffer into a preallocated one, counting bytes read + written.

    Into a preallocated destination: ``clone`` would also time the page faults of a fresh CPU
    allocation, which understates the memory system's bandwidth several times over."""
    device = torch.device(device)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x).fill_(1.0)  # touched once, so its pages exist before timing
    ms = Timer(device).median_ms(lambda: y.copy_(x), warmup, repeats, calls)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, reserved: bool = False) -> int | None:
    """Bytes allocated at the peak since :func:`reset_peak_memory` (None off CUDA: not tracked);
    ``reserved``: the caching allocator's reserved bytes instead, which count a CUDA graph's private memory
    pool (replaying a graph allocates nothing, so its activations never show as allocated after capture)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) if reserved else torch.cuda.max_memory_allocated(device)


def cleanup(device: torch.device) -> None:
    """Free what the last row left: Python garbage, then the CUDA caching allocator's blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_slug(device: torch.device) -> str:
    """A short file-name tag: ``h100``, ``h200``, ... (the GPU), or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the platform's processor elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return str(device)


def versions(
    packages: Sequence[str] = (), missing: str | None = None, commit: bool = False
) -> dict[str, str | None]:
    """Python, torch and torch's CUDA, then the installed version of each of ``packages`` (``missing``
    for one that is not installed) and, with ``commit``, the git commit of this checkout
    (``attnres_commit``, None outside a checkout)."""
    out: dict[str, str | None] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = missing
    if commit:
        out["attnres_commit"] = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["attnres_commit"] = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip() or None
    return out


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, Any]:
    """The two ceilings, measured: a bf16 (fp32 on CPU) square matmul's FLOP/s and a device-to-device
    copy's bandwidth (bytes read + written), on random data, median of repeats."""
    small = quick or device.type != "cuda"
    n, nbytes = (512, 1 << 24) if small else (8192, 1 << 31)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = Timer(device).median_ms(lambda: torch.mm(a, b), 3, 10)
    copy_gbps = copy_bandwidth(device, nbytes, warmup=2, repeats=5)
    cleanup(device)
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_bytes": 2 * nbytes, "copy_gbps": copy_gbps}


# Kernel families of a profile, first match wins (profile_step's "families"; benchmarks/profile_diff.py).
KERNEL_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("depth attention (ours)", ("attnres_cuda::", "attnres::")),
    ("MoE Triton (ours)", ("moe_gather_sum", "moe_row_dots", "moe_swiglu")),
    ("fla KDA", ("chunk_kda", "chunk_gated_delta", "recompute_w_u", "chunk_gla", "kda_", "chunk_local_cumsum",
                 "fused_recurrent")),
    ("fla norms, conv, SwiGLU, loss", ("layer_norm", "l2norm", "causal_conv1d", "swiglu", "cross_entropy")),
    ("attention (SDPA)", ("sdpa", "flash", "fmha", "cudnn")),
    ("grouped GEMM", ("GroupProblemShape",)),
    ("GEMM", ("nvjet", "gemm", "gemv", "xmma", "cutlass", "splitKreduce")),
    ("Inductor", ("triton_",)),
    ("torch elementwise, copies, gathers", ("at::native", "at_cuda_detail", "cub::")),
)


def kernel_families(top_ops: list[dict[str, Any]]) -> dict[str, float]:
    """Device ms per kernel family (:data:`KERNEL_FAMILIES`, the rest "other") of a profile's ``top_ops``,
    largest first."""
    out: dict[str, float] = {}
    for op in top_ops:
        name = op["op"]
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        out[family] = out.get(family, 0.0) + float(op["self_ms"])
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def profile_step(
    fn: Callable[[], object], device: torch.device, top: int | None = None, cpu_ops: bool = True
) -> dict[str, Any]:
    """One profiled call: kernel count, total device time, the ``top`` ops with the most device self-time
    (default: 40 operators, or every kernel name when only kernels are recorded), and the time of the
    depth-attention ops (``attnres::*``, when the extension runs them). ``cpu_ops`` False (on a GPU): record
    the kernels only, ranked by kernel name, without the CPU-side operators (whose events, tens of
    thousands in a large model's step, take the profiler minutes to parse); then ``attnres_ops`` is empty
    (an operator name is a CPU event). Every kernel is kept there (a few hundred names; session 21's
    40 left a sixth of a `medium` step's device time unnamed, which hid what Block AttnRes changes).
    ``families``: the top ops' device ms per kernel family (:func:`kernel_families`)."""
    from torch.profiler import ProfilerActivity, profile

    acts = ([ProfilerActivity.CPU] if cpu_ops or device.type != "cuda" else []) + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    events = prof.events()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    avgs = prof.key_averages()

    def dev_self(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def dev_total(e: Any) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))

    if top is None:
        top = len(avgs) if ProfilerActivity.CPU not in acts else 40
    ranked = sorted(avgs, key=dev_self if device.type == "cuda" else (lambda e: e.self_cpu_time_total),
                    reverse=True)
    top_ops = [
        {"op": e.key, "count": e.count, "self_ms": round((dev_self(e) if device.type == "cuda"
                                                          else e.self_cpu_time_total) / 1e3, 4)}
        for e in ranked[:top]
    ]
    return {
        "recorded": ("kernels" if ProfilerActivity.CPU not in acts
                     else "operators and kernels" if ProfilerActivity.CUDA in acts else "operators"),
        "kernels": len(on_device),
        "device_ms": round(sum(float(e.time_range.elapsed_us()) for e in on_device) / 1e3, 4),
        "top_ops": top_ops,
        # kernel families (kernel-only profiles name every kernel; else the 40 heaviest operators)
        "families": kernel_families(top_ops),
        "attnres_ops": [
            {"op": e.key, "count": e.count, "total_ms": round(dev_total(e) / 1e3, 4)}
            for e in avgs if e.key.startswith("attnres::")
        ],
    }


def compile_time_snapshot() -> dict[str, float]:
    """Seconds spent so far per phase of ``torch.compile`` (``torch._dynamo.utils.compilation_time_metrics``:
    Dynamo's tracing, AOTAutograd, Inductor's lowering and code generation, the wait on Triton's compile
    workers, the lazily compiled backward; nested phases overlap), summed over the calls of each phase."""
    from torch._dynamo import utils  # read at each call: the dict of this process's compilations

    return {name: float(sum(times)) for name, times in list(utils.compilation_time_metrics.items())}


def compile_time_breakdown(before: dict[str, float], min_s: float = 0.5) -> dict[str, float]:
    """The phases of ``torch.compile`` that took at least ``min_s`` seconds since the snapshot ``before``
    (:func:`compile_time_snapshot`), longest first: where a first step's compile time goes."""
    now = compile_time_snapshot()
    spent = {name: now[name] - before.get(name, 0.0) for name in now}
    return {name: round(t, 2) for name, t in sorted(spent.items(), key=lambda kv: -kv[1]) if t >= min_s}


def command_line() -> str | None:
    """The command that is running, for the JSON: the script's name and its arguments (``python -m
    <package> ...`` when run as a package's ``__main__``)."""
    if not sys.argv:
        return None
    script = Path(sys.argv[0])
    head = f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name
    return " ".join([head, *sys.argv[1:]])
