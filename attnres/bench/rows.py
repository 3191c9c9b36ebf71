"""The bench's run state and the helpers every kind of row shares: :class:`Run` (settings, rows, the clock,
the JSON rewritten after each row), :func:`guarded` (one row within the budget, errors recorded),
:func:`build_model`, :func:`random_tokens`, :func:`mfu` and :func:`summary`."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnres.bench.peers import build_fla_model, fast_attnres_fn, use_fla_residual
from attnres.bench.report import compute_ratios, json_default
from attnres.bench.shapes import Shape
from attnres.bench.timing import Timer, cleanup
from attnres.model import Decoder
from attnres.model.norm import RMSNorm

__all__ = ["PACKED_MEAN_DOC", "Run", "build_model", "guarded", "mfu", "random_documents", "random_tokens",
           "summary"]


@dataclass
class Run:
    """State of one benchmark run: settings, rows so far, the clock."""

    device: torch.device
    dtype: torch.dtype
    warmup: int
    repeat: int
    quick: bool
    deadline: float
    compile_reserve_s: float
    out_path: Path | None
    result: dict[str, Any]
    profile: bool | str = True  # "kernels": the kernels only (profile_step's cpu_ops off)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def timer(self) -> Timer:
        return Timer(self.device)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a finished (or skipped) row, print it and rewrite the JSON."""
        self.rows.append(row)
        keys = ("kind", "shape", "mode", "impl", "variant", "optimizer", "batch")
        line = " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)
        ok = row.get("status") == "ok"
        extra = f"{row['ms']:.3f} ms" if ok else f"{row['status']}: {row.get('reason', '')}"
        if ok and row.get("compile_breakdown_s"):  # where a compiled first call went, its longest phases
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in list(row["compile_breakdown_s"].items())[:4])
            extra += f" (first call {row.get('first_call_s', 0):.1f} s: {phases})"
        print(f"[e2e] {line}: {extra}", flush=True)
        families = (row.get("profile") or {}).get("families")
        if ok and families:  # where the profiled step's device time went, by kernel family
            print("[e2e]   device ms by kernel family: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in families.items()), flush=True)
        self.flush()
        return row

    def flush(self) -> None:
        self.result["rows"] = self.rows
        self.result["ratios"] = compute_ratios(self.rows)
        self.result["elapsed_s"] = round(time.perf_counter() - self.result["_t0"], 1)
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: v for k, v in self.result.items() if not k.startswith("_")},
                                      indent=1, default=json_default))
            os.replace(tmp, self.out_path)


def guarded(
    run: Run, base: dict[str, Any], fn: Callable[[], dict[str, Any]], compiles: bool = False,
    reset: bool = False,
) -> dict:
    """Run one row: skip it when the budget is spent (a row that ``compiles`` needs ``compile_reserve_s``
    left), record OOM / errors instead of raising; ``reset``: drop dynamo's compiled code after it."""
    row = dict(base)
    need = run.compile_reserve_s if compiles else 0.0
    if run.left_s() <= need:
        row.update(status="skipped", reason=f"time budget ({run.left_s():.0f} s left, needs ~{need:.0f} s)")
        return run.add(row)
    try:
        row.update(fn())
        row.setdefault("status", "ok")
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", reason=str(exc).split("\n")[0][:240])
    except Exception as exc:  # a failed row must not end the run
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400])
    finally:
        if reset:
            torch._dynamo.reset()
        cleanup(run.device)
    return run.add(row)


def build_model(shape: Shape, mode: str, impl: str, run: Run, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of one row: our decoder at ``shape`` in ``mode`` (with the variant ``impl`` names: recompute,
    unfused, fla-plain (``fla_fused`` off), torch-standard (``fla_fused`` off and every RMSNorm torch's own
    ``F.rms_norm``: the decoder as plain torch code, fla's kernels only for KDA itself), or a peer's
    depth-attention op), or fla's ``KDAForCausalLM``
    (``fla-model``), in ``dtype`` (default the run's) on the run's device; seeded, so every row of a shape
    starts alike."""
    torch.manual_seed(0)
    if impl == "fla-model":  # fla's KDAForCausalLM; called like our Decoder for training
        return build_fla_model(shape.config.replace(residual=mode), run.device, dtype or run.dtype)
    cfg = shape.config.replace(
        residual=mode,
        residual_recompute=impl == "attnres-recompute",
        residual_fuse_norm=impl != "attnres-unfused",
        fla_fused=impl not in ("attnres-fla-plain", "torch-standard"),
    )
    with torch.device(run.device):
        model = Decoder(cfg)
    model.to(dtype=dtype or run.dtype)
    if impl == "torch-standard":  # the baseline in plain torch: torch's RMSNorm, SwiGLU and cross-entropy
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.backend = "native"
    if impl in ("fla", "fast-attnres"):  # their single-read op over each sublayer's sources
        use_fla_residual(model, fast_attnres_fn() if impl == "fast-attnres" else None)
    return model


def random_tokens(shape: Shape, batch: int, length: int, device: torch.device, seed: int = 1) -> Tensor:
    """Token ids ``[batch, length]`` drawn from the shape's vocabulary (a fixed ``seed``), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.config.vocab_size, (batch, length), generator=g).to(device)


PACKED_MEAN_DOC = 512  # mean document length of the packed rows (tokens)


def random_documents(batch: int, length: int, device: torch.device, mean: int = PACKED_MEAN_DOC,
                     seed: int = 3) -> Tensor:
    """Segment ids ``[batch, length]`` of packed documents (``data.packing: documents``): each row cut into
    documents of exponentially distributed lengths (mean ``mean`` tokens, at least 1; a fixed ``seed``),
    numbered from 0 in each row, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths: list[int] = []
        while sum(lengths) < length:
            lengths.append(max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=g).item())))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:length])
    return torch.stack(rows).to(device)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``peak`` (None when the device's peak is unknown)."""
    return None if peak is None else flops_per_token * tokens_per_s / peak


def summary(ms: list[float]) -> dict[str, Any]:
    """A row's time fields from its samples (ms): the median, min, max and the samples themselves."""
    med = statistics.median(ms)
    return {"ms": med, "ms_min": min(ms), "ms_max": max(ms), "ms_samples": [round(t, 4) for t in ms]}
