"""Pipeline parallelism, FSDP2 and PP x FSDP on CPU (gloo, several processes) against one process.

Starting a process costs seconds (importing torch and torch.distributed.pipelining), so one group of
2 and one group of 4 processes run every scenario once (module-scoped fixtures); each process writes
what it measured and the tests below check it: the loss and every gradient equal the single-process
run of the same model and batch within fp32 tolerance; the bytes sent per microbatch equal the
analytic count, and each block summary crosses each link at most once per microbatch and direction.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

BATCH, SEQ, VOCAB, DIM = 8, 16, 64, 32
GRAD_ATOL, LOSS_RTOL = 2e-5, 1e-5


def tiny_config(residual: str, num_layers: int):
    """``residual``: a mode, or ``block_recompute`` (Block AttnRes with ``residual_recompute``)."""
    from attnres.model import get_config

    return get_config(
        "tiny",
        residual=residual.removesuffix("_recompute"),
        residual_recompute=residual.endswith("_recompute"),
        num_layers=num_layers,
        num_blocks=num_layers // 2,
        dim=DIM,
        vocab_size=VOCAB,
        kda_head_dim=16,
        mla_v_head_dim=16,
        mla_qk_nope_dim=16,
        mla_qk_shared_dim=8,
        mla_kv_rank=16,
        mlp_dim=64,
        expert_dim=32,
        num_experts=4,
        aux_loss_coef=0.01,
    )


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(
        0, VOCAB, (BATCH, SEQ), generator=g
    )


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _Reference:
    """The single-process model and its gradients for one batch, per (residual, num_layers)."""

    def __init__(self) -> None:
        self._cache: dict = {}

    def __call__(self, residual: str, num_layers: int):
        residual = residual.removesuffix("_recompute")  # the reference is the plain path
        key = (residual, num_layers)
        if key not in self._cache:
            from attnres.model import Decoder

            torch.manual_seed(0)
            model = Decoder(tiny_config(residual, num_layers))
            init = {k: v.clone() for k, v in model.state_dict().items()}
            x, y = batch()
            out = model(x, labels=y)
            (out.loss + out.aux_loss).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            self._cache[key] = (init, out.loss.item(), grads, out.aux_loss.item())
        return self._cache[key]


def _fresh(residual: str, num_layers: int, init: dict):
    from attnres.model import Decoder

    model = Decoder(tiny_config(residual, num_layers))
    model.load_state_dict(init)
    return model


def _compare(named_params, ref_grads) -> float:
    worst, seen = 0.0, 0
    for n, p in named_params:
        assert p.grad is not None, f"{n} has no gradient"
        worst = max(worst, (_full(p.grad) - ref_grads[n]).abs().max().item())
        seen += 1
    assert seen > 0
    return worst


def _pipeline_case(
    ref, group, residual, num_layers, schedule, virtual, caching=True, n_mb=4, dp_mesh=None, dp=1, dp_rank=0
):
    from attnres.parallel import build_pipeline, payload_bytes

    init, ref_loss, ref_grads, ref_aux = ref(residual, num_layers)
    model = _fresh(residual, num_layers, init)
    x, y = batch()
    x, y = x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank]
    mb = x.shape[0] // n_mb
    pipe = build_pipeline(
        model, group, schedule, n_mb, virtual_stages=virtual, caching=caching, dp_mesh=dp_mesh
    )
    loss, aux = pipe.step(x, y, return_aux=True)
    if dp > 1:
        for t in (loss, aux):
            dist.all_reduce(t, group=dp_mesh.get_group())
            t /= dp
    from lightning_modules.strategies.pipeline import clip_grad_norm_across_stages

    # the gradient norm over all stages (and FSDP shards), as the strategy clips with
    norm = clip_grad_norm_across_stages(list(pipe.model.parameters()), 1e9, group).item()
    return {
        "norm": norm,
        "ref_norm": torch.nn.utils.get_total_norm(list(ref_grads.values())).item(),
        "loss": loss.item(),
        "ref_loss": ref_loss,
        "aux": aux.item(),
        "ref_aux": ref_aux,
        "grad_err": _compare(pipe.model.named_parameters(), ref_grads),
        "bytes": pipe.bytes_per_microbatch(),
        "max_crossings": pipe.max_crossings(),
        "analytic": payload_bytes(pipe.cache, mb, SEQ, DIM, torch.float32),
        "num_stages": pipe.cache.layout.num_stages,
    }


def _fsdp_case(ref, mesh, residual, num_layers):
    from attnres.parallel import apply_fsdp

    init, ref_loss, ref_grads, _ = ref(residual, num_layers)
    model = apply_fsdp(_fresh(residual, num_layers, init), mesh)
    dp, r = mesh.size(), mesh.get_local_rank()
    x, y = batch()
    out = model(x.chunk(dp)[r], labels=y.chunk(dp)[r])
    (out.loss + out.aux_loss).backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=mesh.get_group())
    return {
        "loss": loss.item() / dp,
        "ref_loss": ref_loss,
        "grad_err": _compare(model.named_parameters(), ref_grads),
    }


def _checkpoint_case(ref, ckpt_dir: str):
    """Train one step at PP=2, save with DCP, load at PP=1 and at FSDP=2: same validation loss."""
    import torch.distributed.checkpoint as dcp

    from attnres.parallel import build_pipeline

    init, _, _, _ = ref("block", 4)
    xv, yv = batch(seed=7)
    pipe = build_pipeline(_fresh("block", 4, init), dist.group.WORLD, "1f1b", 4)
    x, y = batch()
    pipe.step(x, y)
    torch.optim.SGD(pipe.model.parameters(), lr=0.5).step()
    val_pp2 = pipe.step(xv, yv, train=False).item()
    dcp.save(pipe.model.state_dict(), checkpoint_id=ckpt_dir)

    single = _fresh("block", 4, {k: torch.zeros_like(v) for k, v in init.items()})
    sd = single.state_dict()
    dcp.load(sd, checkpoint_id=ckpt_dir)
    single.load_state_dict(sd)
    with torch.no_grad():
        val_pp1 = single(xv, labels=yv).loss.item()

    val_fsdp2, val_init = _validate_at_fsdp(init, ckpt_dir, xv, yv)
    return {"val_pp2": val_pp2, "val_pp1": val_pp1, "val_fsdp2": val_fsdp2, "val_init": val_init}


def _validate_at_fsdp(init: dict, ckpt_dir: str, xv, yv) -> tuple[float, float]:
    """Load the DCP checkpoint into a zeroed model sharded with FSDP over every rank: its mean validation
    loss on ``(xv, yv)``, and that of the model at ``init`` (which the checkpoint must differ from)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from attnres.parallel import apply_fsdp, init_mesh

    world = dist.get_world_size()
    mesh = init_mesh(1, world)["dp"]
    sharded = apply_fsdp(_fresh("block", 4, {k: torch.zeros_like(v) for k, v in init.items()}), mesh)
    sd = get_model_state_dict(sharded)
    dcp.load(sd, checkpoint_id=ckpt_dir)
    sharded.load_state_dict(sd)
    r = mesh.get_local_rank()
    with torch.no_grad():
        loss = sharded(xv.chunk(world)[r], labels=yv.chunk(world)[r]).loss.detach()
    dist.all_reduce(loss)  # on WORLD (= the mesh's ranks)
    with torch.no_grad():
        val_init = _fresh("block", 4, init)(xv, labels=yv).loss.item()
    return loss.item() / world, val_init


def _checkpoint_pp2_fsdp2_case(ref, ckpt_dir: str):
    """Train one step at PP=2 x FSDP=2, save with DCP, load at FSDP=4: same validation loss."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from attnres.parallel import build_pipeline, init_mesh

    init, _, _, _ = ref("block", 4)
    xv, yv = batch(seed=7)
    mesh = init_mesh(2, 2)
    dp, r = mesh["dp"], mesh["dp"].get_local_rank()
    pipe = build_pipeline(_fresh("block", 4, init), mesh["pp"].get_group(), "1f1b", 2, dp_mesh=dp)
    x, y = batch()
    pipe.step(x.chunk(2)[r], y.chunk(2)[r])
    torch.optim.SGD(pipe.model.parameters(), lr=0.5).step()
    val = pipe.step(xv.chunk(2)[r], yv.chunk(2)[r], train=False).detach().clone()
    dist.all_reduce(val, group=dp.get_group())
    dcp.save(get_model_state_dict(pipe.model), checkpoint_id=ckpt_dir)

    val_fsdp4, val_init = _validate_at_fsdp(init, ckpt_dir, xv, yv)
    return {"val_pp2_fsdp2": val.item() / 2, "val_fsdp4": val_fsdp4, "val_init": val_init}


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    from attnres.parallel import close_process_groups

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results: dict = {}
    try:
        _cases(world, out_dir, results)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed case's models must not outlive the groups
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        close_process_groups()  # the cases' models and meshes are out of scope: their groups go too


def _cases(world: int, out_dir: str, results: dict) -> None:
    """Every case of a ``world``-rank run, into ``results`` (kept as far as it got if one fails)."""
    from attnres.parallel import init_mesh

    ref = _Reference()
    group = dist.group.WORLD
    if world == 2:
        for residual in ("block", "standard"):
            for schedule in ("gpipe", "1f1b"):
                results[f"pp2_{schedule}_{residual}"] = _pipeline_case(
                    ref, group, residual, 4, schedule, 1
                )
            results[f"pp2_interleaved_{residual}"] = _pipeline_case(
                ref, group, residual, 4, "interleaved_1f1b", 2
            )
        results["pp2_interleaved_block_nocache"] = _pipeline_case(
            ref, group, "block", 4, "interleaved_1f1b", 2, caching=False
        )
        results["pp2_1f1b_full"] = _pipeline_case(ref, group, "full", 4, "1f1b", 1)
        results["pp2_1f1b_block_recompute"] = _pipeline_case(ref, group, "block_recompute", 4, "1f1b", 1)
        mesh = init_mesh(1, 2)["dp"]
        for residual in ("block", "standard", "block_recompute"):
            results[f"fsdp2_{residual}"] = _fsdp_case(ref, mesh, residual, 4)
        results["checkpoint"] = _checkpoint_case(ref, os.path.join(out_dir, "ckpt"))
    else:
        for residual in ("block", "standard"):
            results[f"pp4_1f1b_{residual}"] = _pipeline_case(ref, group, residual, 4, "1f1b", 1)
            results[f"pp4_interleaved_{residual}"] = _pipeline_case(
                ref, group, residual, 8, "interleaved_1f1b", 2
            )
        results["pp4_interleaved_block_nocache"] = _pipeline_case(
            ref, group, "block", 8, "interleaved_1f1b", 2, caching=False
        )
        mesh = init_mesh(2, 2)
        results["pp2_fsdp2_block"] = _pipeline_case(
            ref,
            mesh["pp"].get_group(),
            "block",
            4,
            "1f1b",
            1,
            n_mb=2,
            dp_mesh=mesh["dp"],
            dp=2,
            dp_rank=mesh["dp"].get_local_rank(),
        )
        results["checkpoint_pp2_fsdp2"] = _checkpoint_pp2_fsdp2_case(ref, os.path.join(out_dir, "ckpt4"))


def _run(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, (world, os.path.join(tmp, "store"), tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two():
    return _run(2)


@pytest.fixture(scope="module")
def four():
    return _run(4)


def _check_equal(per_rank: list[dict], name: str) -> dict:
    for r, res in enumerate(per_rank):
        case = res[name]
        assert case["loss"] == pytest.approx(case["ref_loss"], rel=LOSS_RTOL), (name, r)
        assert case["grad_err"] < GRAD_ATOL, (name, r, case["grad_err"])
    losses = {res[name]["loss"] for res in per_rank}
    assert len(losses) == 1, f"{name}: ranks report different losses {losses}"
    return per_rank[0][name]


def _check_bytes(case: dict) -> None:
    # the MoE balance loss the pipeline reports (summed over stages, mean over microbatches) is the
    # one-process aux_loss: it is a mean over sequences
    assert case["aux"] == pytest.approx(case["ref_aux"], rel=LOSS_RTOL, abs=1e-7)
    assert case["norm"] == pytest.approx(case["ref_norm"], rel=1e-5)
    assert case["bytes"]["forward"] == case["analytic"] == case["bytes"]["backward"]
    assert case["max_crossings"] <= 1


@pytest.mark.parametrize(
    "name",
    [
        "pp2_gpipe_block",
        "pp2_1f1b_block",
        "pp2_gpipe_standard",
        "pp2_1f1b_standard",
        "pp2_1f1b_full",
        "pp2_1f1b_block_recompute",
    ],
)
def test_pp2_matches_single_process(two, name):
    _check_bytes(_check_equal(two, name))


@pytest.mark.parametrize("residual", ["block", "standard"])
def test_pp2_interleaved_two_virtual_stages_matches_single_process(two, residual):
    case = _check_equal(two, f"pp2_interleaved_{residual}")
    assert case["num_stages"] == 4
    _check_bytes(case)


@pytest.mark.parametrize("residual", ["block", "standard"])
def test_pp4_1f1b_matches_single_process(four, residual):
    _check_bytes(_check_equal(four, f"pp4_1f1b_{residual}"))


@pytest.mark.parametrize("residual", ["block", "standard"])
def test_pp4_interleaved_two_virtual_stages_matches_single_process(four, residual):
    case = _check_equal(four, f"pp4_interleaved_{residual}")
    assert case["num_stages"] == 8
    _check_bytes(case)


@pytest.mark.parametrize("world,prefix", [(2, "pp2"), (4, "pp4")])
def test_caching_sends_fewer_bytes_under_interleaving(two, four, world, prefix):
    per_rank = two if world == 2 else four
    cached = per_rank[0][f"{prefix}_interleaved_block"]
    plain = _check_equal(per_rank, f"{prefix}_interleaved_block_nocache")  # same numbers without the cache
    assert plain["bytes"]["forward"] == plain["analytic"]
    assert cached["bytes"]["forward"] < plain["bytes"]["forward"]
    assert cached["bytes"]["backward"] < plain["bytes"]["backward"]
    assert cached["max_crossings"] == 1 < plain["max_crossings"]
    print(
        f"{prefix} interleaved, block AttnRes, bytes per microbatch and direction: "
        f"cached {cached['bytes']}, uncached {plain['bytes']}"
    )


@pytest.mark.parametrize("residual", ["block", "standard", "block_recompute"])
def test_fsdp2_matches_single_process(two, residual):
    _check_equal(two, f"fsdp2_{residual}")


def test_pp2_x_fsdp2_matches_single_process(four):
    _check_bytes(_check_equal(four, "pp2_fsdp2_block"))


def test_checkpoint_saved_at_pp2_loads_at_pp1_and_fsdp2(two):
    for res in two:
        c = res["checkpoint"]
        assert c["val_pp1"] == pytest.approx(c["val_pp2"], rel=1e-5)
        assert c["val_fsdp2"] == pytest.approx(c["val_pp2"], rel=1e-5)
        assert abs(c["val_pp2"] - c["val_init"]) > 1e-4  # the step changed the model: the load matters


def test_checkpoint_saved_at_pp2_x_fsdp2_loads_at_fsdp4(four):
    for res in four:
        c = res["checkpoint_pp2_fsdp2"]
        assert c["val_fsdp4"] == pytest.approx(c["val_pp2_fsdp2"], rel=1e-5)
        assert abs(c["val_pp2_fsdp2"] - c["val_init"]) > 1e-4  # the step changed the model: the load matters
