"""The op benchmark's command line (CPU here): a tiny CPU run writes its JSON, and the CUDA route
parses its shapes and refuses clearly without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from attnres import cli
from attnres.bench.ops_cuda import parse_shapes
from attnres.errors import UsageError


def test_compare_shapes_parse_and_bad_ones_name_the_format():
    assert parse_shapes("16384,2048,9,8; 4096,7168,33,12") == [(16384, 2048, 9, 8), (4096, 7168, 33, 12)]
    assert parse_shapes(None) is None and parse_shapes("none") == [] and parse_shapes("") == []
    with pytest.raises(ValueError, match="N,d,n,S"):
        parse_shapes("16384,2048,9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_route_without_a_gpu_says_so():
    with pytest.raises(UsageError, match="no CUDA device here"):
        cli.bench_ops(device="cuda")


def test_compare_is_refused_on_cpu():
    with pytest.raises(UsageError, match="--compare is for --device cuda"):
        cli.bench_ops(device="cpu", compare="16384,2048,9,8")


def test_quick_cpu_run_writes_rows_with_speedups(tmp_path, monkeypatch):
    from attnres.bench import ops as bench

    small = dict(dtypes=("fp32",), tokens=(64,), dims=(32,), sources=(3,), queries=(2,))
    monkeypatch.setitem(bench.GRIDS["cpu"], True, small)
    out = tmp_path / "ops.json"
    cli.bench_ops(device="cpu", quick=True, out=str(out), threads=1, repeats=1)
    rows = json.loads(out.read_text())["results"]
    assert {(r["op"], r["mode"]) for r in rows} == {(o, m) for o in bench.OPS for m in bench.MODES}
    assert all(r["kernel_ms"] > 0 and r["reference_ms"] > 0 and r["speedup"] > 0 for r in rows)
