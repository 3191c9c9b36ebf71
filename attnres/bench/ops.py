"""Op benchmark: the compiled depth-attention kernels against the eager PyTorch reference.

For every case (op x mode x dtype x shape) it reports the median time over several repeats after
warm-up, the bandwidth of the op's *minimum* memory traffic (every input and output element read or
written once), that bandwidth as a share of the device's copy bandwidth (a large copy into a preallocated
buffer, bytes read + written, measured in the same run) and the speed-up over the reference
(optionally also over ``torch.compile`` of the reference). Results go to a table on stdout and to
``benchmarks/results/ops_<device>.json``.

Minimum traffic in elements, for n sources, S queries, N tokens, width d:

==========  ==============  =================
op          forward         backward
==========  ==============  =================
phase1      (n + S) N d     (2n + S) N d
phase2      3 N d           5 N d
direct      (n + 1) N d     (2n + 1) N d
==========  ==============  =================

``fwd+bwd`` rows count both. The small lse and query tensors are left out.

To add a device type: a :class:`Timer` for it in :func:`make_timer` and a grid in :data:`GRIDS`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from attnres import ops, reference

__all__ = ["GRIDS", "Case", "Result", "copy_bandwidth", "make_timer", "run_ops_benchmark"]

OPS = ("phase1", "phase2", "direct")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
EPS = ops.DEFAULT_EPS


@dataclass(frozen=True)
class Case:
    """One measurement: ``op`` in OPS, ``mode`` in MODES; n sources / S queries of ``[N, d]``."""

    op: str
    mode: str
    dtype: str
    N: int
    d: int
    n: int = 1
    S: int = 1

    def traffic_elements(self) -> int:
        """Minimum elements read + written (see the module docstring)."""
        fwd, bwd = {
            "phase1": (self.n + self.S, 2 * self.n + self.S),
            "phase2": (3, 5),
            "direct": (self.n + 1, 2 * self.n + 1),
        }[self.op]
        return (fwd + (bwd if self.mode == "fwd+bwd" else 0)) * self.N * self.d


@dataclass
class Result:
    case: Case
    kernel_ms: float
    reference_ms: float
    compiled_reference_ms: float | None = None
    gbps: float = 0.0
    copy_gbps: float = 0.0  # measured just before this case; pct_copy is relative to it
    pct_copy: float = 0.0
    speedup: float = 0.0
    speedup_compiled: float | None = None


# ----------------------------------------------------------------------------- grids

# CPU: a few shapes around a mid-size model (d 1024 / 2304), B*T of one or four 1k-token sequences.
_CPU_FULL = dict(
    dtypes=("bf16", "fp32"), tokens=(1024, 4096), dims=(1024, 2304), sources=(3, 9, 17), queries=(1, 4, 8)
)
_CPU_QUICK = dict(dtypes=("bf16", "fp32"), tokens=(1024,), dims=(2304,), sources=(9,), queries=(4,))
GRIDS: dict[str, dict[bool, dict]] = {"cpu": {False: _CPU_FULL, True: _CPU_QUICK}}


def cases_for(grid: dict, which: Sequence[str] = OPS, modes: Sequence[str] = MODES) -> list[Case]:
    """The cases of a grid: phase1 over sources x queries (S = 1 is the direct op's shape, kept for
    comparison only in the full grid), direct over sources, phase2 once per (N, d)."""
    out = []
    for dtype in grid["dtypes"]:
        for N in grid["tokens"]:
            for d in grid["dims"]:
                for mode in modes:
                    if "phase1" in which:
                        out += [
                            Case("phase1", mode, dtype, N, d, n, S)
                            for n in grid["sources"]
                            for S in grid["queries"]
                        ]
                    if "direct" in which:
                        out += [Case("direct", mode, dtype, N, d, n) for n in grid["sources"]]
                    if "phase2" in which:
                        out.append(Case("phase2", mode, dtype, N, d))
    return out


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` runs."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        pass

    def elapsed_ms(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.elapsed_ms(fn) for _ in range(repeats))


class CudaTimer(Timer):
    """CUDA events around the call, so that the time is the device's, not the launch's."""

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def make_timer(device: torch.device) -> Timer:
    return CudaTimer(device) if device.type == "cuda" else Timer(device)


def copy_bandwidth(
    device: torch.device, timer: Timer, nbytes: int, warmup: int = 2, repeats: int = 5
) -> float:
    """GB/s of copying an ``nbytes`` buffer into a preallocated one, counting bytes read + written.

    Into a preallocated destination: ``clone`` would also time the page faults of a fresh CPU
    allocation, which understates the memory system's bandwidth several times over."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x).fill_(1.0)  # touched once, so its pages exist before timing
    ms = timer(lambda: y.copy_(x), warmup, repeats)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
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


# ----------------------------------------------------------------------------- one case


def _inputs(case: Case, device: torch.device, gen: torch.Generator) -> list:
    """The op's positional arguments (without eps)."""
    dtype = DTYPES[case.dtype]

    def rows(k: int) -> list[Tensor]:
        return [torch.randn(case.N, case.d, generator=gen).to(device=device, dtype=dtype) for _ in range(k)]

    q = (torch.randn(max(case.S, 1), case.d, generator=gen) * case.d**-0.5).to(device)
    if case.op == "phase2":
        o, p = rows(2)
        return [o, torch.randn(case.N, generator=gen).to(device), p, q[0]]
    return [rows(case.n), q if case.op == "phase1" else q[0]]


def _fns(op: str) -> tuple[Callable, Callable]:
    """(kernel via attnres.ops, reference) taking the same arguments."""
    return {
        "phase1": (ops.phase1, reference.phase1),
        "phase2": (ops.phase2, reference.phase2),
        "direct": (ops.depth_attention, reference.depth_attention),
    }[op]


def _leaves(args: list) -> list[Tensor]:
    return [t for a in args for t in (a if isinstance(a, list) else [a])]


def _runner(fn: Callable, args: list, mode: str) -> Callable[[], object]:
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(*args, EPS)

        return fwd
    leaves = [t.detach().requires_grad_() for t in _leaves(args)]
    it = iter(leaves)
    grad_args = [[next(it) for _ in a] if isinstance(a, list) else next(it) for a in args]
    grads: list[Tensor] = []

    def fwd_bwd():
        outs = [t for t in torch.utils._pytree.tree_leaves(fn(*grad_args, EPS)) if isinstance(t, Tensor)]
        if not grads:  # fixed upstream gradients, made once
            grads.extend(torch.randn_like(t) for t in outs)
        torch.autograd.backward(outs, grads)
        for t in leaves:
            t.grad = None

    return fwd_bwd


def measure(
    case: Case,
    device: torch.device,
    timer: Timer,
    warmup: int,
    repeats: int,
    compile_reference: bool = False,
) -> Result:
    gen = torch.Generator().manual_seed(0)
    args = _inputs(case, device, gen)
    kernel, ref = _fns(case.op)
    # the copy bandwidth again just before the case: on a shared machine the available bandwidth drifts
    copy_now = copy_bandwidth(device, timer, 64 << 20 if device.type == "cpu" else 1 << 30, 1, repeats)
    kernel_ms = timer(_runner(kernel, args, case.mode), warmup, repeats)
    ref_ms = timer(_runner(ref, args, case.mode), warmup, repeats)
    compiled_ms = None
    if compile_reference:
        compiled = torch.compile(ref, dynamic=False)
        compiled_ms = timer(_runner(compiled, args, case.mode), warmup + 1, repeats)
    nbytes = case.traffic_elements() * torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    gbps = nbytes / (kernel_ms * 1e-3) / 1e9
    return Result(
        case=case,
        kernel_ms=kernel_ms,
        reference_ms=ref_ms,
        compiled_reference_ms=compiled_ms,
        gbps=gbps,
        copy_gbps=copy_now,
        pct_copy=100 * gbps / copy_now,
        speedup=ref_ms / kernel_ms,
        speedup_compiled=None if compiled_ms is None else compiled_ms / kernel_ms,
    )


# ----------------------------------------------------------------------------- report


def _table(results: list[Result], meta: dict) -> None:
    compiled = any(r.compiled_reference_ms is not None for r in results)
    head = ["op", "mode", "dtype", "N", "d", "n", "S", "kernel ms", "GB/s", "copy GB/s", "% copy", "ref ms"]
    head.append("speed-up")
    if compiled:
        head += ["compiled ref ms", "vs compiled"]
    rows = []
    for r in results:
        c = r.case
        row = [c.op, c.mode, c.dtype, str(c.N), str(c.d), str(c.n) if c.op != "phase2" else "-"]
        row += [
            str(c.S) if c.op == "phase1" else "-",
            f"{r.kernel_ms:.2f}",
            f"{r.gbps:.1f}",
            f"{r.copy_gbps:.1f}",
            f"{r.pct_copy:.0f}%",
        ]
        row += [f"{r.reference_ms:.2f}", f"{r.speedup:.2f}x"]
        if compiled:
            cm = r.compiled_reference_ms
            row += ["-" if cm is None else f"{cm:.2f}", "-" if cm is None else f"{r.speedup_compiled:.2f}x"]
        rows.append(row)
    title = (
        f"attnres ops on {meta['device_name']} ({meta['device']}, backend {meta['backend']}, "
        f"{meta['threads']} threads, torch {meta['torch']}); "
        f"copy bandwidth at start {meta['copy_gbps']:.1f} GB/s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print(title)
        for line in [head, *rows]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, len(title) + 4)).print(table)


def run_ops_benchmark(
    device: str = "cpu",
    quick: bool = False,
    out: str | os.PathLike | None = None,
    compile_reference: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    which: Sequence[str] = OPS,
) -> list[Result]:
    """Time each op (phase1 / phase2 / direct, fwd and fwd+bwd) for the compiled kernel against the
    eager reference on the grid of ``device``; print a table and write JSON to ``out`` (default
    ``benchmarks/results/ops_<device type>.json``). Returns the results."""
    dev = torch.device(device)
    if dev.type not in GRIDS:
        raise ValueError(
            f"no benchmark grid for device type {dev.type!r}; add one to GRIDS (have {list(GRIDS)})"
        )
    bad = [o for o in which if o not in OPS]
    if bad:
        raise ValueError(f"unknown op(s) {bad}; choose from {list(OPS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    repeats = repeats if repeats is not None else (3 if quick else 5)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    timer = make_timer(dev)
    copy_gbps = copy_bandwidth(dev, timer, 256 << 20 if dev.type == "cpu" else 1 << 30)
    meta = {
        "device": str(dev),
        "device_name": device_name(dev),
        "backend": ops.backend(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": copy_gbps,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median",
    }
    cases = cases_for(GRIDS[dev.type][quick], which)
    results = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        results.append(measure(case, dev, timer, warmup, repeats, compile_reference))
    _table(results, meta)
    path = Path(out) if out is not None else Path("benchmarks/results") / f"ops_{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(r.case), **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results]
    path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return results
