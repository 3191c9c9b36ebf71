"""The Lightning template in ``attnres bench e2e``: its training step against a hand-written one.

:func:`template_rows` drives :class:`~lightning_modules.module.LanguageModel` with a Lightning
``Trainer`` and times it against a plain-PyTorch step of the same model; :func:`bench_e2e` is the
``attnres bench e2e`` command, which hands it to :func:`attnres.bench.e2e.run_e2e_benchmark` (the
library's benchmark knows no Lightning) so that the template rows run in their place in the priority
order, in the same process as the other rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from attnres.bench.e2e import (
    IMPLS,
    KINDS,
    MODES,
    VARIANTS,
    default_out_path,
    run_e2e_benchmark,
    template_base,
)
from attnres.bench.report import format_table
from attnres.bench.rows import Run, guarded, mfu, random_tokens, summary
from attnres.bench.shapes import Shape
from attnres.bench.timing import peak_memory, reset_peak_memory
from attnres.hardware import peak_flops
from lightning_modules.callbacks import NaNGuard, ThroughputMonitor
from lightning_modules.module import LanguageModel
from lightning_modules.progress import RichLossBar

__all__ = ["bench_e2e", "template_rows"]


def template_rows(run: Run, shape: Shape, compile: bool, precision: str, per_step_callbacks: bool) -> None:
    """The ``LanguageModel`` step through a Lightning ``Trainer`` vs a hand-written step of the same model
    (standard residual; ``precision`` autocast; fused AdamW with the same parameter groups and a
    ``LambdaLR``; the same batch, copied to the device each step). Step time = the interval between
    consecutive step starts (CUDA events), so the loops' own overhead counts. ``per_step_callbacks``:
    the Trainer also runs the callbacks ``attnres fit`` always adds (NaN guard, throughput/MFU, its
    progress bar)."""
    base = template_base(shape, compile, precision)
    cfg = shape.config.replace(residual="standard")
    steps = max(run.warmup, 1) + run.repeat + 1
    batch = {"input_ids": random_tokens(shape, shape.batch, shape.seq_len, torch.device("cpu")),
             "labels": random_tokens(shape, shape.batch, shape.seq_len, torch.device("cpu"), seed=2)}
    peak = peak_flops(run.device)
    tokens = shape.batch * shape.seq_len
    fpt = cfg.flops_per_token(shape.seq_len)
    autocast_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def lm() -> Any:  # the LanguageModel of this shape: the preset's fields all overridden
        torch.manual_seed(0)
        return LanguageModel(cfg, compile=compile, lr=1e-4, warmup_steps=1,
                             schedule="constant")

    timer = run.timer
    mark = timer.mark

    def finish(marks: list[Any]) -> dict[str, Any]:
        """``marks``: one at each step start and one after the last step."""
        ms = timer.intervals_ms(marks)
        timed = ms[max(run.warmup, 1):] or ms
        row = summary(timed)
        tps = tokens / (row["ms"] * 1e-3)
        row.update(tokens_per_s=tps, flops_per_token=fpt, mfu=mfu(fpt, tps, peak),
                   peak_mem_bytes=peak_memory(run.device), first_step_s=round(ms[0] / 1e3, 2), steps=len(ms))
        return row

    def hand_written() -> dict[str, Any]:
        module = lm()  # only for its model and parameter groups: the loop below is plain PyTorch
        model = module.model.to(run.device)
        fwd = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(module.param_groups(), lr=1e-4, betas=(0.9, 0.95),
                                fused=run.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model.train()
        reset_peak_memory(run.device)
        marks: list[Any] = []
        for _ in range(steps):
            marks.append(mark())
            ids = batch["input_ids"].to(run.device, non_blocking=True)
            labels = batch["labels"].to(run.device, non_blocking=True)
            with torch.autocast(run.device.type, dtype=autocast_dtype):
                out = fwd(ids, labels=labels)
                loss = out.loss + out.aux_loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_bias()
        marks.append(mark())
        return finish(marks)

    def template(guard: dict[str, Any] | None) -> dict[str, Any]:
        """``guard``: the NaN guard's arguments (None: no per-step callbacks at all)."""
        marks: list[Any] = []

        class StepMarks(L.Callback):
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                marks.append(mark())

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                   batch_idx: int) -> None:
                if batch_idx == steps - 1:
                    marks.append(mark())

        module = lm()
        callbacks: list[Any] = [StepMarks()]
        if guard is not None:  # what `attnres fit` adds to every run
            callbacks += [NaNGuard(**guard), ThroughputMonitor(), RichLossBar()]
        trainer = L.Trainer(
            accelerator="gpu" if run.device.type == "cuda" else "cpu", devices=1, precision=precision,
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=guard is not None,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        )
        reset_peak_memory(run.device)
        loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        row = finish(marks)
        row["callbacks"] = [type(c).__name__ for c in callbacks]
        row["nan_guard"] = guard
        return row

    guarded(run, {**base, "impl": "hand-written"}, hand_written, compiles=compile, reset=compile)
    # the template as `attnres fit -c configs/trainer/gpu.yaml` runs it (the NaN guard deciding on the
    # device), then (per_step_callbacks) what its per-step callbacks cost: the guard deciding on the host
    # (a sync a step), without its gradient check, and without any of them
    variants = (
        [("template", {"defer": True}), ("template-sync", {}),
         ("template-nogradcheck", {"check_gradients": False, "defer": True}), ("template-bare", None)]
        if per_step_callbacks
        else [("template", None)]
    )
    for impl, guard in variants:
        guarded(run, {**base, "impl": impl}, lambda g=guard: template(g), compiles=compile, reset=compile)


def prepare_kda_autotune(device: torch.device) -> dict[str, Any] | None:
    """What ``attnres fit`` does before its first step (``warmup.prepare_kda_autotune``), for every
    implementation alike (ours and fla's model call the same KDA kernels), with one line saying
    what was done; the record goes into the JSON."""
    from lightning_modules import warmup

    done = warmup.prepare_kda_autotune(device)
    if done is not None:
        print(f"[bench] fla's KDA autotuning: {done['seeded']} shipped results seeded, {len(done['pinned'])} "
              "kernels take the nearest tuned configuration for new shapes (ATTNRES_KDA_AUTOTUNE=1: "
              "benchmark each instead)")
    return done


def bench_e2e(
    quick: bool = False,
    shapes: list[Literal["dense", "medium", "kda-dense", "small", "s", "m"]] | None = None,
    modes: list[Literal[MODES]] | None = None,
    kinds: list[Literal[KINDS]] | None = None,
    variants: list[Literal[VARIANTS]] | None = None,
    impls: list[Literal[IMPLS]] | None = None,  # the choices are attnres.bench.e2e's tuples
    num_blocks: int = 8,
    full_group: int | None = None,
    batch: int | None = None,
    graphs: bool = True,
    template_compile: bool | None = None,
    template_precision: str = "bf16-mixed",
    template_callbacks: bool = True,
    warmup: int = 3,
    repeat: int = 10,
    budget_s: float = 480.0,
    profile: bool | Literal["kernels"] = True,
    device: str | None = None,
    tag: str | None = None,
    out: str | None = None,
) -> None:
    """End-to-end benchmark of the standard, Block and Full residual in the whole decoder (issue 8).

    With fla's fused_attnres in the same decoder as the peer row: training step (no optimizer and
    AdamW; eager and torch.compile), tokens/s, MFU, peak memory, prefill and decode latency (eager and
    CUDA graph), and the Lightning template's step vs a hand-written one. Prints a table last and writes
    JSON (device, versions, command, every row).

    Args:
        quick: tiny shapes (a CPU smoke run in seconds; not a measurement).
        shapes: ``dense`` (the issue's 0.95B decoder, B 2, T 4096), ``medium`` (the Kimi-Linear-style
            preset, B 2, T 4096), ``kda-dense`` (all KDA, dense MLPs: fla's KDAForCausalLM shape, 0.97B,
            B 2, T 4096), ``small`` (B 16, T 2048), the study's ``s`` and ``m`` (B 32, T 1024).
            Default: dense and medium.
        modes: residual modes. Default: standard, block, full.
        kinds: ``train``, ``prefill``, ``decode``, ``template``. Default: all.
        variants: training variants ``eager``, ``compile`` (torch.compile of the whole model) and/or
            ``regional`` (each layer's mixers compiled in place: ``model.compile: regional``) and/or
            ``reduce-overhead`` (the whole model compiled as CUDA graphs: ``model.compile: reduce-overhead``)
            and/or ``nested`` (the whole model, each kind of sublayer a nested compile region compiled
            once: ``model.compile: nested``).
            Default: eager and compile (``quick``: eager only; compiling on a CPU takes minutes).
        impls: ``attnres`` (ours), ``attnres-recompute`` (ours with ``residual_recompute``: Block rows,
            eager), ``attnres-unfused`` (ours with ``residual_fuse_norm`` off: phase 2 and the sublayer
            norm as separate ops; AttnRes rows), ``attnres-packed`` (ours on packed documents,
            ``data.packing: documents``: exponential lengths of mean 512 tokens, mixed apart; ratio
            packed/unpacked), ``attnres-fla-plain`` (ours with ``fla_fused`` off: fla's KDA kernel
            without its fused kernels around it; eager; ratio fla-fused/fla-plain), ``torch-standard``
            (the standard residual as plain torch code: torch's ``F.rms_norm``, SwiGLU and cross-entropy,
            fla only for KDA itself; standard rows, eager and compiled; every mode of ours gets the ratio
            ``<mode>/standard(torch-native)``: the baseline a user would write), ``fla`` (fla-core's
            fused_attnres in our decoder),
            ``fast-attnres`` (fast-attnres 2.1.0's ``attnres`` in our decoder; installed apart, named by
            ``ATTNRES_FAST_ATTNRES_DIR``: its package is also called attnres) and/or ``fla-model``
            (fla's own KDAForCausalLM, flash-linear-attention 0.6 + transformers, at the
            ``kda-dense`` shape: ``attnres_block_size`` None / ``2 L / num_blocks`` / 1 for standard /
            block / full; other shapes get one skipped row saying why).
        num_blocks: N of Block AttnRes.
        full_group: Full AttnRes' sublayers per phase-1 call (default: the model's, 2); larger groups make
            fewer, wider calls and keep more phase-1 outputs for the backward.
        batch: the training rows' batch for every shape (default: each shape's own, listed above); e.g.
            ``--shapes '[medium]' --batch 8`` to fill an H100 with 8 x 4096 tokens.
        graphs: also time prefill and decode replayed from a CUDA graph (GPU only).
        template_compile: compile in the template comparison (default: on a GPU).
        template_precision: Lightning precision of the template comparison (the hand-written step uses
            the same autocast).
        template_callbacks: the template's Trainer also runs the per-step callbacks ``attnres fit`` always
            adds (NaN guard, throughput/MFU monitor), as a user's run would.
        warmup: warm-up calls per row (the first includes compilation).
        repeat: timed repeats per row (median reported).
        budget_s: stop starting rows after this many seconds (the rest are recorded as skipped).
        profile: add a one-step profile (kernel count, top ops) to each train row without optimizer;
            ``kernels``: record the GPU kernels only (ranked by kernel name; no operator events, which take
            the profiler minutes to parse at the ``medium`` shape).
        device: ``cuda`` / ``cpu`` (default: cuda when available).
        tag: appended to the JSON file name (``e2e_<device>_<tag>.json``).
        out: JSON path (default ``benchmarks/results/e2e_<device>[_<tag>].json``).
    """
    path = Path(out) if out else default_out_path(device, tag, quick)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run_e2e_benchmark(
        kda_autotune=prepare_kda_autotune(dev),
        quick=quick, shapes=shapes or ["dense", "medium"], modes=modes or list(MODES),
        kinds=kinds or list(KINDS), variants=variants or (["eager"] if quick else ["eager", "compile"]),
        impls=impls or list(IMPLS), num_blocks=num_blocks, full_group=full_group, batch=batch, graphs=graphs,
        template_compile=template_compile, template_precision=template_precision,
        template_callbacks=template_callbacks, warmup=warmup,
        repeat=repeat, budget_s=budget_s,
        profile=profile, device=device, out=path, tag=tag, template_rows=template_rows,
    )
    print(format_table(result))
    print(f"\nJSON: {path}")

