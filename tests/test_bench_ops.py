"""The op benchmark's command line (CPU here): a tiny CPU run writes its JSON, and the CUDA route
parses its shapes and refuses clearly without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from attnres.bench.ops import parse_shapes
from attnres.errors import UsageError
from lightning_modules.main import bench_ops


def test_compare_shapes_parse_and_bad_ones_name_the_format():
    assert parse_shapes("16384,2048,9,8; 4096,7168,33,12") == [(16384, 2048, 9, 8), (4096, 7168, 33, 12)]
    assert parse_shapes(None) is None and parse_shapes("none") == [] and parse_shapes("") == []
    with pytest.raises(ValueError, match="N,d,n,S"):
        parse_shapes("16384,2048,9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_route_without_a_gpu_says_so():
    with pytest.raises(UsageError, match="no CUDA device here"):
        bench_ops(device="cuda")


def test_compare_is_refused_on_cpu():
    with pytest.raises(UsageError, match="--compare is for --device cuda"):
        bench_ops(device="cpu", compare="16384,2048,9,8")


def test_quick_cpu_run_writes_rows_with_speedups(tmp_path, monkeypatch):
    from attnres.bench import ops as bench

    small = dict(dtypes=("fp32",), tokens=(64,), dims=(32,), sources=(3,), queries=(2,))
    monkeypatch.setitem(bench.GRIDS["cpu"], True, small)
    out = tmp_path / "ops.json"
    bench_ops(device="cpu", quick=True, out=str(out), threads=1, repeats=1)
    rows = json.loads(out.read_text())["results"]
    assert {(r["op"], r["mode"]) for r in rows} == {(o, m) for o in bench.OPS for m in bench.MODES}
    assert all(r["kernel_ms"] > 0 and r["reference_ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_cuda_rows_have_every_op_when_run_on_the_cpu(monkeypatch):
    """The CUDA benchmark's row (``bench_case``: every op forward and backward, the fused phase-2 norm with
    and without the add, merge + norm fused vs apart, the block sums) built on a CPU at a tiny shape,
    without baselines. The fused ops have CUDA kernels only: here they are phase 2, the norm and the add,
    with the same signatures."""
    from attnres import ops
    from attnres.bench import report
    from attnres.bench.ops import bench_case, cuda_grid
    from attnres.ops import rms_norm

    if ops.backend("cpu") != "compiled":
        pytest.skip("calls torch.ops.attnres directly: needs the built extension")

    def phase2_norm(o, m, p, q, w, eps, norm_eps):
        h, lse = ops.phase2(o, m, p, q, eps)
        return rms_norm(h, w, norm_eps), lse

    def phase2_norm_backward(d_out, d_lse, o, m, lse, p, q, w, eps, norm_eps):
        return torch.ops.attnres.phase2_backward(d_out, d_lse, o, m, lse, p, q, eps)

    def phase2_norm_add(o, m, prev, v, q, w, eps, norm_eps):
        return (*phase2_norm(o, m, prev + v, q, w, eps, norm_eps), prev + v)

    def phase2_norm_add_backward(d_out, d_lse, d_p, o, m, lse, p, q, w, eps, norm_eps):
        g_o, g_m, g_p, g_q = phase2_norm_backward(d_out, d_lse, o, m, lse, p, q, w, eps, norm_eps)
        return g_o, g_m, g_p + d_p, g_q, w

    monkeypatch.setattr(ops, "phase2_norm", phase2_norm)
    monkeypatch.setattr(ops, "fused_add", lambda device: True)
    for fn in (phase2_norm, phase2_norm_backward, phase2_norm_add, phase2_norm_add_backward):
        monkeypatch.setattr(torch.ops.attnres, fn.__name__, fn, raising=False)
    row = bench_case(64, 32, 3, 2, torch.float32, 10.0, {"far": None, "fla": None}, False, device="cpu")
    for key in ("phase1_fwd", "phase1_bwd", "phase1_bwd_fused", "phase2_fwd", "phase2_bwd", "phase2_norm_fwd",
                "phase2_norm_bwd", "phase2_norm_add_fwd", "phase2_norm_add_bwd", "direct_fwd", "direct_bwd"):
        assert row[key]["ms"] > 0 and row[key]["GBps"] > 0 and row[key]["pct_copy"] > 0, key
    assert row["block_fwd_ms"] == row["phase1_fwd"]["ms"] + 2 * row["phase2_fwd"]["ms"]
    assert row["merge_norm_fwd_bwd_ms"] > 0 and row["merge_then_norm_fwd_bwd_ms"] > 0
    assert row["add_merge_norm_fwd_bwd_ms"] > 0 and row["add_then_merge_norm_fwd_bwd_ms"] > 0
    assert report.ops_row_line(row).count("x") >= 2  # both fused-vs-apart ratios
    assert "N=   64 d=  32 n= 3 S= 2" in report.ops_row_line(row)
    assert (16384, 2048, 9, 8) in cuda_grid(quick=True) and len(cuda_grid(quick=False)) == 3 * 5 * 6 * 4


def test_two_builds_compare_by_median_round_and_geometric_mean(tmp_path, capsys):
    from attnres.bench.report import compare_ops_runs

    def run(name, p1, p2):
        rows = [{"N": 16, "d": 8, "n": 3, "S": 1, "dtype": "bfloat16", "phase1_fwd": {"ms": p1, "GBps": 1.0},
                 "phase2_fwd": {"ms": p2}, "block_fwd_ms": 9.0}]
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
        return tmp_path / name

    base = [run("a1", 1.0, 4.0), run("a2", 3.0, 4.0), run("a3", 2.0, 4.0)]  # medians 2.0, 4.0
    new = [run("b1", 1.0, 2.0)]
    out = compare_ops_runs(base, new)
    ratios = {r["op"]: r["ratio"] for r in out["rows"]}
    assert ratios == pytest.approx({"phase1_fwd": 0.5, "phase2_fwd": 0.5})  # plain numbers are not ops
    assert out["geomean"] == pytest.approx({"phase1_fwd": 0.5, "phase2_fwd": 0.5})
    assert "phase1_fwd" in capsys.readouterr().out
