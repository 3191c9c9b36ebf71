"""`attnres bench scaling` on CPU (gloo): every layout runs, the stage-boundary bytes it reports are
the stage cache's analytic count, caching sends fewer bytes under interleaving, and the JSON holds what
the table shows."""

from __future__ import annotations

import json
import math

import pytest
import torch.distributed as dist

from attnres.bench.scaling import Layout, bench_scaling, parse_layouts

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_parse_layouts():
    assert parse_layouts("1x1, 2x4,2x4,4X2") == [Layout(1, 1), Layout(2, 4), Layout(4, 2)]
    assert Layout(2, 4).world == 8 and Layout(2, 4).describe() == "PP=2 x FSDP=4"
    for bad in ("2", "2x", "0x2", ""):
        with pytest.raises(ValueError, match="layout|empty"):
            parse_layouts(bad)


def test_weak_scaling_on_cpu(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    res = bench_scaling(
        layouts="1x1,1x2,2x1",
        preset="tiny",
        residual="block",
        num_blocks=4,
        batch_per_gpu=2,
        seq_len=32,
        schedule="interleaved_1f1b",
        caching="both",
        steps=2,
        warmup=1,
        device="cpu",
        timeout_s=240,
        out=str(out),
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    rows = {(r["layout"], r["caching"]): r for r in res["rows"]}
    assert set(rows) == {("1x1", None), ("1x2", None), ("2x1", True), ("2x1", False)}
    assert all(r["status"] == "ok" for r in rows.values()), res["rows"]
    for r in rows.values():
        # tokens/s and the step time describe the same steps: global batch x seq_len per step
        assert r["tokens_per_s"] * r["step_ms"] / 1e3 == pytest.approx(r["global_batch"] * 32, rel=1e-6)
        assert r["global_batch"] == 2 * r["devices"]
        assert r["efficiency"] == pytest.approx(
            r["tokens_per_s"] / (r["devices"] * rows["1x1", None]["tokens_per_s"])
        )
        assert abs(r["loss"] - math.log(264)) < 1.0  # random tokens over the tiny vocabulary (264)
    cached, plain = rows["2x1", True], rows["2x1", False]
    for r in (cached, plain):  # one step's bytes, as the cache counts them analytically
        assert r["boundary_bytes_per_microbatch"]["forward"] == r["boundary_bytes_analytic"]
    assert cached["boundary_bytes_analytic"] < plain["boundary_bytes_analytic"]
    assert cached["max_crossings"] == 1 < plain["max_crossings"]
    table = capsys.readouterr().out
    assert "| 2x1 | PP=2 | on |" in table and "| 1x2 | FSDP=2 | – |" in table
