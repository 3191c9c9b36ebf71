"""Op benchmark of the depth-attention kernels, on CPU or CUDA (``device`` is a parameter of
:func:`run_ops_benchmark`, the code behind ``attnres bench ops``).

Every op is credited with its *minimum* memory traffic (every input and output element read or written
once; elements x dtype size) and reported as GB/s and as a share of the device's copy bandwidth (a
large copy into a preallocated buffer, bytes read + written, measured in the same run). Minimum traffic
in elements, for n sources, S queries, N tokens, width d:

==========  ==============  =================
op          forward         backward
==========  ==============  =================
phase1      (n + S) N d     (2n + S) N d
phase2      3 N d           5 N d (also with the fused norm, ``phase2_norm``)
+ add       5 N d           6 N d (``phase2_norm_add``: the partial summary's add fused in too)
direct      (n + 1) N d     (2n + 1) N d
==========  ==============  =================

``fwd+bwd`` rows count both. The small lse and query tensors are left out. Times come from the one
:class:`~attnres.bench.timing.Timer` (CUDA events on a GPU, the host clock on a CPU).

* **CPU**: each case (op x mode x dtype x shape of :data:`GRIDS`) through ``attnres.ops`` against the
  eager reference (optionally also ``torch.compile`` of the reference): median of repeats after warm-up,
  speed-ups; JSON rows of :class:`Case` + :class:`Result`.
* **CUDA**: bf16 over the issue's grid (:func:`cuda_grid`; ``quick``: the N = 16384 sweep), every op
  forward and backward called directly (``torch.ops.attnres``) on input sets rotated so that L2 cannot
  hold them (median of 3 samples of several calls), the phase-1 backward twice (the default kernels
  and, as ``phase1_bwd_fused``, the fused ones), phase 2 with the norm fused in (and with the partial
  summary's add too), and one sublayer's merge + norm through autograd fused vs apart (and the add,
  merge and norm fused vs torch's add before the fused merge + norm). Then, on the ``compare`` shapes,
  the baselines where installed (:func:`attnres.bench.peers.op_baselines`): ``torch.compile`` of
  ``attnres.reference``, flash-attn-res 0.1.12 phase 1 (bf16 only; its sources pre-stacked outside the
  timing), and fla's ``fused_attnres`` per block (S calls over the n sources + the partial summary,
  against one phase 1 + S phase 2 here).

The JSON (``benchmarks/results/ops_<device type>.json`` by default) holds the device, versions and the
command. To add a device type: a grid for it and its rows here.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from attnres import ops, reference
from attnres.bench.peers import op_baselines
from attnres.bench.report import ops_row_line, print_cpu_ops_table, print_cuda_ops_table
from attnres.bench.timing import Timer, command_line, copy_bandwidth, device_name, versions
from attnres.ops import rms_norm

__all__ = ["GRIDS", "Case", "Result", "bench_case", "cuda_grid", "parse_shapes", "run_ops_benchmark"]

OPS = ("phase1", "phase2", "direct")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
EPS = ops.DEFAULT_EPS
NORM_EPS = 1e-5  # the decoder's RMSNorm epsilon (phase2_norm rows)
RESULTS_DIR = Path("benchmarks/results")  # relative to the working directory (the repo root)
# CUDA: the grid, and the shapes timed against the baselines by default
GRID_TOKENS = (4096, 16384, 65536)
GRID_DIMS = (1024, 2048, 2304, 4096, 7168)
GRID_SOURCES = (2, 3, 5, 9, 17, 33)
GRID_QUERIES = (1, 4, 8, 12)
DEFAULT_COMPARE = [(16384, 2048, 9, 8), (16384, 2304, 9, 8)]


def run_ops_benchmark(
    device: str = "cpu",
    quick: bool = False,
    out: str | os.PathLike | None = None,
    compile_reference: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    which: Sequence[str] = OPS,
    shapes: Sequence[tuple[int, int, int, int]] | None = None,
    compare: Sequence[tuple[int, int, int, int]] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """Time the ops on ``device``, print a table and write JSON to ``out`` (default
    ``benchmarks/results/ops_<device type>.json``); returns what was written.

    CPU: each op of ``which`` (fwd and fwd+bwd) for the compiled kernel against the eager reference
    (and ``torch.compile`` of it with ``compile_reference``) on the CPU grid (``quick``: the small one);
    ``warmup`` / ``repeats`` per case (default 1 / 3 quick, 2 / 5 full); ``threads``: set first.
    CUDA: the ``shapes`` ``(N, d, n, S)`` (default :func:`cuda_grid` of ``quick``) in ``dtype``, then the
    baselines on the ``compare`` shapes (default ``16384,2048,9,8`` and ``16384,2304,9,8``; ``[]``: none);
    the JSON is rewritten after every row, so a run cut short keeps what it measured.
    """
    dev = torch.device(device)
    path = Path(out) if out is not None else RESULTS_DIR / f"ops_{dev.type}.json"
    if dev.type == "cuda":
        return _run_cuda(list(shapes) if shapes is not None else cuda_grid(quick), dtype,
                         DEFAULT_COMPARE if compare is None else list(compare), path)
    return _run_cpu(dev, quick, path, compile_reference, warmup, repeats, threads, which)


def parse_shapes(text: str | None) -> list[tuple[int, int, int, int]] | None:
    """``"N,d,n,S;N,d,n,S"`` -> shapes; None -> None (the default shapes); ``"none"`` or ``""`` -> []."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    shapes = []
    for part in text.split(";"):
        fields = part.split(",")
        if len(fields) != 4 or not all(f.strip().isdigit() for f in fields):
            raise ValueError(
                f"compare shape {part!r} is not N,d,n,S (four positive integers), e.g. 16384,2048,9,8"
            )
        shapes.append(tuple(int(f) for f in fields))
    return shapes


# ----------------------------------------------------------------------------- CPU: against the reference


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
    copy_now = copy_bandwidth(device, 64 << 20 if device.type == "cpu" else 1 << 30, 1, repeats)
    kernel_ms = timer.median_ms(_runner(kernel, args, case.mode), warmup, repeats)
    ref_ms = timer.median_ms(_runner(ref, args, case.mode), warmup, repeats)
    compiled_ms = None
    if compile_reference:
        compiled = torch.compile(ref, dynamic=False)
        compiled_ms = timer.median_ms(_runner(compiled, args, case.mode), warmup + 1, repeats)
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


def _run_cpu(
    dev: torch.device, quick: bool, path: Path, compile_reference: bool, warmup: int | None,
    repeats: int | None, threads: int | None, which: Sequence[str],
) -> dict[str, Any]:
    """The CPU benchmark of :func:`run_ops_benchmark`."""
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
    timer = Timer(dev)
    copy_gbps = copy_bandwidth(dev, 256 << 20 if dev.type == "cpu" else 1 << 30)
    meta = {
        "device": str(dev),
        "device_name": device_name(dev),
        "backend": ops.backend(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": copy_gbps,
        "command": command_line(),
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
    rows = [{**asdict(r.case), **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results]
    print_cpu_ops_table(rows, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {**meta, "results": rows}
    path.write_text(json.dumps(written, indent=2) + "\n")
    print(f"wrote {path}")
    return written


# ----------------------------------------------------------------------------- CUDA: kernels, baselines


def _rotating_ms(timer: Timer, fn: Callable[[int], object], reps: int = 10) -> float:
    """Median ms per call of ``fn(k)`` (``k`` counts the calls, so ``fn`` can rotate over input sets):
    3 warm-up calls, then 3 samples of ``reps`` calls each."""
    k = itertools.count()
    return timer.median_ms(lambda: fn(next(k)), warmup=3, repeats=3, calls=reps)


def _safe(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a baseline that fails on a shape is reported as missing
        print(f"    (baseline failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})", flush=True)
        return None


def bench_case(
    N: int, d: int, n: int, S: int, dtype: torch.dtype, copy_gbs: float, baselines: dict, compare: bool,
    device: str = "cuda",
) -> dict:
    """Time every op on one shape (``[N, d]`` tensors, n sources, S queries); compare: also time the
    baselines (slow: they compile). ``device``: where (the CUDA benchmark's; a CPU runs the same rows)."""
    timer = Timer(device)

    def _time(fn: Callable[[int], object], reps: int = 10) -> float:
        return _rotating_ms(timer, fn, reps)

    es = torch.finfo(dtype).bits // 8
    gen_bytes = (n + S + 3) * N * d * es
    sets = max(1, min(4, math.ceil(400e6 / gen_bytes)))  # rotate inputs so that L2 (50 MB) cannot hold them
    src = [[torch.randn(N, d, device=device, dtype=dtype) for _ in range(n)] for _ in range(sets)]
    q = torch.randn(S, d, device=device) / d**0.5
    partial = [torch.randn(N, d, device=device, dtype=dtype) for _ in range(sets)]
    outs, lse = [], []
    for k in range(sets):
        o, m = torch.ops.attnres.phase1(src[k], q, EPS)
        outs.append(o)
        lse.append(m)
    g_out = [torch.randn(N, d, device=device, dtype=dtype) for _ in range(S)]
    g_lse = torch.randn(S, N, device=device)
    h2, lse2 = torch.ops.attnres.phase2(outs[0][0], lse[0][0], partial[0], q[0], EPS)
    d_lse, d_out = lse[0][0].clone(), g_out[0]
    _, lse_direct = torch.ops.attnres.depth_attn(src[0], q[0], EPS)

    P = torch.ops.attnres
    t = {
        "phase1_fwd": _time(lambda k: P.phase1(src[k % sets], q, EPS)),
        "phase1_bwd": _time(lambda k: P.phase1_backward(g_out, g_lse, src[k % sets], q, lse[k % sets], EPS)),
        "phase2_fwd": _time(
            lambda k: P.phase2(outs[k % sets][0], lse[k % sets][0], partial[k % sets], q[0], EPS)
        ),
        "phase2_bwd": _time(
            lambda k: P.phase2_backward(d_out, g_lse[0], h2, d_lse, lse2, partial[k % sets], q[0], EPS)
        ),
        "direct_fwd": _time(lambda k: P.depth_attn(src[k % sets], q[0], EPS)),
        "direct_bwd": _time(
            lambda k: P.depth_attn_backward(d_out, g_lse[0], src[k % sets], q[0], lse_direct, EPS)
        ),
    }
    # phase 2 with the sublayer's input RMSNorm fused in (the residual path's default on CUDA)
    w = 1 + 0.1 * torch.randn(d, device=device)
    _, lse_n = P.phase2_norm(outs[0][0], lse[0][0], partial[0], q[0], w, EPS, NORM_EPS)
    t["phase2_norm_fwd"] = _time(
        lambda k: P.phase2_norm(
            outs[k % sets][0], lse[k % sets][0], partial[k % sets], q[0], w, EPS, NORM_EPS
        )
    )
    t["phase2_norm_bwd"] = _time(
        lambda k: P.phase2_norm_backward(
            d_out, g_lse[0], outs[k % sets][0], d_lse, lse_n, partial[k % sets], q[0], w, EPS, NORM_EPS
        )
    )
    # ... and with the partial summary's add fused in too (Block AttnRes inside a block), in builds with it
    addend = [torch.randn(N, d, device=device, dtype=dtype) for _ in range(sets)]
    if ops.fused_add(device):
        g_partial = torch.randn(N, d, device=device, dtype=dtype)
        t["phase2_norm_add_fwd"] = _time(
            lambda k: P.phase2_norm_add(
                outs[k % sets][0], lse[k % sets][0], partial[k % sets], addend[k % sets], q[0], w, EPS,
                NORM_EPS,
            )
        )
        t["phase2_norm_add_bwd"] = _time(
            lambda k: P.phase2_norm_add_backward(
                d_out, g_lse[0], g_partial, outs[k % sets][0], d_lse, lse_n, partial[k % sets], q[0], w, EPS,
                NORM_EPS,
            )
        )
    # one sublayer's merge + norm, forward and backward through autograd: fused vs the separate ops; with
    # `add`, a sublayer inside a block: the add, merge and norm fused vs torch's add before the fused rest
    leaves = [[x.detach().requires_grad_() for x in (outs[k][0], partial[k], addend[k])] for k in range(sets)]
    wl, ql0 = w.detach().requires_grad_(), q[0].detach().requires_grad_()

    def merge_fb(fused: bool, add: bool = False):
        def go(k):
            (o, prev, v), m = leaves[k % sets], lse[k % sets][0]
            if not add:
                y = (ops.phase2_norm(o, m, prev, ql0, wl, EPS, NORM_EPS)[0] if fused
                     else rms_norm(ops.phase2(o, m, prev, ql0, EPS)[0], wl, NORM_EPS))
                torch.autograd.grad(y, [o, prev, ql0, wl], d_out)
                return
            if fused:
                y, _, p = ops.phase2_norm_add(o, m, prev, v, ql0, wl, EPS, NORM_EPS)
            else:
                p = prev + v
                y = ops.phase2_norm(o, m, p, ql0, wl, EPS, NORM_EPS)[0]
            torch.autograd.grad([y, p], [o, prev, v, ql0, wl], [d_out, g_partial])

        return go

    row_extra = {"merge_norm_fwd_bwd_ms": _time(merge_fb(True)),
                 "merge_then_norm_fwd_bwd_ms": _time(merge_fb(False))}
    if ops.fused_add(device):
        row_extra["add_merge_norm_fwd_bwd_ms"] = _time(merge_fb(True, add=True))
        row_extra["add_then_merge_norm_fwd_bwd_ms"] = _time(merge_fb(False, add=True))
    # the fused phase-1 backward kernels, forced by the variable the extension reads per call
    with mock.patch.dict(os.environ, {"ATTNRES_P1_BWD": "fused"}):
        t["phase1_bwd_fused"] = _time(
            lambda k: P.phase1_backward(g_out, g_lse, src[k % sets], q, lse[k % sets], EPS)
        )
    elems = {
        "phase1_fwd": (n + S) * N * d,
        "phase1_bwd": (2 * n + S) * N * d,
        "phase1_bwd_fused": (2 * n + S) * N * d,
        "phase2_fwd": 3 * N * d,
        "phase2_bwd": 5 * N * d,
        "phase2_norm_fwd": 3 * N * d,
        "phase2_norm_bwd": 5 * N * d,
        "phase2_norm_add_fwd": 5 * N * d,
        "phase2_norm_add_bwd": 6 * N * d,
        "direct_fwd": (n + 1) * N * d,
        "direct_bwd": (2 * n + 1) * N * d,
    }
    row: dict = {"N": N, "d": d, "n": n, "S": S, "dtype": str(dtype).removeprefix("torch."), "sets": sets}
    for k, ms in t.items():
        gbs = elems[k] * es / ms / 1e6
        row[k] = {"ms": ms, "GBps": gbs, "pct_copy": 100 * gbs / copy_gbs}
    row.update(row_extra)
    # a block of S sublayers: one phase 1 + S phase 2
    row["block_fwd_ms"] = t["phase1_fwd"] + S * t["phase2_fwd"]
    row["block_fwd_bwd_ms"] = row["block_fwd_ms"] + t["phase1_bwd"] + S * t["phase2_bwd"]

    if compare:
        leaves = [s.detach().requires_grad_() for s in src[0]]
        ql = q.detach().requires_grad_()

        def fwd_bwd(f):
            def go(k):
                o, m = f(leaves, ql, EPS)
                torch.autograd.backward([o, m], [torch.stack(g_out), g_lse])

            return go

        def ours_go(k):
            o, m = ops.phase1(leaves, ql, EPS)
            torch.autograd.backward(list(o) + [m], g_out + [g_lse])

        row["phase1_fwd_bwd_ms"] = _time(ours_go, reps=5)
        torch._dynamo.reset()
        comp = torch.compile(reference.phase1)
        row["compile_phase1_fwd_ms"] = _safe(lambda: _time(lambda k: comp(src[k % sets], q, EPS), reps=5))
        row["compile_phase1_fwd_bwd_ms"] = _safe(lambda: _time(fwd_bwd(comp), reps=5))
        if baselines["far"] is not None and dtype == torch.bfloat16:
            far = baselines["far"]
            stacked = torch.stack(src[0]).view(n, 1, N, d)
            stacked_l = stacked.detach().requires_grad_()

            def far_fb(k):
                o, m = far(stacked_l, ql, EPS)
                torch.autograd.backward([o, m], [torch.stack(g_out).view(S, 1, N, d), g_lse.view(S, 1, N)])

            row["far_phase1_fwd_ms"] = _safe(lambda: _time(lambda k: far(stacked, q, EPS), reps=5))
            row["far_phase1_fwd_bwd_ms"] = _safe(lambda: _time(far_fb, reps=5))
        # the single-read peers, one call per sublayer of the block over the sources and the partial:
        # fla's fused_attnres (query, sources, norm weight) and fast-attnres's attnres (sources, query; bf16)
        ones = torch.ones(d, device=device, dtype=dtype)
        qd = q.to(dtype)
        peers = {}
        if baselines["fla"] is not None:
            peers["fla"] = lambda vs, j, fla=baselines["fla"]: fla(qd[j], vs, ones, rms_eps=EPS)
        if baselines.get("fa") is not None and dtype == torch.bfloat16:
            peers["fa"] = lambda vs, j, fa=baselines["fa"]: fa(vs, qd[j], eps=EPS)
        for name, call in peers.items():
            peer_leaves = [s.detach().requires_grad_() for s in src[0] + [partial[0]]]

            def peer_fb(k, call=call, peer_leaves=peer_leaves):
                for j in range(S):
                    call(peer_leaves, j).backward(g_out[j])

            row[f"{name}_block_fwd_ms"] = _safe(lambda call=call: _time(
                lambda k: [call(src[k % sets] + [partial[k % sets]], j) for j in range(S)], reps=3))
            row[f"{name}_block_fwd_bwd_ms"] = _safe(lambda peer_fb=peer_fb: _time(peer_fb, reps=3))
        # ours through autograd, as the peers' rows are (the speed-up table reads it with or without peers)
        p_l = partial[0].detach().requires_grad_()

        def ours_block_fb(k):
            o, m = ops.phase1(leaves, ql, EPS)
            hs = [ops.phase2(o[j], m[j], p_l, ql[j], EPS)[0] for j in range(S)]
            torch.autograd.backward(hs, g_out)

        row["block_fwd_bwd_autograd_ms"] = _time(ours_block_fb, reps=3)
    return row


def cuda_grid(quick: bool) -> list[tuple[int, int, int, int]]:
    """The CUDA grid ``(N, d, n, S)``: ``quick`` the N = 16384 sweep (plus a few other token counts),
    else every combination of the issue's tokens, widths, sources and queries."""
    if quick:
        cases = [(16384, d, n, S) for d in GRID_DIMS for n in (3, 9, 33) for S in (1, 4, 8, 12)]
        cases += [(N, d, 9, 8) for N in (4096, 65536) for d in (2048, 7168)]
    else:
        cases = [
            (N, d, n, S) for N in GRID_TOKENS for d in GRID_DIMS for n in GRID_SOURCES for S in GRID_QUERIES
        ]
    return cases


def fits(N: int, d: int, n: int, S: int, es: int, free: int) -> bool:
    """Whether a shape fits in ``free`` bytes of device memory (elements of ``es`` bytes)."""
    need = (2 * n + 2 * S + 8) * N * d * es  # one input set plus outputs, gradients and slack
    return need < 0.6 * free


def _run_cuda(
    cases: list[tuple[int, int, int, int]], dtype: torch.dtype,
    compare_cases: list[tuple[int, int, int, int]], json_path: Path,
) -> dict[str, Any]:
    """The CUDA benchmark of :func:`run_ops_benchmark`: ``cases`` (N, d, n, S), then the baselines on
    ``compare_cases``; returns (and writes) the results."""
    if not torch.cuda.is_available() or ops.backend("cuda") != "compiled":
        raise RuntimeError("the CUDA op benchmark needs a CUDA device and attnres._C built with CUDA")
    # the grid first (fast), then the shapes compared with the baselines (slow: they compile)
    plan = [(c, False) for c in cases] + [(c, True) for c in compare_cases]
    copy_gbs = copy_bandwidth("cuda", 1 << 30, warmup=3, repeats=3, calls=20)
    dev = torch.cuda.get_device_properties(0)
    print(f"device {dev.name}, {dev.multi_processor_count} SMs; copy {copy_gbs:.0f} GB/s", flush=True)
    baselines = op_baselines()
    es = torch.finfo(dtype).bits // 8
    rows = []
    t0 = time.time()
    for (N, d, n, S), compare in plan:
        free = torch.cuda.mem_get_info()[0]
        if not fits(N, d, n, S, es, free):
            print(f"skip N={N} d={d} n={n} S={S}: does not fit", flush=True)
            continue
        row = bench_case(N, d, n, S, dtype, copy_gbs, baselines, compare)
        rows.append(row)
        print(ops_row_line(row), flush=True)
        _write(json_path, _result(dev, copy_gbs, dtype, t0, rows))  # a run cut short keeps its rows
    result = _result(dev, copy_gbs, dtype, t0, rows)
    _write(json_path, result)
    print_cuda_ops_table(result)
    return result


def _write(path: Path | str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def _result(dev: Any, copy_gbs: float, dtype: torch.dtype, t0: float, rows: list[dict]) -> dict[str, Any]:
    return {
        "device": dev.name,
        "sms": dev.multi_processor_count,
        "copy_GBps": copy_gbs,
        "versions": versions(("triton", "flash-attn-res", "fla-core"), missing="not installed"),
        "command": " ".join(sys.argv),
        "dtype": str(dtype),
        "seconds": time.time() - t0,
        "rows": rows,
    }
