"""Kernel by kernel, where two `attnres bench e2e` profiles differ (an A/B's base and new side).

    python -m benchmarks.profile_diff BASE.json NEW.json [--mode standard] [--variant eager] [--top 15]

Takes from each file the first row with a profile (``--profile true`` or ``kernels``) that matches the
filters, and prints its step time, device time and kernel count, the device time per kernel family
(``attnres.bench.timing.KERNEL_FAMILIES``), then the kernels whose total time changed most (down, then
up), with their call counts on each side. A kernel only in a file's 40 heaviest (files
written before session 21 keep only those) counts as absent from the other when missing there, so read
small entries with care. ``--out FILE`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from attnres.bench.timing import kernel_families


def profiled_row(path: str | Path, **match: str) -> dict[str, Any]:
    """The first row of ``path`` with a profile whose fields equal ``match`` (None values ignored)."""
    rows = json.loads(Path(path).read_text())["rows"]
    for row in rows:
        if row.get("profile") and all(v is None or str(row.get(k)) == v for k, v in match.items()):
            return row
    raise SystemExit(f"{path}: no profiled row with {match} (rows: "
                     f"{[(r.get('mode'), r.get('variant'), r.get('optimizer')) for r in rows]})")


def diff(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Each side's step, device time and kernel count, and per kernel name its change (``delta_ms``), time
    and calls on each side, sorted by the change."""
    b = {k["op"]: k for k in base["profile"]["top_ops"]}
    n = {k["op"]: k for k in new["profile"]["top_ops"]}
    changes = []
    for name in b.keys() | n.keys():
        bk, nk = b.get(name, {}), n.get(name, {})
        bm, nm = bk.get("self_ms", 0.0), nk.get("self_ms", 0.0)
        changes.append({"kernel": name, "delta_ms": nm - bm, "base_ms": bm, "new_ms": nm,
                        "base_calls": bk.get("count", 0), "new_calls": nk.get("count", 0)})
    changes.sort(key=lambda c: (c["delta_ms"], c["kernel"]))
    fb, fn = kernel_families(base["profile"]["top_ops"]), kernel_families(new["profile"]["top_ops"])
    families = {f: {"base_ms": fb.get(f, 0.0), "new_ms": fn.get(f, 0.0),
                    "delta_ms": round(fn.get(f, 0.0) - fb.get(f, 0.0), 3)}
                for f in sorted(fb.keys() | fn.keys(), key=lambda f: -max(fb.get(f, 0.0), fn.get(f, 0.0)))}
    side = {k: {"step_ms": r["ms"], "device_ms": r["profile"].get("device_ms"),
                "kernels": r["profile"].get("kernels"), "named": len(r["profile"]["top_ops"])}
            for k, r in (("base", base), ("new", new))}
    return {**side, "families": families, "changes": changes}


def table(d: dict[str, Any], top: int) -> str:
    lines = [f"{'':6}{'step ms':>10}{'device ms':>11}{'kernels':>9}{'named':>7}"]
    for k in ("base", "new"):
        s = d[k]
        lines.append(f"{k:6}{s['step_ms']:10.2f}{s['device_ms'] or 0:11.2f}{s['kernels'] or 0:9d}"
                     f"{s['named']:7d}")
    lines.append(f"{'family':<38}{'base':>9}{'new':>9}{'change':>9}")
    for f, v in d["families"].items():
        lines.append(f"{f:<38}{v['base_ms']:9.2f}{v['new_ms']:9.2f}{v['delta_ms']:+9.2f}")
    ch = d["changes"]
    picked = ch[:top] + [None] + [c for c in ch[-top:] if c not in ch[:top]]
    lines.append(f"{'change':>9}{'base':>9}{'new':>9}{'calls':>12}  kernel")
    for c in picked:
        if c is None:
            lines.append(f"{'...':>9}")
            continue
        calls = f"{c['base_calls']}->{c['new_calls']}"
        lines.append(f"{c['delta_ms']:+9.2f}{c['base_ms']:9.2f}{c['new_ms']:9.2f}{calls:>12}  "
                     f"{c['kernel'][:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("new")
    p.add_argument("--mode", help="the rows' residual mode (standard, block, full)")
    p.add_argument("--variant", help="eager, compile, ...")
    p.add_argument("--optimizer", default="none", help="profiled rows have none (default)")
    p.add_argument("--top", type=int, default=15, help="kernels shown each way")
    p.add_argument("--out", help="also write the comparison as JSON")
    a = p.parse_args(argv)
    match = {"mode": a.mode, "variant": a.variant, "optimizer": a.optimizer}
    d = diff(profiled_row(a.base, **match), profiled_row(a.new, **match))
    print(table(d, a.top))
    if a.out:
        Path(a.out).write_text(json.dumps(d, indent=1))
    return d


if __name__ == "__main__":
    main()
