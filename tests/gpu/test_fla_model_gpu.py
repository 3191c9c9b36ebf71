"""GPU: fla's own ``KDAForCausalLM``, the peer of ``attnres bench e2e --impls '[fla-model]'``, at small
all-KDA dense shapes: built by the benchmark's builder, it has the parameter count that
:func:`attnres.bench.peers.fla_kda_num_params` derives from fla's modeling code (and our
decoder's), its ``attnres_block_size`` is the one mapped from our ``num_blocks``, and one forward +
backward runs in bf16; then the benchmark's quick ``kda-dense`` rows run for both models.

Needs a CUDA device, fla-core 0.6.0, flash-linear-attention 0.6.0 (``fla.models``) and transformers::

    pip install flash_linear_attention-0.6.0-py3-none-any.whl transformers
    python -m pytest tests/gpu/test_fla_model_gpu.py -v
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from attnres.bench import e2e
from attnres.bench.peers import (
    build_fla_model,
    fla_block_size,
    fla_kda_num_params,
    fla_model_kwargs,
    fla_model_status,
)
from attnres.bench.shapes import default_shapes
from attnres.model import Decoder


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not (_importable("fla.models") and _importable("transformers")),
        reason="needs flash-linear-attention 0.6 (fla.models) and transformers",
    ),
]


@pytest.mark.parametrize("mode", ["standard", "block", "full"])
def test_flas_model_has_the_analytic_parameter_count_and_trains_one_step(mode):
    assert fla_model_status() is None, fla_model_status()
    # the quick kda-dense shape (4 KDA heads of 64, as the shipped autotune results) at a longer sequence
    cfg = default_shapes(quick=True)["kda-dense"].config.replace(residual=mode, vocab_size=1000)
    assert (cfg.dim, cfg.num_layers, cfg.kda_heads, cfg.kda_head_dim, cfg.num_blocks) == (256, 4, 4, 64, 4)
    model = build_fla_model(cfg, "cuda", torch.bfloat16)
    fla = model.model
    expected = {"standard": None, "block": 2, "full": 1}[mode]  # 8 sublayers in 4 blocks: 2 sublayers each
    assert fla.config.attnres_block_size == fla_block_size(cfg) == expected
    assert (fla.config.hidden_size, fla.config.num_hidden_layers, fla.config.num_heads,
            fla.config.head_dim) == (256, 4, 4, 64)
    n = sum(p.numel() for p in fla.parameters())
    with torch.device("meta"):
        ours = sum(p.numel() for p in Decoder(cfg).parameters())
    assert n == fla_kda_num_params(fla_model_kwargs(cfg)) == cfg.num_params() == ours
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in fla.parameters())

    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=g).cuda()
    out = model(ids, labels=ids)
    loss = out.loss + out.aux_loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0, loss.item()
    loss.backward()
    grads = [p.grad for p in fla.parameters()]
    # fla's first sublayer reads the embedding alone (no softmax): its attnres query gets no gradient
    assert sum(gr is not None for gr in grads) >= len(grads) - 2
    assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)
    assert fla.lm_head.weight.grad is not None and fla.model.embeddings.weight.grad is not None
    if mode != "standard":
        assert fla.model.res_proj.weight.grad is not None


def test_bench_kda_dense_rows_run_both_models(tmp_path):
    path = tmp_path / "e2e_peer.json"
    e2e.run_e2e_benchmark(
        quick=True, shapes=["kda-dense"], modes=["standard", "block"], kinds=["train"], variants=["eager"],
        impls=["attnres", "fla-model"], warmup=1, repeat=2, profile=False, device="cuda", out=path,
    )
    data = json.loads(path.read_text())
    assert data["fla_model"]["available"], data["fla_model"]
    rows = [r for r in data["rows"] if r["shape"] == "kda-dense"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    described = data["shapes"]["kda-dense"]["fla_model"]
    for r in rows:  # the real models' counts: fla's equals the analytic count, ours too
        key = "params_analytic" if r["impl"] == "fla-model" else "ours_params"
        assert r["params"] == described[r["mode"]][key], r
    whats = {(q["what"], q["optimizer"]) for q in data["ratios"]}
    for mode in ("standard", "block"):
        assert {(f"attnres/fla-model {mode}", "none"), (f"attnres/fla-model {mode}", "adamw")} <= whats
