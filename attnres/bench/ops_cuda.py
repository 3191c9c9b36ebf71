"""CUDA benchmark of the depth-attention ops: ms, GB/s, % of copy bandwidth, speed-ups.

Each op is timed with CUDA events (median of repeats after warm-up) and credited with its
*minimum* DRAM traffic (every input read once, every output written once; elements x dtype size):

    phase1 fwd (n + S) N d   bwd (2n + S) N d      phase2 fwd 3 N d   bwd 5 N d (also with the norm)
    (the phase-1 backward twice: the default kernels and, as ``phase1_bwd_fused``, the fused ones)
    direct fwd (n + 1) N d   bwd (2n + 1) N d

The device-to-device copy bandwidth is measured in the same run (bytes read + written). Baselines,
where installed: ``torch.compile`` of ``attnres.reference`` (fwd and fwd+bwd), flash-attn-res
0.1.12 phase 1 (bf16 only; its sources pre-stacked outside the timing), and fla's
``fused_attnres`` per block (S calls over the n sources + the partial summary, against one phase 1
+ S phase 2 here). Writes a JSON with device, versions and the command.

Usage: ``attnres bench ops --device cuda [--quick true] [--compare SHAPES] [--out PATH]``, or
``python benchmarks/bench_ops_cuda.py [--quick] [--full] [--compare-only] [--json PATH]``; ``run(...)``
does the same from Python.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import torch

from attnres import ops, reference
from attnres.model.norm import rms_norm

EPS = 1e-6
NORM_EPS = 1e-5  # the decoder's RMSNorm epsilon (phase2_norm rows)
DEFAULT_JSON = Path("benchmarks/results/ops_cuda.json")  # relative to the working directory (the repo root)
GRID_TOKENS = (4096, 16384, 65536)
GRID_DIMS = (1024, 2048, 2304, 4096, 7168)
GRID_SOURCES = (2, 3, 5, 9, 17, 33)
GRID_QUERIES = (1, 4, 8, 12)


def _time(fn: Callable[[int], object], reps: int = 10, warmup: int = 3, rounds: int = 3) -> float:
    """Median milliseconds of fn(k) (k rotates over input sets), timed with CUDA events."""
    for k in range(warmup):
        fn(k)
    torch.cuda.synchronize()
    times = []
    for r in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(reps):
            fn(r * reps + k)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _time(lambda k: dst.copy_(src), reps=20)
    return 2 * nbytes / ms / 1e6


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "flash-attn-res", "fla-core"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _baselines() -> dict[str, Callable | None]:
    found: dict[str, Callable | None] = {"far": None, "fla": None}
    try:
        from flash_attn_res import phase_1_batched_attention_triton_op

        found["far"] = phase_1_batched_attention_triton_op
    except Exception:  # noqa: BLE001 - optional benchmark dependency
        pass
    try:
        from fla.ops.attnres import fused_attnres

        found["fla"] = fused_attnres
    except Exception:  # noqa: BLE001
        pass
    return found


def _safe(fn: Callable[[], float]) -> float | None:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a baseline that fails on a shape is reported as missing
        print(f"    (baseline failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})", flush=True)
        return None


def bench_case(
    N: int, d: int, n: int, S: int, dtype: torch.dtype, copy_gbs: float, baselines: dict, compare: bool
) -> dict:
    """Time every op on one shape; compare: also time the baselines (slow: they compile)."""
    es = torch.finfo(dtype).bits // 8
    gen_bytes = (n + S + 3) * N * d * es
    sets = max(1, min(4, math.ceil(400e6 / gen_bytes)))  # rotate inputs so that L2 (50 MB) cannot hold them
    src = [[torch.randn(N, d, device="cuda", dtype=dtype) for _ in range(n)] for _ in range(sets)]
    q = torch.randn(S, d, device="cuda") / d**0.5
    partial = [torch.randn(N, d, device="cuda", dtype=dtype) for _ in range(sets)]
    outs, lse = [], []
    for k in range(sets):
        o, m = torch.ops.attnres.phase1(src[k], q, EPS)
        outs.append(o)
        lse.append(m)
    g_out = [torch.randn(N, d, device="cuda", dtype=dtype) for _ in range(S)]
    g_lse = torch.randn(S, N, device="cuda")
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
    w = 1 + 0.1 * torch.randn(d, device="cuda")
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
    # one sublayer's merge + norm, forward and backward through autograd: fused vs the separate ops
    p2_leaves = [
        [outs[k][0].detach().requires_grad_(), partial[k].detach().requires_grad_()] for k in range(sets)
    ]
    wl, ql0 = w.detach().requires_grad_(), q[0].detach().requires_grad_()

    def merge_fb(fused: bool):
        def go(k):
            o, p = p2_leaves[k % sets]
            m = lse[k % sets][0]
            if fused:
                y = ops.phase2_norm(o, m, p, ql0, wl, EPS, NORM_EPS)[0]
            else:
                y = rms_norm(ops.phase2(o, m, p, ql0, EPS)[0], wl, NORM_EPS)
            torch.autograd.grad(y, [o, p, ql0, wl], d_out)

        return go

    row_extra = {
        "merge_norm_fwd_bwd_ms": _time(merge_fb(True)),
        "merge_then_norm_fwd_bwd_ms": _time(merge_fb(False)),
    }
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
        if baselines["fla"] is not None:
            fla = baselines["fla"]
            ones = torch.ones(d, device="cuda", dtype=dtype)
            qd = q.to(dtype)
            row["fla_block_fwd_ms"] = _safe(
                lambda: _time(
                    lambda k: [
                        fla(qd[j], src[k % sets] + [partial[k % sets]], ones, rms_eps=EPS) for j in range(S)
                    ],
                    reps=3,
                )
            )
            fl_leaves = [s.detach().requires_grad_() for s in src[0] + [partial[0]]]

            def fla_fb(k):
                for j in range(S):
                    o = fla(qd[j], fl_leaves, ones, rms_eps=EPS)
                    o.backward(g_out[j])

            row["fla_block_fwd_bwd_ms"] = _safe(lambda: _time(fla_fb, reps=3))

            p_l = partial[0].detach().requires_grad_()

            def ours_block_fb(k):
                o, m = ops.phase1(leaves, ql, EPS)
                hs = [ops.phase2(o[j], m[j], p_l, ql[j], EPS)[0] for j in range(S)]
                torch.autograd.backward(hs, g_out)

            row["block_fwd_bwd_autograd_ms"] = _time(ours_block_fb, reps=3)
    return row


def grid(quick: bool) -> list[tuple[int, int, int, int]]:
    if quick:
        cases = [(16384, d, n, S) for d in GRID_DIMS for n in (3, 9, 33) for S in (1, 4, 8, 12)]
        cases += [(N, d, 9, 8) for N in (4096, 65536) for d in (2048, 7168)]
    else:
        cases = [
            (N, d, n, S) for N in GRID_TOKENS for d in GRID_DIMS for n in GRID_SOURCES for S in GRID_QUERIES
        ]
    return cases


def fits(N: int, d: int, n: int, S: int, es: int, free: int) -> bool:
    need = (2 * n + 2 * S + 8) * N * d * es  # one input set plus outputs, gradients and slack
    return need < 0.6 * free


def run(
    cases: Sequence[tuple[int, int, int, int]] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = True,
    compare_cases: Sequence[tuple[int, int, int, int]] | None = None,
    json_path: Path | str | None = DEFAULT_JSON,
) -> dict:
    """Benchmark `cases` (N, d, n, S) and return (and write) the results."""
    assert torch.cuda.is_available() and ops.backend("cuda") == "compiled", "needs CUDA and the CUDA build"
    cases = list(cases) if cases is not None else grid(quick)
    if compare_cases is None:
        compare_cases = [(16384, 2048, 9, 8), (16384, 2304, 9, 8)]
    # the grid first (fast), then the shapes compared with the baselines (slow: they compile)
    plan = [(c, False) for c in cases] + [(c, True) for c in compare_cases]
    copy_gbs = copy_bandwidth()
    dev = torch.cuda.get_device_properties(0)
    print(f"device {dev.name}, {dev.multi_processor_count} SMs; copy {copy_gbs:.0f} GB/s", flush=True)
    baselines = _baselines()
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
        print(_line(row), flush=True)
        if json_path is not None:  # after every row, so that a run cut short keeps what it measured
            _write(json_path, _result(dev, copy_gbs, dtype, t0, rows))
    result = _result(dev, copy_gbs, dtype, t0, rows)
    if json_path is not None:
        _write(json_path, result)
    print_table(result)
    return result


def _write(path: Path | str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


def _result(dev, copy_gbs: float, dtype: torch.dtype, t0: float, rows: list[dict]) -> dict:
    return {
        "device": dev.name,
        "sms": dev.multi_processor_count,
        "copy_GBps": copy_gbs,
        "versions": _versions(),
        "command": " ".join(sys.argv),
        "dtype": str(dtype),
        "seconds": time.time() - t0,
        "rows": rows,
    }


def _line(r: dict) -> str:
    ops_ = (
        "phase1_fwd", "phase1_bwd", "phase1_bwd_fused", "phase2_fwd", "phase2_bwd", "phase2_norm_fwd",
        "phase2_norm_bwd", "direct_fwd", "direct_bwd",
    )  # fmt: skip
    cells = " ".join(f"{r[k]['ms']:7.3f}/{r[k]['pct_copy']:3.0f}%" if k in r else " " * 12 for k in ops_)
    merge = ""
    if "merge_norm_fwd_bwd_ms" in r:
        fused, apart = r["merge_norm_fwd_bwd_ms"], r["merge_then_norm_fwd_bwd_ms"]
        merge = f" | {fused:7.3f} {apart:7.3f} {apart / fused:5.2f}x"
    return f"N={r['N']:5d} d={r['d']:4d} n={r['n']:2d} S={r['S']:2d} | {cells}{merge}"


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(f"\n{result['device']}  copy {result['copy_GBps']:.0f} GB/s  dtype {result['dtype']}")
    print("ms / % of copy bandwidth at minimum traffic")
    print(
        "     N    d  n  S |   p1 fwd      |   p1 bwd      | p1 bwd fused  |   p2 fwd      |   p2 bwd      "
        "| p2+norm fwd   | p2+norm bwd   |  direct fwd   |  direct bwd   "
        "| merge+norm fwd+bwd (autograd): fused, apart, ratio"
    )
    for r in rows:
        print(_line(r))
    cmp_rows = [r for r in rows if "compile_phase1_fwd_ms" in r]
    if cmp_rows:
        print("\nspeed-ups (baseline ms / ours ms); block = S sublayers: fla S calls vs phase1 + S phase2")
        print(
            "     N    d  n  S | p1 fwd: ours  compile   far    | p1 fwd+bwd: ours compile  far   | "
            "block fwd: ours  fla  | block fwd+bwd: ours  fla"
        )
        for r in cmp_rows:
            o1, o2 = r["phase1_fwd"]["ms"], r["phase1_fwd_bwd_ms"]
            b1, b2 = r["block_fwd_ms"], r["block_fwd_bwd_autograd_ms"]
            head = f"N={r['N']:5d} d={r['d']:4d} n={r['n']:2d} S={r['S']:2d}"

            def sp(x, o):
                return "-" if x is None else f"{x / o:5.1f}x"

            g = r.get
            print(
                f"{head} | {o1:6.3f} {sp(g('compile_phase1_fwd_ms'), o1)} {sp(g('far_phase1_fwd_ms'), o1)}"
                f" | {o2:6.3f} {sp(g('compile_phase1_fwd_bwd_ms'), o2)} {sp(g('far_phase1_fwd_bwd_ms'), o2)}"
                f" | {b1:6.3f} {sp(g('fla_block_fwd_ms'), b1)}"
                f" | {b2:6.3f} {sp(g('fla_block_fwd_bwd_ms'), b2)}"
            )


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


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 16384 sweep plus a few other token counts")
    p.add_argument("--full", action="store_true", help="the whole grid of the issue (long)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--no-compare", action="store_true", help="skip the baselines")
    p.add_argument("--compare-only", action="store_true",
                   help="only the baseline comparisons (each shape compiles and autotunes: minutes)")
    p.add_argument("--compare", default=None, metavar="N,d,n,S[;N,d,n,S...]",
                   help="the shapes compared with the baselines (default: 16384,2048,9,8;16384,2304,9,8)")
    a = p.parse_args(argv)
    compare = [] if a.no_compare else parse_shapes(a.compare)
    run(
        cases=[] if a.compare_only else None,
        quick=not a.full,
        dtype=getattr(torch, a.dtype),
        json_path=a.json,
        compare_cases=compare,
    )


if __name__ == "__main__":
    main()
