"""Weak scaling of training under FSDP and pipeline x FSDP, with cross-stage caching on and off.

    attnres bench scaling                                   # every layout this machine's GPUs allow
    attnres bench scaling --layouts 1x1,1x2 --steps 20      # PPxDP layouts: 1x2 = FSDP over 2 GPUs
    attnres bench scaling --device cpu --preset tiny --layouts 1x1,1x2,2x1 --seq_len 64   # gloo

A layout ``PPxDP`` runs ``PP * DP`` processes (one GPU each, NCCL; or CPU processes over gloo): ``DP``
FSDP2 replicas of a ``PP``-stage pipeline (``attnres.parallel.build_pipeline``; ``PP = 1``: FSDP only,
``1x1``: one device, no sharding). Weak scaling: every device gets ``batch_per_gpu`` sequences of
``seq_len`` per step (a pipeline's replica takes ``batch_per_gpu * PP`` of them, in microbatches of
``microbatch_size``), so the global batch grows with the device count. Per layout (and per caching
mode for ``PP > 1``): tokens/s over ``steps`` timed optimizer steps after ``warmup``, peak memory of
every rank (``torch.cuda.max_memory_allocated``; none on CPU), the stage-boundary bytes per
microbatch (measured by the stage cache and its analytic count), the final loss, and the scaling
efficiency ``tokens/s / (devices * tokens/s of 1x1)``. Prints a table; writes JSON (device, versions,
command, settings, rows) to ``benchmarks/results/scaling_<device>.json``.

Synthetic token ids (a seeded generator per data-parallel rank): the benchmark measures speed and
memory, not learning. On CUDA the activations are bf16 (FSDP computes in bf16 with fp32 gradient
reduction; without FSDP under autocast); on CPU fp32.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

DEFAULT_LAYOUTS = "1x1,1x2,1x4,1x8,2x1,2x2,2x4,4x2"


@dataclass(frozen=True)
class Layout:
    """``pp`` pipeline stages (one per rank) x ``dp`` FSDP replicas of each."""

    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.pp * self.dp

    @property
    def name(self) -> str:
        return f"{self.pp}x{self.dp}"

    def describe(self) -> str:
        if self.world == 1:
            return "1 device"
        if self.pp == 1:
            return f"FSDP={self.dp}"
        return f"PP={self.pp}" + (f" x FSDP={self.dp}" if self.dp > 1 else "")


def parse_layouts(text: str) -> list[Layout]:
    """``"1x1,2x4"`` -> layouts (``PPxDP``), in order, each once."""
    out: list[Layout] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            pp, dp = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"layout {item!r}: write PPxDP, e.g. 2x4 (2 pipeline stages x FSDP over 4)"
            ) from None
        if pp < 1 or dp < 1:
            raise ValueError(f"layout {item!r}: PP and DP must be >= 1")
        if Layout(pp, dp) not in out:
            out.append(Layout(pp, dp))
    if not out:
        raise ValueError("--layouts is empty: give e.g. 1x1,1x2")
    return out


@dataclass
class Settings:
    preset: str
    residual: str
    num_blocks: int | None
    overrides: dict[str, Any]
    batch_per_gpu: int
    seq_len: int
    microbatch_size: int
    schedule: str
    steps: int
    warmup: int
    lr: float
    device: str  # "cuda" or "cpu"


# ---------------------------------------------------------------------------- one layout (per rank)


def _model(s: Settings):
    from attnres.model import Decoder, get_config

    kw = dict(s.overrides)
    kw.setdefault("residual", s.residual)
    if kw["residual"] == "block" and s.num_blocks is not None:
        kw.setdefault("num_blocks", s.num_blocks)
    torch.manual_seed(0)  # the same weights on every rank
    return Decoder(get_config(s.preset, **kw))


def _worker(rank: int, layout: Layout, caching: bool, s: Settings, store: str, out: str) -> None:
    import torch.distributed as dist

    from attnres.parallel import close_process_groups

    cuda = s.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.world))
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=layout.world
    )
    row: dict[str, Any] = {}
    try:
        row = _measure(rank, layout, caching, s)
    except Exception as exc:  # reported in the row, the other layouts still run
        row = {"layout": layout.name, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
        traceback.clear_frames(exc.__traceback__)  # _measure's locals (model, mesh) go before the groups
        raise
    finally:
        if rank == 0 or row.get("status") == "error":
            Path(out, f"row{rank}.json").write_text(json.dumps(row))
        # the model, mesh and pipeline of _measure are out of scope: their groups go with them
        close_process_groups()


def _measure(rank: int, layout: Layout, caching: bool, s: Settings) -> dict[str, Any]:
    """One layout's timed steps on this rank (the process group is up); rank 0's row."""
    import torch.distributed as dist

    from attnres.bench.timing import peak_memory, reset_peak_memory
    from attnres.parallel import apply_fsdp, build_pipeline, init_mesh, payload_bytes

    cuda = s.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t_start = time.perf_counter()
    mesh = init_mesh(layout.pp, layout.dp, device.type)
    dp_rank = mesh["dp"].get_local_rank()
    model = _model(s)
    config = model.config
    batch = s.batch_per_gpu * layout.pp  # one pipeline replica's share of the global batch
    pipe = None
    if layout.pp == 1:
        model = model.to(device)
        if layout.dp > 1:
            apply_fsdp(model, mesh["dp"], param_dtype=dtype if cuda else None)
        params = list(model.parameters())
    else:
        if batch % s.microbatch_size:
            raise ValueError(f"batch {batch} does not split into microbatches of {s.microbatch_size}")
        looped = s.schedule == "interleaved_1f1b"
        pipe = build_pipeline(
            model,
            mesh["pp"].get_group(),
            s.schedule,
            batch // s.microbatch_size,
            virtual_stages=2 if looped else 1,
            caching=caching,
            device=device,
            dtype=dtype,
            dp_mesh=mesh["dp"] if layout.dp > 1 else None,
            fsdp_param_dtype=dtype if cuda and layout.dp > 1 else None,
        )
        params = list(pipe.model.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, fused=cuda)
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        ids = torch.randint(0, config.vocab_size, (batch, s.seq_len + 1), generator=gen)
        x, y = ids[:, :-1], ids[:, 1:]
        with autocast:
            if pipe is None:
                o = model(x.to(device), labels=y.to(device))
                (o.loss + o.aux_loss).backward()
                loss = o.loss.detach()
            else:
                pipe.cache.reset_counts()  # the bytes reported are those of the last step
                loss = pipe.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def synced() -> None:
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()

    def progress(what: str) -> None:  # rank 0: where a slow layout spends its time (fla autotunes)
        if rank == 0:
            print(f"[scaling] {layout.name}: {what} ({time.perf_counter() - t_start:.1f} s)", flush=True)

    progress("model built")
    for k in range(s.warmup):
        step()
        progress(f"warm-up step {k + 1}/{s.warmup}")
    synced()
    reset_peak_memory(device)
    # the host clock between barriers, not the one Timer: a step ends when every rank has finished it
    t0 = time.perf_counter()
    for _ in range(s.steps):
        loss = step()
    synced()
    elapsed = time.perf_counter() - t0
    progress(f"{s.steps} timed steps")
    loss = loss.float()
    dist.all_reduce(loss)  # the mean over ranks (every pipeline rank holds its replica's loss)
    peak = peak_memory(device)
    peaks: list[Any] = [None] * layout.world
    dist.all_gather_object(peaks, peak)
    tokens = s.batch_per_gpu * layout.world * s.seq_len * s.steps
    row = {
        "layout": layout.name,
        "pp": layout.pp,
        "dp": layout.dp,
        "devices": layout.world,
        "parallelism": layout.describe(),
        "caching": caching if layout.pp > 1 else None,
        "schedule": s.schedule if layout.pp > 1 else None,
        "global_batch": s.batch_per_gpu * layout.world,
        "step_ms": 1e3 * elapsed / s.steps,
        "tokens_per_s": tokens / elapsed,
        "peak_memory_bytes": peaks,
        "loss": loss.item() / layout.world,
        "params": config.num_params(),
    }
    if pipe is not None:
        measured = pipe.bytes_per_microbatch()
        row["boundary_bytes_per_microbatch"] = measured
        row["boundary_bytes_analytic"] = payload_bytes(
            pipe.cache, s.microbatch_size, s.seq_len, config.dim, dtype
        )
        row["max_crossings"] = pipe.max_crossings()
    row["status"] = "ok"
    return row


def run_layout(layout: Layout, caching: bool, s: Settings, timeout_s: float) -> dict[str, Any]:
    """Spawn the layout's processes and return rank 0's row (or the first error)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            (layout, caching, s, os.path.join(tmp, "store"), tmp),
            nprocs=layout.world,
            join=False,
            start_method="spawn",
        )
        deadline = time.time() + timeout_s
        try:
            while not ctx.join(timeout=5):
                if time.time() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    return {"layout": layout.name, "status": "timeout", "error": f"over {timeout_s:.0f} s"}
        except Exception as exc:  # a rank failed: its row says why
            rows = sorted(Path(tmp).glob("row*.json"))
            errors = [json.loads(p.read_text()) for p in rows]
            errors = [r for r in errors if r.get("status") == "error"]
            return errors[0] if errors else {"layout": layout.name, "status": "error", "error": str(exc)}
        return json.loads(Path(tmp, "row0.json").read_text())


# ---------------------------------------------------------------------------- the command


def bench_scaling(
    layouts: str = DEFAULT_LAYOUTS,
    preset: str = "medium",
    residual: Literal["standard", "block", "full"] = "block",
    num_blocks: int | None = None,
    overrides: dict[str, Any] | None = None,
    batch_per_gpu: int = 2,
    seq_len: int = 2048,
    microbatch_size: int = 1,
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b",
    caching: Literal["on", "off", "both"] = "both",
    steps: int = 10,
    warmup: int = 3,
    lr: float = 1e-4,
    device: Literal["auto", "cuda", "cpu"] = "auto",
    timeout_s: float = 900.0,
    out: str | None = None,
) -> dict[str, Any]:
    """Weak scaling of training over PPxDP layouts (FSDP, pipeline x FSDP): table + JSON.

    Per layout: tokens/s, peak memory per GPU, stage-boundary bytes per microbatch with the
    cross-stage cache on and off, and efficiency vs one device (module docstring:
    ``attnres.bench.scaling``).

    Args:
        layouts: comma-separated ``PPxDP`` (pipeline stages x FSDP replicas); those needing more GPUs
            than this machine has are reported as skipped.
        preset: model preset (``tiny``, ``small``, ``medium``, ...).
        residual: residual mode; ``num_blocks`` for Block AttnRes.
        num_blocks: blocks of Block AttnRes (default: the preset's).
        overrides: further model fields, e.g. ``{"num_layers": 8, "dim": 256}``.
        batch_per_gpu: sequences per device per step (weak scaling: the global batch grows with it).
        seq_len: tokens per sequence.
        microbatch_size: sequences per pipeline microbatch (a replica's batch is ``batch_per_gpu * PP``;
            1F1B needs at least PP microbatches).
        schedule: pipeline schedule (``interleaved_1f1b``: two stages per rank, where the cache matters).
        caching: cross-stage caching for the pipeline layouts: ``on``, ``off`` or ``both`` (two rows).
        steps: timed optimizer steps per layout.
        warmup: untimed steps first.
        lr: AdamW learning rate.
        device: ``cuda`` (NCCL, one GPU per rank), ``cpu`` (gloo) or ``auto``.
        timeout_s: seconds per layout before its processes are killed.
        out: JSON path (default ``benchmarks/results/scaling_<device>.json``).
    """
    from attnres.bench.timing import command_line, device_slug, versions

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from attnres.errors import UsageError

        raise UsageError(
            "--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu"
        )
    gpus = torch.cuda.device_count() if device == "cuda" else None
    s = Settings(
        preset,
        residual,
        num_blocks,
        dict(overrides or {}),
        batch_per_gpu,
        seq_len,
        microbatch_size,
        schedule,
        steps,
        warmup,
        lr,
        device,
    )
    _model_check = _model(s)  # a wrong preset or override fails here, before any process starts
    dev0 = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "device_slug": device_slug(dev0),
        "gpus": gpus,
        "command": command_line(),
        "versions": versions(("triton", "fla-core", "lightning", "attnres"), commit=True),
        "settings": asdict(s),
        "model": {
            "params": _model_check.config.num_params(),
            "active": _model_check.config.num_params(True),
            "num_layers": _model_check.config.num_layers,
            "dim": _model_check.config.dim,
        },
        "rows": [],
    }
    del _model_check
    modes = {"on": [True], "off": [False], "both": [True, False]}[caching]
    for layout in parse_layouts(layouts):
        for cache_on in modes if layout.pp > 1 else [True]:
            cache_label = (", caching " + ("on" if cache_on else "off")) if layout.pp > 1 else ""
            label = f"{layout.name} ({layout.describe()}{cache_label})"
            if gpus is not None and layout.world > gpus:
                row = {
                    "layout": layout.name,
                    "status": "skipped",
                    "error": f"needs {layout.world} GPUs, {gpus} here",
                }
            else:
                print(f"[scaling] {label} ...", flush=True)
                row = run_layout(layout, cache_on, s, timeout_s)
            row.setdefault("caching", cache_on if layout.pp > 1 else None)
            result["rows"].append(row)
            print(f"[scaling] {label}: {row.get('status')} {row.get('error', '')}", flush=True)
    _efficiency(result["rows"])
    print(format_table(result))
    path = Path(out) if out else Path("benchmarks/results") / f"scaling_{result['device_slug']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return result


def _efficiency(rows: list[dict[str, Any]]) -> None:
    """``efficiency`` = tokens/s / (devices x tokens/s of the 1x1 row), in place (if 1x1 ran)."""
    base = next((r for r in rows if r.get("layout") == "1x1" and r.get("status") == "ok"), None)
    for r in rows:
        if base and r.get("status") == "ok":
            r["efficiency"] = r["tokens_per_s"] / (r["devices"] * base["tokens_per_s"])


def format_table(result: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"weak scaling on {result['device']}: {result['settings']['preset']} "
        f"({result['model']['params'] / 1e6:.1f}M params), residual {result['settings']['residual']}, "
        f"{result['settings']['batch_per_gpu']} x {result['settings']['seq_len']} tokens per device per step",
        "| layout | parallelism | caching | step ms | tokens/s | efficiency | peak GiB (max rank) "
        "| boundary MB / microbatch fwd (analytic) | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['layout']} | | | | | | | | {r.get('status')}: {r.get('error', '')} |")
            continue
        peaks = [p for p in r["peak_memory_bytes"] if p is not None]
        peak = f"{max(peaks) / gib:.2f}" if peaks else "–"
        caching = "–" if r["caching"] is None else ("on" if r["caching"] else "off")
        b = r.get("boundary_bytes_per_microbatch")
        bytes_ = f"{b['forward'] / 1e6:.2f} ({r['boundary_bytes_analytic'] / 1e6:.2f})" if b else "–"
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "–"
        lines.append(
            f"| {r['layout']} | {r['parallelism']} | {caching} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {eff} | {peak} | {bytes_} | ok |"
        )
    return "\n".join(lines)
