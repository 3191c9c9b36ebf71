"""What the benchmarks print and how their JSON is combined: the op tables (CPU and CUDA), the
end-to-end table, the ratios of rows measured in the same run, and the merge of several runs' JSON.

Every function reads the rows as they are written to JSON (plain dicts), so a committed result can be
tabulated, and its ratios recomputed, without running anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["compare_ops_runs", "compute_ratios", "format_table", "json_default", "merge_results",
           "ops_row_line", "print_cpu_ops_table", "print_cuda_ops_table"]


# ----------------------------------------------------------------------------- the op tables


def print_cpu_ops_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The CPU op benchmark's table: one line per JSON row of ``results``; ``meta`` the run's header."""
    compiled = any(r["compiled_reference_ms"] is not None for r in rows)
    head = ["op", "mode", "dtype", "N", "d", "n", "S", "kernel ms", "GB/s", "copy GB/s", "% copy", "ref ms"]
    head.append("speed-up")
    if compiled:
        head += ["compiled ref ms", "vs compiled"]
    lines = []
    for r in rows:
        line = [r["op"], r["mode"], r["dtype"], str(r["N"]), str(r["d"])]
        line += [
            str(r["n"]) if r["op"] != "phase2" else "-",
            str(r["S"]) if r["op"] == "phase1" else "-",
            f"{r['kernel_ms']:.2f}",
            f"{r['gbps']:.1f}",
            f"{r['copy_gbps']:.1f}",
            f"{r['pct_copy']:.0f}%",
        ]
        line += [f"{r['reference_ms']:.2f}", f"{r['speedup']:.2f}x"]
        if compiled:
            cm, vs = r["compiled_reference_ms"], r["speedup_compiled"]
            line += ["-" if cm is None else f"{cm:.2f}", "-" if cm is None else f"{vs:.2f}x"]
        lines.append(line)
    title = (
        f"attnres ops on {meta['device_name']} ({meta['device']}, backend {meta['backend']}, "
        f"{meta['threads']} threads, torch {meta['torch']}); "
        f"copy bandwidth at start {meta['copy_gbps']:.1f} GB/s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
        print(title)
        for line in [head, *lines]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 3 else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=max(160, len(title) + 4)).print(table)


def ops_row_line(r: dict[str, Any]) -> str:
    """One CUDA op-benchmark row as a line: ms / % of the copy bandwidth of each op, then the fused
    merge + norm against the separate ops."""
    ops_ = (
        "phase1_fwd", "phase1_bwd", "phase1_bwd_fused", "phase2_fwd", "phase2_bwd", "phase2_norm_fwd",
        "phase2_norm_bwd", "phase2_norm_add_fwd", "phase2_norm_add_bwd", "direct_fwd", "direct_bwd",
    )  # fmt: skip
    cells = " ".join(f"{r[k]['ms']:7.3f}/{r[k]['pct_copy']:3.0f}%" if k in r else " " * 12 for k in ops_)
    merge = ""
    for fused_key, apart_key in [("merge_norm_fwd_bwd_ms", "merge_then_norm_fwd_bwd_ms"),
                                 ("add_merge_norm_fwd_bwd_ms", "add_then_merge_norm_fwd_bwd_ms")]:
        if fused_key in r:
            fused, apart = r[fused_key], r[apart_key]
            merge += f" | {fused:7.3f} {apart:7.3f} {apart / fused:5.2f}x"
    return f"N={r['N']:5d} d={r['d']:4d} n={r['n']:2d} S={r['S']:2d} | {cells}{merge}"


def print_cuda_ops_table(result: dict[str, Any]) -> None:
    """The CUDA op benchmark's tables (the JSON it writes): every row, then the baseline speed-ups."""
    rows = result["rows"]
    print(f"\n{result['device']}  copy {result['copy_GBps']:.0f} GB/s  dtype {result['dtype']}")
    print("ms / % of copy bandwidth at minimum traffic")
    print(
        "     N    d  n  S |   p1 fwd      |   p1 bwd      | p1 bwd fused  |   p2 fwd      |   p2 bwd      "
        "| p2+norm fwd   | p2+norm bwd   | +add fwd      | +add bwd      |  direct fwd   |  direct bwd   "
        "| merge+norm fwd+bwd (autograd): fused, apart, ratio | the same with the add"
    )
    for r in rows:
        print(ops_row_line(r))
    cmp_rows = [r for r in rows if "compile_phase1_fwd_ms" in r]
    if cmp_rows:
        print("\nspeed-ups (baseline ms / ours ms); block = S sublayers: fla's and fast-attnres's (fa) "
              "S calls vs phase1 + S phase2")
        print(
            "     N    d  n  S | p1 fwd: ours  compile   far    | p1 fwd+bwd: ours compile  far   | "
            "block fwd: ours  fla    fa   | block fwd+bwd: ours  fla    fa"
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
                f" | {b1:6.3f} {sp(g('fla_block_fwd_ms'), b1)} {sp(g('fa_block_fwd_ms'), b1)}"
                f" | {b2:6.3f} {sp(g('fla_block_fwd_bwd_ms'), b2)} {sp(g('fa_block_fwd_bwd_ms'), b2)}"
            )


# ----------------------------------------------------------------------------- end to end


def compute_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Block/standard, Full/standard (ours, fla's and fast-attnres's, against our standard row of the same
    kind, shape, variant, optimizer and batch; fla's model against its own standard row), ours/fla's model
    per mode (``attnres/fla-model``, target ``<= 1``), packed documents/plain windows per mode
    (``attnres-packed``), fla's fused kernels on/off per mode (``attnres-fla-plain``), every mode of ours
    against the standard residual in plain torch (``torch-standard``: ``<mode>/standard(torch-native)``) and
    template/hand-written, from rows of this run, on
    step time and (train) on peak memory, with the memory target ``standard + 1.1 x source bytes``."""
    def key(r: dict[str, Any]) -> tuple:
        return (r.get("kind"), r.get("shape"), r.get("variant"), r.get("optimizer"), r.get("batch"))

    def ratio(r: dict[str, Any], base: dict[str, Any], what: str) -> dict[str, Any]:
        """Row ``r`` against row ``base`` (same kind, shape, variant, optimizer and batch)."""
        entry = {"kind": r["kind"], "shape": r["shape"], "variant": r["variant"],
                 "optimizer": r.get("optimizer"), "batch": r.get("batch"), "what": what,
                 "time_ratio": r["ms"] / base["ms"]}
        if r.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
            entry["mem_ratio"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        return entry

    ok = [r for r in rows if r.get("status") == "ok"]
    std = {(key(r), r["impl"]): r for r in ok if r.get("mode") == "standard"
           and r.get("impl") in ("attnres", "fla-model") and r.get("kind") != "template"}
    out = []
    for r in ok:
        if r.get("kind") == "template" or r.get("mode") == "standard" or r["impl"] in ("attnres-packed",
                                                                                          "attnres-fla-plain"):
            continue  # (torch-standard has standard rows only)
        own = r["impl"] == "fla-model"  # fla's model: AttnRes against its own standard residual
        s = std.get((key(r), "fla-model" if own else "attnres"))
        if s is None:
            continue
        suffix = {"fla": "(fla)", "fast-attnres": "(fast-attnres)", "attnres-recompute": "(recompute)",
                  "attnres-unfused": "(unfused)", "fla-model": "(fla-model)"}.get(r["impl"], "")
        what = f"{r['mode']}{suffix}/standard{suffix if own else ''}"
        entry = ratio(r, s, what)
        if "mem_ratio" in entry and r["kind"] == "train" and r.get("source_bytes"):
            target = s["peak_mem_bytes"] + 1.1 * r["source_bytes"]
            entry.update(mem_target_bytes=target, mem_target_met=r["peak_mem_bytes"] <= target)
        out.append(entry)
    # one impl against another in the same mode: packed documents against plain windows (same tokens per
    # step); fla's fused kernels around KDA (the default) against fla's KDA kernel alone
    for impl, base_impl, what in (("attnres-packed", "attnres", "packed/unpacked"),
                                  ("attnres", "attnres-fla-plain", "fla-fused/fla-plain")):
        bases = {(key(r), r.get("mode")): r for r in ok if r.get("impl") == base_impl}
        for r in ok:
            b = bases.get((key(r), r.get("mode"))) if r.get("impl") == impl else None
            if b is not None:
                out.append(ratio(r, b, f"{r['mode']} {what}"))
    # the baseline a user would write: the standard residual in plain torch (torch's RMSNorm, SwiGLU, loss)
    native = {key(r): r for r in ok if r.get("impl") == "torch-standard" and r.get("mode") == "standard"}
    for r in ok:
        b = native.get(key(r)) if r.get("impl") == "attnres" and r.get("kind") == "train" else None
        if b is not None:
            out.append(ratio(r, b, f"{r['mode']}/standard(torch-native)"))
    peer = {(key(r), r.get("mode")): r for r in ok if r.get("impl") == "fla-model"}
    for r in ok:  # our model against fla's KDAForCausalLM in the same mode: the target is <= 1
        p = peer.get((key(r), r.get("mode"))) if r.get("impl") == "attnres" else None
        if p is None:
            continue
        out.append({**ratio(r, p, f"attnres/fla-model {r['mode']}"), "time_target_met": r["ms"] <= p["ms"]})
    tmpl = {r["impl"]: r for r in ok if r.get("kind") == "template"}
    h = tmpl.get("hand-written")
    for impl, t in tmpl.items() if h is not None else []:
        if impl == "hand-written":
            continue
        out.append({"kind": "template", "shape": t["shape"], "variant": t["variant"], "optimizer": "adamw",
                    "batch": t["batch"], "what": f"{impl}/hand-written", "time_ratio": t["ms"] / h["ms"],
                    "mem_ratio": t["peak_mem_bytes"] / h["peak_mem_bytes"] if h.get("peak_mem_bytes")
                    else None})
    return out


def _fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}G"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of every row, then the ratios."""
    cols = ("kind", "shape", "mode", "impl", "variant", "opt", "B", "ms", "tok/s", "MFU", "peak", "src",
            "status")
    lines = []
    for r in result["rows"]:
        ok = r.get("status") == "ok"
        mfu = r.get("mfu")
        lines.append((
            r.get("kind", ""), r.get("shape", ""), r.get("mode", ""), r.get("impl", ""), r.get("variant", ""),
            r.get("optimizer") or "", str(r.get("batch", "")),
            f"{r['ms']:.3f}" if ok else "-",
            f"{r['tokens_per_s']:.4g}" if ok and r.get("tokens_per_s") else "-",
            f"{100 * mfu:.1f}%" if ok and mfu is not None else "-",
            _fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
            _fmt_bytes(r.get("source_bytes")) if r.get("source_bytes") else "-",
            r.get("status", "") if ok else f"{r.get('status')}: {r.get('reason', '')[:60]}",
        ))
    widths = [max(len(c), *(len(x[i]) for x in lines)) if lines else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
    if result.get("ratios"):
        out += ["", "ratios (same run):"]
        for q in result["ratios"]:
            mem = f"  mem {q['mem_ratio']:.3f}x" if q.get("mem_ratio") else ""
            if "mem_target_met" in q:
                verdict = "met" if q["mem_target_met"] else "MISSED"
                mem += f" (target {_fmt_bytes(q['mem_target_bytes'])}: {verdict})"
            target = ""
            if "time_target_met" in q:
                target = f" (target <= 1: {'met' if q['time_target_met'] else 'MISSED'})"
            out.append(f"  {q['kind']:<8} {q['shape']:<7} {q['variant']:<8} {q.get('optimizer') or '':<6} "
                       f"B={q.get('batch')!s:<3} {q['what']:<25} time {q['time_ratio']:.3f}x{target}{mem}")
    env = result.get("ceilings") or {}
    if env:
        out.append(f"\nmeasured: matmul {env['matmul_tflops']:.3g} TFLOP/s "
                   f"({env['matmul_dtype']} {env['matmul_n']}^3), copy {env['copy_gbps']:.0f} GB/s; "
                   f"peak used for MFU: "
                   f"{(result.get('peak_flops') or 0) / 1e12:.0f} TFLOP/s; device {result.get('device')}")
    return "\n".join(out)


def merge_results(paths: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Merge the JSON of several runs on one device (e.g. the parts of ``benchmarks/device_e2e.sh``)
    into one: ``runs`` keeps each run's command, versions, settings and ceilings; every row and ratio
    gets the ``run`` it came from (ratios are never formed across runs). Written to ``out`` if given."""
    runs, rows, ratios = [], [], []
    merged: dict[str, Any] = {"benchmark": "e2e"}
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = data.get("tag") or Path(path).stem
        for key in ("device", "device_slug", "versions", "ops_backend", "peak_flops", "fla", "quick"):
            merged.setdefault(key, data.get(key))
        merged.setdefault("shapes", {}).update(data.get("shapes", {}))
        merged.setdefault("residual_traffic", {}).update(data.get("residual_traffic", {}))
        runs.append({"run": name, "file": Path(path).name, **{k: data.get(k) for k in (
            "command", "settings", "ceilings", "elapsed_s", "versions", "ops_backend")}})
        rows += [{**r, "run": name} for r in data.get("rows", [])]
        ratios += [{**q, "run": name} for q in data.get("ratios", [])]
    merged.update(runs=runs, rows=rows, ratios=ratios, ceilings=runs[0]["ceilings"] if runs else None)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(merged, indent=1, default=json_default))
    return merged


def compare_ops_runs(base: Sequence[str | Path], new: Sequence[str | Path]) -> dict[str, Any]:
    """Two builds' CUDA op-benchmark JSON, each timed in one or more rounds on one device: per shape and
    op, the median time over each build's rounds and the ratio new / base; per op, the geometric mean of
    the ratios over the shapes both builds timed. Printed as a table and returned."""
    def medians(paths: Sequence[str | Path]) -> dict[tuple, dict[str, float]]:
        times: dict[tuple, dict[str, list[float]]] = {}
        for path in paths:
            for r in json.loads(Path(path).read_text())["rows"]:
                key = (r["N"], r["d"], r["n"], r["S"], r["dtype"])
                for op, v in r.items():
                    if isinstance(v, dict) and isinstance(v.get("ms"), int | float):
                        times.setdefault(key, {}).setdefault(op, []).append(float(v["ms"]))
        return {k: {op: float(torch.tensor(v).median()) for op, v in ops.items()} for k, ops in times.items()}

    a, b = medians(base), medians(new)
    rows, logs = [], {}
    for key in sorted(a.keys() & b.keys()):
        for op in sorted(a[key].keys() & b[key].keys()):
            ratio = b[key][op] / a[key][op]
            rows.append({"shape": list(key), "op": op, "base_ms": a[key][op], "new_ms": b[key][op],
                         "ratio": ratio})
            logs.setdefault(op, []).append(math.log(ratio))
    geomean = {op: math.exp(sum(v) / len(v)) for op, v in logs.items()}
    print(f"{'N':>6} {'d':>5} {'n':>3} {'S':>2} {'op':<11} {'base ms':>9} {'new ms':>9} {'new/base':>8}")
    for r in rows:
        N, d, n, S, _ = r["shape"]
        print(f"{N:>6} {d:>5} {n:>3} {S:>2} {r['op']:<11} {r['base_ms']:>9.4f} {r['new_ms']:>9.4f} "
              f"{r['ratio']:>8.3f}")
    print("geometric mean new/base: " + ", ".join(f"{op} {g:.3f}" for op, g in sorted(geomean.items())))
    return {"rows": rows, "geomean": geomean, "base": [str(p) for p in base], "new": [str(p) for p in new]}


def json_default(o: Any) -> Any:
    """``json.dumps``'s ``default`` for the benchmarks' JSON: dtypes, devices and paths as text."""
    if isinstance(o, torch.dtype | torch.device | Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    return repr(o)
