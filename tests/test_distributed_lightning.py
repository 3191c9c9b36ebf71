"""The Lightning strategies on CPU (gloo, 2 processes started like torchrun): PipelineParallelStrategy
trains like one process (losses per step, with gradient clipping across stages), its sharded DCP
checkpoint loads in one process and under FSDP2Strategy with the same validation loss; NaNGuard works
under it (NaN gradients on one stage skip the step on both, a NaN loss stops both)."""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SEQ, VOCAB, STEPS, CLIP = 16, 64, 3, 0.05


def _module():
    from attnres.model import get_config
    from lightning_modules.module import LanguageModel

    torch.manual_seed(0)
    config = get_config(
        "tiny", residual="block", num_layers=4, num_blocks=2, dim=32, vocab_size=VOCAB, max_seq_len=SEQ,
        kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16, mla_qk_shared_dim=8, mla_kv_rank=16,
        mlp_dim=64, expert_dim=32, num_experts=4,
    )  # fmt: skip
    return LanguageModel(config, lr=1e-2, warmup_steps=1, schedule="constant")


def _data(batch_size: int):
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (64, SEQ + 1), generator=g)
    rows = [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]

    class Tokens(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(rows[:56], batch_size=batch_size, drop_last=True)

        def val_dataloader(self):  # 8 sequences: one batch at PP (dp = 1), half of them per FSDP rank
            return DataLoader(rows[56:], batch_size=batch_size, drop_last=True)

    return (
        Tokens(),
        torch.stack([r["input_ids"] for r in rows[56:]]),
        torch.stack([r["labels"] for r in rows[56:]]),
    )


class _Losses:
    def __init__(self):
        import lightning as L

        class Cb(L.Callback):
            losses: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(float(trainer.callback_metrics["train/loss"]))

        self.cb = Cb()


def _trainer(strategy, callbacks=(), devices=2, use_distributed_sampler=False, max_steps=STEPS):
    import lightning as L

    # the PP run keeps the loaders' order (Lightning's sampler would shuffle training data; with dp = 1
    # every rank reads every batch anyway); the FSDP run shards the validation set over its 2 ranks

    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, gradient_clip_val=CLIP,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=STEPS, callbacks=list(callbacks),
        use_distributed_sampler=use_distributed_sampler,
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", TORCHELASTIC_RUN_ID="attnres-test",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from attnres.parallel import close_process_groups

    result: dict = {}
    try:
        _runs(rank, out_dir, result)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed run's trainer must not outlive the group
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        close_process_groups()  # the group Lightning made; the trainers and models are out of scope


def _runs(rank: int, out_dir: str, result: dict) -> None:
    """The PP=2 and FSDP=2 runs of this rank, into ``result``."""
    from lightning_modules.strategies import FSDP2Strategy, PipelineParallelStrategy

    ckpt = os.path.join(out_dir, "pp2.ckpt")
    model, (dm, _, _) = _module(), _data(8)
    rec = _Losses()
    trainer = _trainer(PipelineParallelStrategy(pipeline_parallel_size=2, n_microbatches=4), [rec.cb])
    trainer.fit(model, dm)
    result["train_losses"] = rec.cb.losses
    result["bytes_fwd"] = float(trainer.callback_metrics["pp/bytes_fwd_per_microbatch"])
    result["val_pp2"] = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.save_checkpoint(ckpt)
    result["num_params_rank"] = sum(p.numel() for p in model.model.parameters())

    reloaded = _module()
    trainer = _trainer(PipelineParallelStrategy(pipeline_parallel_size=2, n_microbatches=2))
    result["val_pp2_reloaded"] = trainer.validate(reloaded, dm, ckpt_path=ckpt, verbose=False)[0][
        "val/loss"
    ]

    fsdp_model, (dm4, _, _) = _module(), _data(4)
    with torch.no_grad():  # a different start: the checkpoint must overwrite it
        for p in fsdp_model.parameters():
            p.add_(0.1)
    trainer = _trainer(FSDP2Strategy(data_parallel_size=2), use_distributed_sampler=True)
    result["val_fsdp2"] = trainer.validate(fsdp_model, dm4, ckpt_path=ckpt, verbose=False)[0]["val/loss"]
    result["guard"] = _guard_runs(rank)


def _guard_runs(rank: int) -> dict:
    """NaNGuard under PP=2: NaN gradients on rank 1's stage at step 1 and on rank 0's at steps 3 and 4
    (max_consecutive_bad_steps=2); then a NaN loss at step 1 (the LM head, on the last stage, poisoned)."""
    import lightning as L

    from lightning_modules.callbacks import NaNGuard, NonFiniteGradientError, NonFiniteLossError
    from lightning_modules.strategies import PipelineParallelStrategy

    class PoisonGrads(L.Callback):
        def __init__(self, steps):
            self.steps = steps

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step in self.steps:
                grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
                grad.view(-1)[0] = float("nan")

    class PoisonHead(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            head = getattr(pl_module.model, "lm_head", None)
            if trainer.global_step == 1 and head is not None:
                with torch.no_grad():
                    head.weight.fill_(float("nan"))

    class Weights(L.Callback):  # a checksum of this rank's parameters after every step
        sums: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sums.append(sum(float(p.detach().double().sum()) for p in pl_module.parameters()))

    out: dict = {}
    guard, weights = NaNGuard(max_consecutive_bad_steps=2), Weights()
    poison = PoisonGrads({1} if rank == 1 else {3, 4})
    try:
        _trainer(PipelineParallelStrategy(pipeline_parallel_size=2, n_microbatches=2),
                 [poison, guard, weights], max_steps=6).fit(_module(), _data(8)[0])  # fmt: skip
    except NonFiniteGradientError as exc:
        out["grad_error"] = str(exc)
    out["skipped"], out["sums"] = guard.skipped_steps, weights.sums
    try:
        _trainer(PipelineParallelStrategy(pipeline_parallel_size=2, n_microbatches=2),
                 [PoisonHead(), NaNGuard()], max_steps=3).fit(_module(), _data(8)[0])  # fmt: skip
    except NonFiniteLossError as exc:
        out["loss_error"] = str(exc)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, (2, _free_port(), tmp), nprocs=2, join=True)
        results = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        single = _single_process(os.path.join(tmp, "pp2.ckpt"))
    return results, single


def _single_process(ckpt: str) -> dict:
    """The same training in one process, and the PP=2 checkpoint loaded into a plain model (PP=1)."""
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    model, (dm, xv, yv) = _module(), _data(8)
    rec = _Losses()
    from lightning.pytorch.strategies import SingleDeviceStrategy

    trainer = _trainer(SingleDeviceStrategy("cpu"), [rec.cb], devices=1)
    trainer.fit(model, dm)
    with torch.no_grad():
        val_single = model.model(xv, labels=yv).loss.item()
    loaded = _module()
    state = {"state_dict": loaded.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    loaded.load_state_dict(state["state_dict"])
    with torch.no_grad():
        val_pp1 = loaded.model(xv, labels=yv).loss.item()
    return {"train_losses": rec.cb.losses, "val_single": val_single, "val_pp1": val_pp1}


def test_pipeline_strategy_trains_like_one_process(runs):
    results, single = runs
    assert len(single["train_losses"]) == STEPS
    for res in results:  # the loss is reported on both ranks, and equals the one-process run step by step
        assert res["train_losses"] == pytest.approx(single["train_losses"], rel=2e-5)
        assert res["val_pp2"] == pytest.approx(single["val_single"], rel=2e-5)
        assert res["bytes_fwd"] > 0
    # each rank holds only its stages' parameters
    assert sum(r["num_params_rank"] for r in results) == sum(p.numel() for p in _module().model.parameters())


def test_pipeline_checkpoint_loads_in_one_process_under_fsdp2_and_pipeline(runs):
    results, single = runs
    for res in results:
        assert single["val_pp1"] == pytest.approx(res["val_pp2"], rel=1e-5)
        assert res["val_fsdp2"] == pytest.approx(res["val_pp2"], rel=1e-5)
        assert res["val_pp2_reloaded"] == pytest.approx(res["val_pp2"], rel=1e-5)


def test_nan_guard_under_the_pipeline_decides_on_every_rank(runs):
    results, _ = runs
    for res in (r["guard"] for r in results):
        # one stage's NaN gradients skip the step on both ranks; a finite step resets the count
        assert res["skipped"] == [1, 3, 4]
        assert "2 optimizer steps in a row, the last at step 4" in res["grad_error"]
        sums = res["sums"]  # after steps 0..3 (step 4 raised)
        assert sums[1] == sums[0] and sums[2] != sums[1] and sums[3] == sums[2]
        assert all(math.isfinite(x) for x in sums)
        # the loss the last stage broadcasts is checked on every rank before the update
        assert "the training loss is nan at step 1" in res["loss_error"]
