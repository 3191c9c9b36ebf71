"""End-to-end benchmark of the residual path in the whole decoder (issue 8): the training and serving
rows, run in priority order under a time budget.

For the standard residual, Block AttnRes and Full AttnRes in the same model and the same process:

* **train**: one training step (forward + backward; a row without optimizer and one with AdamW), eager
  and ``torch.compile``: median step time, tokens/s, MFU (``Config.flops_per_token`` over a peak-FLOPs
  table), peak memory, and the bytes of the stored AttnRes sources (the memory target is
  ``peak <= standard peak + 1.1 x source bytes``);
* **prefill** (a prompt through the model, filling the caches) and **decode** (one new token with the
  caches, batch 1 and 64; eager and captured in a CUDA graph);
* the **fla peer row**: ``fla.ops.attnres.fused_attnres`` (fla-core 0.6.0) plugged into our decoder's
  residual path (:class:`~attnres.bench.peers.FlaResidual`), one direct softmax over every source per
  sublayer;
* the **fla model peer row** (``fla-model``, shape ``kda-dense``): fla's own ``KDAForCausalLM`` at our
  decoder's shape, with and without its ``attnres_block_size`` (:mod:`attnres.bench.peers`), against our
  model in each residual mode (ratio ``attnres/fla-model``; the target is ``<= 1``);
* **template vs hand-written** (kind ``template``): the ``LanguageModel`` training step driven by a
  Lightning ``Trainer`` against a hand-written step of the same model. The library knows no Lightning:
  those rows come from the ``template_rows`` argument of :func:`run_e2e_benchmark`, which
  ``attnres bench e2e`` fills with ``lightning_modules.bench_template.template_rows``; without it they
  are recorded as skipped.

The shapes are :mod:`attnres.bench.shapes`'s; the table and ratios :mod:`attnres.bench.report`'s.
Timing: the one :class:`~attnres.bench.timing.Timer` (CUDA events around each repeat after warm-up,
which includes compilation), median of the repeats; peak memory from ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (``max_memory_reserved`` for ``reduce-overhead``, whose graphs replay in
their private pool without allocating; the row's ``peak_mem_kind`` says which). Every row is guarded: an
out-of-memory error or any other failure is recorded in the row (``status``) and the run goes on. The
JSON is rewritten after every row, so a run cut short keeps what it measured. Ratios (Block/standard,
Full/standard, fla/standard, template/hand-written) are computed from rows of the same run.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch._dynamo.utils import counters

from attnres import ops
from attnres.bench.peers import (
    fast_attnres_status,
    fla_model_mismatch,
    fla_model_status,
    fla_status,
)
from attnres.bench.rows import (
    PACKED_MEAN_DOC,
    Run,
    build_model,
    guarded,
    mfu,
    random_documents,
    random_tokens,
    summary,
)
from attnres.bench.serve import serve_rows
from attnres.bench.shapes import Shape, default_shapes, residual_traffic
from attnres.bench.timing import (
    cleanup,
    command_line,
    compile_time_breakdown,
    compile_time_snapshot,
    device_slug,
    measure_ceilings,
    peak_memory,
    profile_step,
    reset_peak_memory,
    sync,
    versions,
)
from attnres.hardware import PEAK_BF16_FLOPS, peak_flops

__all__ = [
    "IMPLS",
    "KINDS",
    "MODES",
    "VARIANTS",
    "TemplateRows",
    "default_out_path",
    "run_e2e_benchmark",
    "template_base",
]

MODES: tuple[str, ...] = ("standard", "block", "full")
KINDS: tuple[str, ...] = ("train", "prefill", "decode", "template")
VARIANTS: tuple[str, ...] = ("eager", "compile", "regional", "reduce-overhead", "nested")
IMPLS: tuple[str, ...] = ("attnres", "attnres-recompute", "attnres-unfused", "attnres-packed",
                          "attnres-fla-plain", "torch-standard", "fla", "fast-attnres", "fla-model")

RESULTS_DIR = Path("benchmarks/results")


# ----------------------------------------------------------------------------- training rows


def _train_rows(run: Run, shape: Shape, mode: str, impl: str, variant: str) -> None:
    """Two rows from one model: the step without optimizer, then with AdamW (compiled once)."""
    base = {"kind": "train", "shape": shape.name, "mode": mode, "impl": impl, "variant": variant,
            "batch": shape.batch, "seq_len": shape.seq_len}
    peak = peak_flops(run.device)
    cfg = shape.config.replace(residual=mode)
    traffic = residual_traffic(cfg, shape.batch, shape.seq_len, torch.finfo(run.dtype).bits // 8)
    tokens = shape.batch * shape.seq_len
    fpt = cfg.flops_per_token(shape.seq_len)
    holder: dict[str, Any] = {}
    # CUDA graphs replay in their pool without allocating: count reserved bytes (the pool) in both rows
    graphed = variant == "reduce-overhead"

    def setup_and_time(optimizer: bool) -> dict[str, Any]:
        if "model" not in holder:
            model = build_model(shape, mode, impl, run)
            model.train()
            holder["model"] = model
            if variant == "regional":  # our decoder only: each layer's mixers compiled in place
                model.compile_regions()
            holder["fwd"] = (torch.compile(model) if variant == "compile"
                             else torch.compile(model, mode="reduce-overhead") if variant == "reduce-overhead"
                             else model.compile_nested() if variant == "nested"  # our decoder only
                             else model)
            holder["ids"] = random_tokens(shape, shape.batch, shape.seq_len, run.device)
            holder["labels"] = random_tokens(shape, shape.batch, shape.seq_len, run.device, seed=2)
            holder["extra"] = {}
            if impl == "attnres-packed":  # documents packed into each row, mixed apart (data.packing)
                holder["mean_doc"] = min(PACKED_MEAN_DOC, max(shape.seq_len // 4, 2))  # quick: 8 tokens
                holder["extra"] = {"segment_ids": random_documents(shape.batch, shape.seq_len, run.device,
                                                                   holder["mean_doc"])}
        model, fwd, ids, labels = holder["model"], holder["fwd"], holder["ids"], holder["labels"]
        extra = holder["extra"]
        opt = None
        if optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=run.device.type == "cuda")

        def step() -> None:
            if graphed:  # each call a new step of torch's CUDA-graph trees
                torch.compiler.cudagraph_mark_step_begin()
            out = fwd(ids, labels=labels, **extra)
            (out.loss + out.aux_loss).backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)

        cleanup(run.device)
        resident = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None
        reset_peak_memory(run.device)
        skips = counters["inductor"]["cudagraph_skips"]
        compile_before = compile_time_snapshot()
        t0 = time.perf_counter()
        try:
            step()  # first call: compilation (compiled variant) and lazy state
        except Exception as exc:  # a peer that torch.compile cannot take is skipped, with the reason
            if impl != "fla-model" or variant != "compile" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            msg = f"torch.compile of fla's KDAForCausalLM failed: {type(exc).__name__}: {exc}"
            return {"status": "skipped", "reason": msg.replace("\n", " ")[:400]}
        sync(run.device)
        first_s = time.perf_counter() - t0
        ms = run.timer.samples_ms(step, max(run.warmup - 1, 0), run.repeat)
        row = summary(ms)
        tps = tokens / (row["ms"] * 1e-3)
        row.update(
            first_call_s=round(first_s, 2), tokens_per_s=tps, flops_per_token=fpt, mfu=mfu(fpt, tps, peak),
            peak_mem_bytes=peak_memory(run.device, reserved=graphed), resident_bytes_before=resident,
            peak_mem_kind="reserved" if graphed else "allocated",
            source_bytes=traffic["source_bytes"], saved_partial_bytes=traffic["saved_partial_bytes"],
            residual_calls_per_step=traffic["calls_per_step"], residual_step_bytes=traffic["step_bytes"],
            ops_backend={"fla": "fla", "fla-model": "fla", "fast-attnres": impl}.get(
                impl, ops.backend(run.device)),
            params=sum(p.numel() for p in model.parameters()),
        )
        if extra:
            seg = extra["segment_ids"]
            row["documents"] = {"count": int((seg.diff(dim=1) != 0).sum() + seg.shape[0]),
                                "mean_tokens": holder["mean_doc"], "distribution": "exponential, seed 3"}
        if variant != "eager":  # where a compiled first call's time goes (Dynamo, AOT, Inductor, Triton)
            row["compile_breakdown_s"] = compile_time_breakdown(compile_before)
        if graphed:  # Inductor falls back to plain compiled code where it cannot graph
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        bandwidth = (run.result.get("ceilings") or {}).get("copy_gbps")
        if bandwidth:  # the residual path's bytes at the measured copy bandwidth: no kernel does better
            row["residual_floor_ms"] = traffic["step_bytes"] / (bandwidth * 1e9) * 1e3
        if run.profile and not optimizer:
            row["profile"] = profile_step(step, run.device, cpu_ops=run.profile != "kernels")
        return row

    try:
        first = guarded(run, {**base, "optimizer": "none"}, lambda: setup_and_time(False),
                         compiles=variant != "eager" and "model" not in holder)
        if first["status"] == "ok":
            guarded(run, {**base, "optimizer": "adamw"}, lambda: setup_and_time(True))
        else:
            run.add({**base, "optimizer": "adamw", "status": "skipped",
                     "reason": f"the step without optimizer ended in {first['status']}"})
    finally:
        holder.clear()
        if variant != "eager":
            torch._dynamo.reset()
        cleanup(run.device)


# ----------------------------------------------------------------------------- template vs hand-written

NO_TEMPLATE_ROWS = ("the template rows drive lightning_modules' LanguageModel: run them through "
                    "`attnres bench e2e` (lightning_modules.bench_template.template_rows)")


class TemplateRows(Protocol):
    """What runs the ``template`` kind: adds the hand-written and the template rows of ``shape`` to
    ``run`` (``lightning_modules.bench_template.template_rows``; the library has no Lightning)."""

    def __call__(
        self, run: Run, shape: Shape, compile: bool, precision: str, per_step_callbacks: bool
    ) -> None: ...


def template_base(shape: Shape, compile: bool, precision: str) -> dict[str, Any]:
    """The fields every template row of ``shape`` shares (its ``impl`` is set per row)."""
    return {"kind": "template", "shape": shape.name, "mode": "standard", "impl": "attnres",
            "variant": "compile" if compile else "eager", "batch": shape.batch, "seq_len": shape.seq_len,
            "precision": precision, "optimizer": "adamw"}


# ----------------------------------------------------------------------------- entry points


def run_e2e_benchmark(
    quick: bool = False,
    shapes: Sequence[str] = ("dense", "medium"),
    modes: Sequence[str] = MODES,
    kinds: Sequence[str] = KINDS,
    variants: Sequence[str] = VARIANTS,
    impls: Sequence[str] = IMPLS,
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
    compile_reserve_s: float | None = None,
    profile: bool | Literal["kernels"] = True,
    device: str | None = None,
    out: str | Path | None = None,
    tag: str | None = None,
    template_rows: TemplateRows | None = None,
    kda_autotune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the end-to-end benchmark; returns the result dict (also written as JSON to ``out``).

    Rows run in priority order, each phase over the shapes: train eager (ours, then fla), prefill and
    decode, train compiled (ours), template vs hand-written (on ``dense``, else the first shape), train
    compiled (fla); they are skipped once ``budget_s`` seconds have passed (a compiled row also needs
    ``compile_reserve_s`` left). ``tag`` names the run in the JSON (and in
    :func:`~attnres.bench.report.merge_results`). ``template_rows`` runs the ``template`` kind (without
    it those rows are recorded as skipped). ``kda_autotune``: how fla's KDA autotuning was prepared (the
    caller seeds and pins it), recorded in the JSON. A quick run on a CPU uses one thread (tiny shapes run
    faster so, and a loaded machine does not stall them).

    The other arguments: ``shapes`` (names of :func:`~attnres.bench.shapes.default_shapes`), ``modes``,
    ``kinds``, ``variants`` and ``impls`` (subsets of :data:`MODES`, :data:`KINDS`, :data:`VARIANTS`,
    :data:`IMPLS`), ``num_blocks`` (N of Block AttnRes), ``full_group`` (Full AttnRes' sublayers per
    phase-1 call; None: the shape's own, 2), ``batch`` (every shape's training batch; None:
    the shape's own), ``graphs`` (also prefill and decode replayed
    from a CUDA graph), the template comparison's ``template_compile`` (default: on a GPU),
    ``template_precision`` and ``template_callbacks`` (the per-step callbacks ``attnres fit`` adds),
    ``warmup`` / ``repeat`` per row, ``profile`` (a one-step profile per train row without optimizer;
    ``"kernels"``: the kernels only, a quick parse for large models), ``device`` (default cuda when
    available) and ``out`` (the JSON path; None: not written). The ``attnres bench e2e`` command documents
    each (``--help``).
    """
    args = dict(locals())
    threads = torch.get_num_threads()
    if quick and (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(1)
    try:
        return _run_e2e(**args)
    finally:
        torch.set_num_threads(threads)


def _run_e2e(
    quick: bool, shapes: Sequence[str], modes: Sequence[str], kinds: Sequence[str],
    variants: Sequence[str], impls: Sequence[str], num_blocks: int, full_group: int | None,
    batch: int | None, graphs: bool,
    template_compile: bool | None, template_precision: str, template_callbacks: bool, warmup: int,
    repeat: int, budget_s: float, compile_reserve_s: float | None, profile: bool | str,
    device: str | None, out: str | Path | None, tag: str | None, template_rows: TemplateRows | None,
    kda_autotune: dict[str, Any] | None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checks = (("modes", modes, MODES), ("kinds", kinds, KINDS), ("variants", variants, VARIANTS),
              ("impls", impls, IMPLS))
    for name, vals, valid in checks:
        bad = [v for v in vals if v not in valid]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; valid: {', '.join(valid)}")
    all_shapes = default_shapes(quick, num_blocks)
    if full_group is not None:  # Config checks it (an integer >= 1)
        all_shapes = {k: dataclasses.replace(v, config=v.config.replace(full_group=full_group))
                      for k, v in all_shapes.items()}
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch={batch}: must be >= 1 (sequences per training step)")
        all_shapes = {k: dataclasses.replace(v, batch=batch) for k, v in all_shapes.items()}
    bad = [s for s in shapes if s not in all_shapes]
    if bad:
        raise ValueError(f"shapes: unknown {bad}; valid: {', '.join(all_shapes)}")
    if compile_reserve_s is None:
        compile_reserve_s = 0.0 if quick else 45.0
    if template_compile is None:
        template_compile = dev.type == "cuda"
    # bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are emulated on most chips (smoke runs only)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    result: dict[str, Any] = {
        "_t0": t0,
        "benchmark": "e2e",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "device_slug": device_slug(dev),
        "quick": quick,
        "tag": tag,
        "command": command_line(),
        "versions": versions(("triton", "fla-core", "lightning", "attnres"), commit=True),
        "ops_backend": ops.backend(dev),
        "extension_error": ops.extension_error,
        "dtype": f"{str(dtype).replace('torch.', '')} (parameters and activations; depth softmax in fp32)",
        "peak_flops": peak_flops(dev),
        "peak_flops_table": dict(PEAK_BF16_FLOPS),
        "settings": {"modes": list(modes), "kinds": list(kinds), "variants": list(variants),
                     "impls": list(impls), "num_blocks": num_blocks, "full_group": full_group,
                     "batch": batch, "warmup": warmup,
                     "repeat": repeat,
                     "budget_s": budget_s,
                     "graphs": graphs, "template_compile": template_compile,
                     "template_precision": template_precision, "template_callbacks": template_callbacks},
        "kda_autotune": kda_autotune,
        "shapes": {s: all_shapes[s].describe() for s in shapes},
        "residual_traffic": {
            s: {m: residual_traffic(all_shapes[s].config.replace(residual=m), all_shapes[s].batch,
                                    all_shapes[s].seq_len, torch.finfo(dtype).bits // 8) for m in modes}
            for s in shapes
        },
    }
    run = Run(dev, dtype, warmup, repeat, quick, t0 + budget_s, compile_reserve_s,
               Path(out) if out is not None else None, result, profile=profile)
    fla_why = fla_status() if "fla" in impls else None
    result["fla"] = {"available": fla_why is None, "reason": fla_why}
    fla_model_why = fla_model_status() if "fla-model" in impls else None
    result["fla_model"] = {"available": fla_model_why is None, "reason": fla_model_why}
    fa_why = fast_attnres_status() if "fast-attnres" in impls else None
    result["fast_attnres"] = {"available": fa_why is None, "reason": fa_why}
    try:
        result["ceilings"] = measure_ceilings(dev, quick)
    except Exception as exc:
        result["ceilings"] = None
        result["ceilings_error"] = f"{type(exc).__name__}: {exc}"[:300]
    run.flush()

    ours = list(modes)
    theirs = [m for m in modes if m != "standard"] if "fla" in impls else []

    def train(shape: Shape, impl: str, variant: str, ms: list[str]) -> None:
        mismatch = fla_model_mismatch(shape.config) if impl == "fla-model" else None
        if mismatch is not None:  # one row says why
            run.add({"kind": "train", "shape": shape.name, "impl": impl, "variant": variant,
                     "status": "skipped", "reason": mismatch})
            return
        why = {"fla": fla_why, "fla-model": fla_model_why, "fast-attnres": fa_why}.get(impl)
        for m in ms:
            if why is not None:
                for opt in ("none", "adamw"):
                    run.add({"kind": "train", "shape": shape.name, "mode": m, "impl": impl,
                             "variant": variant, "optimizer": opt, "batch": shape.batch, "status": "skipped",
                             "reason": why})
                continue
            _train_rows(run, shape, m, impl, variant)

    # phases in priority order, each over the shapes: the cheap rows first, compilation last
    picked = [all_shapes[name] for name in shapes]
    serve = [k for k in ("prefill", "decode") if k in kinds]
    if "train" in kinds and "eager" in variants:
        for shape in picked:
            if "attnres" in impls:
                train(shape, "attnres", "eager", ours)
            if "attnres-recompute" in impls:  # a Block-only option, eager-only
                train(shape, "attnres-recompute", "eager", [m for m in ours if m == "block"])
            if "attnres-unfused" in impls:  # phase 2 and the sublayer norm as separate ops
                train(shape, "attnres-unfused", "eager", [m for m in ours if m != "standard"])
            if "attnres-packed" in impls:  # packed documents (varlen KDA, block-diagonal MLA)
                train(shape, "attnres-packed", "eager", ours)
            if "attnres-fla-plain" in impls:  # fla's KDA kernel without its fused kernels around it
                train(shape, "attnres-fla-plain", "eager", ours)
            if "torch-standard" in impls:  # the standard residual in plain torch: the baseline to beat
                train(shape, "torch-standard", "eager", [m for m in ours if m == "standard"])
        for shape in picked:
            train(shape, "fla", "eager", theirs)
            if "fast-attnres" in impls:
                train(shape, "fast-attnres", "eager", [m for m in ours if m != "standard"])
            if "fla-model" in impls:  # fla's own model, every mode (standard: attnres_block_size None)
                train(shape, "fla-model", "eager", ours)
    for shape in picked if serve else []:
        for m in ours if "attnres" in impls else []:
            serve_rows(run, shape, m, "attnres", serve, graphs and dev.type == "cuda")
        for m in theirs if fla_why is None else []:
            serve_rows(run, shape, m, "fla", serve, graphs and dev.type == "cuda")
    if "train" in kinds and "regional" in variants and "attnres" in impls:
        for shape in picked:
            train(shape, "attnres", "regional", ours)
    if "train" in kinds and "reduce-overhead" in variants and "attnres" in impls:
        for shape in picked:
            train(shape, "attnres", "reduce-overhead", ours)
    if "train" in kinds and "nested" in variants and "attnres" in impls:
        for shape in picked:
            train(shape, "attnres", "nested", ours)
    if "train" in kinds and "compile" in variants and "attnres" in impls:
        for shape in picked:
            train(shape, "attnres", "compile", ours)
            if "attnres-unfused" in impls:
                train(shape, "attnres-unfused", "compile", [m for m in ours if m != "standard"])
            if "attnres-packed" in impls:
                train(shape, "attnres-packed", "compile", ours)
            if "torch-standard" in impls:
                train(shape, "torch-standard", "compile", [m for m in ours if m == "standard"])
    if "template" in kinds:
        shape = all_shapes["dense" if "dense" in shapes else shapes[0]]
        if template_rows is not None:
            template_rows(run, shape, template_compile, template_precision, template_callbacks)
        else:
            base = template_base(shape, template_compile, template_precision)
            for who in ("hand-written", "template"):
                run.add({**base, "impl": who, "status": "skipped", "reason": NO_TEMPLATE_ROWS})
    if "train" in kinds and "compile" in variants:
        for shape in picked:
            train(shape, "fla", "compile", theirs)
            if "fla-model" in impls:
                train(shape, "fla-model", "compile", ours)
    run.flush()
    result.pop("_t0", None)
    return result


def default_out_path(
    device: torch.device | str | None = None, tag: str | None = None, quick: bool = False
) -> Path:
    """``benchmarks/results/e2e_<device>[_<tag>].json`` (``_quick`` for quick runs)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = ["e2e", device_slug(dev)] + ([tag] if tag else []) + (["quick"] if quick else [])
    return RESULTS_DIR / ("_".join(parts) + ".json")
