"""End-to-end benchmark of the residual path in the whole decoder (issue 8).

For the standard residual, Block AttnRes and Full AttnRes in the same model and the same process:

* **train**: one training step (forward + backward; a row without optimizer and one with AdamW), eager
  and ``torch.compile``: median step time, tokens/s, MFU (``Config.flops_per_token`` over a peak-FLOPs
  table), peak memory, and the bytes of the stored AttnRes sources (the memory target is
  ``peak <= standard peak + 1.1 x source bytes``);
* **prefill** (a prompt through the model, filling the caches) and **decode** (one new token with the
  caches, batch 1 and 64; eager and captured in a CUDA graph);
* the **fla peer row**: ``fla.ops.attnres.fused_attnres`` (fla-core 0.6.0) plugged into our decoder's
  residual path (:class:`FlaResidual`), one direct softmax over every source per sublayer;
* the **fla model peer row** (``fla-model``, shape ``kda-dense``): fla's own ``KDAForCausalLM`` at our
  decoder's shape, with and without its ``attnres_block_size`` (:mod:`attnres.bench.peer_fla_model`),
  against our model in each residual mode (ratio ``attnres/fla-model``; the target is ``<= 1``);
* **template vs hand-written**: the ``LanguageModel`` training step driven by a Lightning ``Trainer``
  (bf16-mixed, compiled) against a hand-written compiled step of the same model (same precision, same
  AdamW, same data) in the same process.

Shapes: ``dense`` is the 0.95B Llama-like decoder of the issue (d 2048, 16 layers, 16 heads of 128,
SwiGLU 5632, vocab 32000, B 2, T 4096) built from our :class:`~attnres.model.Config` (see
:func:`dense_config` for how close our NoPE MLA comes to plain multi-head attention); ``medium`` is the
Kimi-Linear-style preset (KDA + MLA + MoE); ``kda-dense`` is the all-KDA dense decoder at fla's
``KDAForCausalLM`` shape (0.97B: 16 layers, d 2048, 16 KDA heads of 128, SwiGLU 5632, B 2, T 4096).
``quick=True`` swaps them for tiny shapes that run on a CPU in seconds (a smoke test of every code path,
not a measurement).

Timing: CUDA events around each repeat after warm-up (which includes compilation), median of the
repeats; peak memory from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Every
row is guarded: an out-of-memory error or any other failure is recorded in the row (``status``) and the
run goes on. Rows run in priority order under a time budget; the JSON is rewritten after every row, so
a run cut short keeps what it measured. Ratios (Block/standard, Full/standard, fla/standard,
template/hand-written) are computed from rows of the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnres import ops
from attnres.bench.peer_fla_model import (
    build_fla_model,
    describe_fla_model,
    fla_model_mismatch,
    fla_model_status,
    kda_dense_config,
)
from attnres.hardware import PEAK_BF16_FLOPS, peak_flops
from attnres.model import Config, Decoder, DecoderCache, get_config, valid_num_blocks
from attnres.residual import Residual, ResidualState

__all__ = [
    "PEAK_BF16_FLOPS",
    "FlaResidual",
    "Shape",
    "bench_e2e",
    "dense_config",
    "format_table",
    "merge_results",
    "residual_traffic",
    "run_e2e_benchmark",
    "use_fla_residual",
]

MODES: tuple[str, ...] = ("standard", "block", "full")
KINDS: tuple[str, ...] = ("train", "prefill", "decode", "template")
VARIANTS: tuple[str, ...] = ("eager", "compile")
IMPLS: tuple[str, ...] = ("attnres", "attnres-recompute", "attnres-unfused", "fla", "fla-model")

RESULTS_DIR = Path("benchmarks/results")


# ----------------------------------------------------------------------------- shapes


def mha_equivalent_kv_rank(dim: int, heads: int, head_dim: int, multiple: int = 64) -> int:
    """The MLA latent rank ``r`` whose K/V projections (``d x r`` down, ``r x H(k + v)`` up) hold as many
    parameters, hence FLOPs per token, as plain MHA's ``2 x d x H x head_dim``, rounded to ``multiple``."""
    exact = 2 * dim * heads * head_dim / (dim + 1 + 2 * heads * head_dim)
    return max(multiple, int(round(exact / multiple)) * multiple)


def dense_config(
    dim: int = 2048, num_layers: int = 16, heads: int = 16, head_dim: int = 128, mlp_dim: int = 5632,
    vocab_size: int = 32000, seq_len: int = 4096, num_blocks: int = 8, kv_rank: int | None = None,
    residual: str = "standard",
) -> Config:
    """The issue's dense decoder from our Config: every layer MLA (``token_mixer="mla"``) + dense SwiGLU.

    Our MLA cannot express plain MHA exactly: keys and values come from a normalised low-rank latent
    (``kv_a -> RMSNorm -> kv_b``), and there is no rotary embedding (NoPE). The closest: 16 heads, query /
    key head dim 128 (``qk_nope 128``, no shared part), value head dim 128, and a latent rank chosen so
    the K/V projections have MHA's parameter count (:func:`mha_equivalent_kv_rank`: 1344 at d 2048), so
    the FLOPs per token and the total (0.95B) match the issue's model within 0.3 %.
    """
    return Config(
        name="dense", vocab_size=vocab_size, max_seq_len=seq_len, dim=dim, num_layers=num_layers,
        residual=residual, num_blocks=num_blocks, token_mixer="mla", moe=False, mlp_dim=mlp_dim,
        mla_num_heads=heads, mla_qk_nope_dim=head_dim, mla_qk_shared_dim=0, mla_v_head_dim=head_dim,
        mla_kv_rank=kv_rank if kv_rank is not None else mha_equivalent_kv_rank(dim, heads, head_dim),
        first_dense_layers=0,
    )


DENSE_NOTE = (
    "dense: plain MHA is not expressible by our NoPE MLA (K/V pass through a normalised low-rank latent); "
    "closest used: token_mixer=mla, 16 heads, qk_nope 128, qk_shared 0, v 128, kv_rank chosen so the K/V "
    "projections have MHA's parameter count (same FLOPs/token within 0.3 %); no RoPE."
)


@dataclass
class Shape:
    """One benchmark shape: a config (its ``residual`` is replaced per row), batch and sequence length.
    ``decode_context``: prompt length before the timed decode step; ``prefill_len``: prompt of the
    prefill rows; ``decode_batches`` / ``prefill_batches``: the batch sizes of those rows."""

    name: str
    config: Config
    batch: int
    seq_len: int
    decode_context: int = 512
    prefill_len: int = 2048
    decode_batches: tuple[int, ...] = (1, 64)
    prefill_batches: tuple[int, ...] = (1,)
    note: str = ""

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "residual"}
        d["params"] = self.config.num_params()
        d["active_params"] = self.config.num_params(active=True)
        d["flops_per_token"] = self.config.flops_per_token(self.seq_len)
        peer = describe_fla_model(self.config)
        if peer is not None:  # fla's KDAForCausalLM at this shape: its KDAConfig and parameter count
            d["fla_model"] = peer
        return d


def default_shapes(quick: bool, num_blocks: int = 8) -> dict[str, Shape]:
    """``dense`` and ``medium`` (the issue's shapes), or their tiny CPU stand-ins when ``quick`` (4 layers,
    so ``num_blocks`` is lowered to the nearest valid count, 4)."""
    if quick:
        n = max(v for v in valid_num_blocks(8) if v <= max(num_blocks, 1))
        dense = dense_config(dim=64, num_layers=4, heads=2, head_dim=32, mlp_dim=128, vocab_size=264,
                             seq_len=32, num_blocks=n, kv_rank=32)
        medium = get_config("tiny", num_blocks=n, max_seq_len=32, dim=64, kda_head_dim=16,
                            mla_v_head_dim=16, mla_qk_nope_dim=16, mla_qk_shared_dim=8, mla_kv_rank=32,
                            expert_dim=32, mlp_dim=128)
        # 4 KDA heads of 64: fla's kernels have autotune results for it in the shipped archive
        # (lightning_modules/autotune), so the GPU test of this shape starts fast
        kda = kda_dense_config(dim=256, num_layers=4, heads=4, head_dim=64, mlp_dim=512, vocab_size=264,
                               seq_len=32, num_blocks=n, chunk_size=16)
        small = dict(decode_context=8, prefill_len=16, decode_batches=(1, 4))
        return {
            "dense": Shape("dense", dense, 2, 32, **small, note="quick (CPU smoke) stand-in for dense"),
            "medium": Shape("medium", medium, 2, 32, **small, note="quick (CPU smoke) stand-in for medium"),
            "kda-dense": Shape("kda-dense", kda, 2, 32, **small,
                               note="quick (CPU smoke) stand-in for kda-dense"),
        }
    medium = get_config("medium", num_blocks=num_blocks)
    small = get_config("small", num_blocks=num_blocks, max_seq_len=2048)
    return {
        "dense": Shape("dense", dense_config(num_blocks=num_blocks), 2, 4096, note=DENSE_NOTE),
        "medium": Shape("medium", medium, 2, 4096, note="the medium preset (Kimi-Linear style: KDA/MLA/MoE)"),
        "kda-dense": Shape("kda-dense", kda_dense_config(num_blocks=num_blocks), 2, 4096,
                           note="all-KDA dense decoder at fla's KDAForCausalLM shape (peer impl fla-model)"),
        "small": Shape("small", small, 16, 2048,
                       note="the small preset at configs/model/small.yaml's batch (16 x 2048 tokens)"),
        **{name: Shape(name, study_config(name, num_blocks), 32, 1024,
                       note=f"the study's {name} (configs/study/model/{name}.yaml, vocab 8192), its batch")
           for name in ("s", "m")},
    }


STUDY_MODELS = Path(__file__).resolve().parents[2] / "configs" / "study" / "model"


def study_config(name: str, num_blocks: int = 8, vocab_size: int = 8192) -> Config:
    """The model of the study's size ``name`` (its YAML's ``model`` fields and ``overrides``) as a Config;
    ``kda_backend`` is left to pick fla where it runs."""
    import yaml

    model = yaml.safe_load((STUDY_MODELS / f"{name}.yaml").read_text())["model"]
    overrides = {k: v for k, v in (model.pop("overrides", None) or {}).items() if k != "kda_backend"}
    fields = {k: v for k, v in model.items() if k not in ("preset", "lr") and v is not None}
    return get_config(model["preset"], vocab_size=vocab_size, num_blocks=num_blocks, **fields, **overrides)


# ----------------------------------------------------------------------------- the fla peer


class FlaResidual(Residual):
    """The residual path with fla's ``fused_attnres`` in place of our two-phase ops: each sublayer input
    (and the read-out) is one direct softmax over the explicit list of its sources — Full: every earlier
    output; Block: the block summaries plus the partial summary. Same parameters (``queries``), same
    math: fla's logit is ``w . RMSNorm_g(v)`` = ``(w * g) . v / rms(v)``.

    ``attnres_fn``: a function with ``fla.ops.attnres.fused_attnres``'s signature
    ``(query [d], residuals: list of [..., d], rms_weight [d], rms_eps=...) -> [..., d]``; default fla's.
    """

    def __init__(self, *args: Any, attnres_fn: Callable[..., Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if attnres_fn is None:
            from fla.ops.attnres import fused_attnres as attnres_fn
        self.attnres_fn = attnres_fn

    def _mix(self, sources: list[Tensor], name: str) -> Tensor:
        q = self.queries[name]
        return self.attnres_fn(q.weight, sources, q.norm_weight, rms_eps=self.eps)

    def input(self, state: ResidualState, i: int, norm: nn.Module | None = None) -> Tensor:
        if self.mode == "standard":
            return super().input(state, i, norm)
        sources = state.sources + ([state.partial] if state.partial is not None else [])
        h = self._mix(sources, str(i))
        return h if norm is None else norm(h)

    def readout(self, state: ResidualState) -> Tensor:
        if self.mode == "standard":
            return super().readout(state)
        if state.partial is not None:
            raise RuntimeError("readout called in the middle of a block: hand back every sublayer's output")
        return self._mix(state.sources, "out")


def use_fla_residual(model: Decoder, attnres_fn: Callable[..., Tensor] | None = None) -> Decoder:
    """Replace ``model.residual`` in place by a :class:`FlaResidual` with the same parameters."""
    old = model.residual
    new = FlaResidual(old.dim, old.num_sublayers, old.mode, old.num_blocks if old.mode == "block" else 8,
                      old.eps, attnres_fn=attnres_fn)
    p = next(old.parameters(), None)
    if p is not None:
        new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(old.state_dict())
    model.residual = new
    return model


def fla_status() -> str | None:
    """None when fla's ``fused_attnres`` can run here, else why not."""
    if not torch.cuda.is_available():
        return "fla's fused_attnres is a Triton kernel: needs CUDA"
    try:
        from fla.ops.attnres import fused_attnres  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton/torch mismatch inside fla
        return f"fla.ops.attnres not importable: {type(exc).__name__}: {exc}"[:300]
    return None


# ----------------------------------------------------------------------------- residual-path traffic


def residual_traffic(config: Config, batch: int, seq_len: int, itemsize: int = 2) -> dict[str, Any]:
    """What the residual path costs per training step as :mod:`attnres.residual` runs it (unfused):
    depth-op calls per forward and the fewest bytes they move (each input read once, each output
    written once; backward counted as twice the forward), plus the bytes of the stored sources (what
    the memory target allows). ``X`` = one ``[B, T, d]`` activation."""
    x = batch * seq_len * config.dim * itemsize
    L = config.num_sublayers
    mode = config.residual
    if mode == "standard":
        calls = {"add": L}
        fwd_x = 3 * L  # h = h + v: read two, write one
        sources = 0
        stored_partials = 0
    elif mode == "full":
        G = config.full_group
        groups = [(f, min(f + G, L)) for f in range(0, L, G)]
        # phase 1 of the group starting at sublayer f reads v_0 .. v_f (f + 1 sources) and writes one
        # output per sublayer of the group; sublayer f + j then merges j outputs by phase 2 (3 X each)
        phase1_x = sum(f + 1 + (e - f) for f, e in groups)
        phase2 = sum(j for f, e in groups for j in range(e - f))
        calls = {"phase1": len(groups), "phase2": phase2, "readout": 1}
        fwd_x = phase1_x + 3 * phase2 + (L + 1) + 1
        sources = L + 1  # v_0 .. v_L
        stored_partials = sum(max(0, j - 1) for f, e in groups for j in range(e - f))  # chained merges
    else:
        S = L // config.num_blocks
        N = L // S
        # phase 1 of block n (n = 1..N) reads the n completed sources once and writes one output per query
        phase1_x = sum(n + S for n in range(1, N + 1))
        phase2 = L - N  # every sublayer but the first of its block merges the partial summary
        adds = L - N  # partial = partial + v inside a block
        calls = {"phase1": N, "phase2": phase2, "partial_add": adds, "readout": 1}
        fwd_x = phase1_x + 3 * phase2 + 3 * adds + (N + 1) + 1
        sources = N + 1  # b_0 .. b_N
        stored_partials = phase2  # each phase-2 call saves its partial summary for backward
    step_bytes = 3 * fwd_x * x  # forward + a backward of about twice the forward
    return {
        "activation_bytes": x,
        "calls_per_forward": calls,
        "calls_per_step": 2 * sum(calls.values()),
        "fwd_bytes": fwd_x * x,
        "step_bytes": step_bytes,
        "source_bytes": sources * x,
        "saved_partial_bytes": stored_partials * x,
    }


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Per-repeat times (ms) of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, else a host clock."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_slug(device: torch.device) -> str:
    """A short file-name tag: ``h100``, ``h200``, ... (the GPU), or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return statistics.median(time_ms(lambda: torch.mm(a, b), device, 3, 10))


def _copy_ms(nbytes: int, device: torch.device) -> float:
    x = torch.empty(nbytes // 4, device=device).uniform_()
    y = torch.empty_like(x)
    return statistics.median(time_ms(lambda: y.copy_(x), device, 2, 5))


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, Any]:
    """The two ceilings, measured: a bf16 (fp32 on CPU) square matmul's FLOP/s and a device-to-device
    copy's bandwidth (bytes read + written), on random data, median of repeats."""
    small = quick or device.type != "cuda"
    n, nbytes = (512, 1 << 24) if small else (8192, 1 << 31)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mm, cp = _matmul_ms(n, dtype, device), _copy_ms(nbytes, device)
    _cleanup(device)
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_bytes": 2 * nbytes,
            "copy_gbps": 2 * nbytes / (cp * 1e-3) / 1e9}


# ----------------------------------------------------------------------------- the run


@dataclass
class _Run:
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
    profile: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        keys = ("kind", "shape", "mode", "impl", "variant", "optimizer", "batch")
        line = " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)
        ok = row.get("status") == "ok"
        extra = f"{row['ms']:.3f} ms" if ok else f"{row['status']}: {row.get('reason', '')}"
        print(f"[e2e] {line}: {extra}", flush=True)
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
                                      indent=1, default=_json_default))
            os.replace(tmp, self.out_path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype | torch.device | Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    return repr(o)


def _guarded(
    run: _Run, base: dict[str, Any], fn: Callable[[], dict[str, Any]], compiles: bool = False,
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
        _cleanup(run.device)
    return run.add(row)


def _build(shape: Shape, mode: str, impl: str, run: _Run, dtype: torch.dtype | None = None) -> nn.Module:
    torch.manual_seed(0)
    if impl == "fla-model":  # fla's KDAForCausalLM; called like our Decoder for training
        return build_fla_model(shape.config.replace(residual=mode), run.device, dtype or run.dtype)
    cfg = shape.config.replace(
        residual=mode,
        residual_recompute=impl == "attnres-recompute",
        residual_fuse_norm=impl != "attnres-unfused",
    )
    with torch.device(run.device):
        model = Decoder(cfg)
    model.to(dtype=dtype or run.dtype)
    if impl == "fla":
        use_fla_residual(model)
    return model


def _tokens(shape: Shape, batch: int, length: int, device: torch.device, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.config.vocab_size, (batch, length), generator=g).to(device)


def _mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_token * tokens_per_s / peak


def _summary(ms: list[float]) -> dict[str, Any]:
    med = statistics.median(ms)
    return {"ms": med, "ms_min": min(ms), "ms_max": max(ms), "ms_samples": [round(t, 4) for t in ms]}


def _profile(fn: Callable[[], object], device: torch.device, top: int = 12) -> dict[str, Any]:
    """One profiled call: kernel count, total device time, the ops with the most device self-time,
    and the time of the depth-attention ops (``attnres::*``, when the extension runs them)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    events = prof.events()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    avgs = prof.key_averages()

    def dev_self(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def dev_total(e: Any) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))

    ranked = sorted(avgs, key=dev_self if device.type == "cuda" else (lambda e: e.self_cpu_time_total),
                    reverse=True)
    return {
        "kernels": len(on_device),
        "device_ms": round(sum(float(e.time_range.elapsed_us()) for e in on_device) / 1e3, 4),
        "top_ops": [
            {"op": e.key, "count": e.count, "self_ms": round((dev_self(e) if device.type == "cuda"
                                                              else e.self_cpu_time_total) / 1e3, 4)}
            for e in ranked[:top]
        ],
        "attnres_ops": [
            {"op": e.key, "count": e.count, "total_ms": round(dev_total(e) / 1e3, 4)}
            for e in avgs if e.key.startswith("attnres::")
        ],
    }


# ----------------------------------------------------------------------------- training rows


def _train_rows(run: _Run, shape: Shape, mode: str, impl: str, variant: str) -> None:
    """Two rows from one model: the step without optimizer, then with AdamW (compiled once)."""
    base = {"kind": "train", "shape": shape.name, "mode": mode, "impl": impl, "variant": variant,
            "batch": shape.batch, "seq_len": shape.seq_len}
    peak = peak_flops(run.device)
    cfg = shape.config.replace(residual=mode)
    traffic = residual_traffic(cfg, shape.batch, shape.seq_len, torch.finfo(run.dtype).bits // 8)
    tokens = shape.batch * shape.seq_len
    fpt = cfg.flops_per_token(shape.seq_len)
    holder: dict[str, Any] = {}

    def setup_and_time(optimizer: bool) -> dict[str, Any]:
        if "model" not in holder:
            model = _build(shape, mode, impl, run)
            model.train()
            holder["model"] = model
            holder["fwd"] = torch.compile(model) if variant == "compile" else model
            holder["ids"] = _tokens(shape, shape.batch, shape.seq_len, run.device)
            holder["labels"] = _tokens(shape, shape.batch, shape.seq_len, run.device, seed=2)
        model, fwd, ids, labels = holder["model"], holder["fwd"], holder["ids"], holder["labels"]
        opt = None
        if optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=run.device.type == "cuda")

        def step() -> None:
            out = fwd(ids, labels=labels)
            (out.loss + out.aux_loss).backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)

        _cleanup(run.device)
        resident = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None
        _reset_memory(run.device)
        t0 = time.perf_counter()
        try:
            step()  # first call: compilation (compiled variant) and lazy state
        except Exception as exc:  # a peer that torch.compile cannot take is skipped, with the reason
            if impl != "fla-model" or variant != "compile" or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            msg = f"torch.compile of fla's KDAForCausalLM failed: {type(exc).__name__}: {exc}"
            return {"status": "skipped", "reason": msg.replace("\n", " ")[:400]}
        _sync(run.device)
        first_s = time.perf_counter() - t0
        ms = time_ms(step, run.device, max(run.warmup - 1, 0), run.repeat)
        row = _summary(ms)
        tps = tokens / (row["ms"] * 1e-3)
        row.update(
            first_call_s=round(first_s, 2), tokens_per_s=tps, flops_per_token=fpt, mfu=_mfu(fpt, tps, peak),
            peak_mem_bytes=_peak_memory(run.device), resident_bytes_before=resident,
            source_bytes=traffic["source_bytes"], saved_partial_bytes=traffic["saved_partial_bytes"],
            residual_calls_per_step=traffic["calls_per_step"], residual_step_bytes=traffic["step_bytes"],
            ops_backend=ops.backend(run.device) if not impl.startswith("fla") else "fla",
            params=sum(p.numel() for p in model.parameters()),
        )
        bandwidth = (run.result.get("ceilings") or {}).get("copy_gbps")
        if bandwidth:  # the residual path's bytes at the measured copy bandwidth: no kernel does better
            row["residual_floor_ms"] = traffic["step_bytes"] / (bandwidth * 1e9) * 1e3
        if run.profile and not optimizer:
            row["profile"] = _profile(step, run.device)
        return row

    try:
        first = _guarded(run, {**base, "optimizer": "none"}, lambda: setup_and_time(False),
                         compiles=variant == "compile" and "model" not in holder)
        if first["status"] == "ok":
            _guarded(run, {**base, "optimizer": "adamw"}, lambda: setup_and_time(True))
        else:
            run.add({**base, "optimizer": "adamw", "status": "skipped",
                     "reason": f"the step without optimizer ended in {first['status']}"})
    finally:
        holder.clear()
        if variant == "compile":
            torch._dynamo.reset()
        _cleanup(run.device)


# ----------------------------------------------------------------------------- inference rows


def _fork(cache: DecoderCache) -> DecoderCache:
    """A cache that reads the same tensors but whose updates do not touch ``cache``: a decode step run
    on a fork can be repeated (and replayed from a CUDA graph) on the same context."""
    return DecoderCache(layers={k: dict(v) for k, v in cache.layers.items()}, seq_len=cache.seq_len,
                        residual_queries=cache.residual_queries)


def _capture(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _serve_rows(run: _Run, shape: Shape, mode: str, impl: str, kinds: Sequence[str], graphs: bool) -> None:
    """Prefill and decode rows of one model (eval, no grad): eager, and replayed from a CUDA graph."""
    holder: dict[str, Any] = {}
    base = {"shape": shape.name, "mode": mode, "impl": impl}

    def model() -> Decoder:
        if "model" not in holder:
            holder["model"] = _build(shape, mode, impl, run).eval()
        return holder["model"]

    try:
        with torch.no_grad():
            if "prefill" in kinds:
                for b in shape.prefill_batches:
                    def prefill(graph: bool, b: int = b) -> dict[str, Any]:
                        m = model()
                        prompt = _tokens(shape, b, shape.prefill_len, run.device)
                        call = lambda: m(prompt, cache=DecoderCache())  # noqa: B023 (used at once)
                        fn = _capture(call, run.device) if graph else call
                        _reset_memory(run.device)
                        ms = time_ms(fn, run.device, run.warmup, run.repeat)
                        row = _summary(ms)
                        row.update(tokens_per_s=b * shape.prefill_len / (row["ms"] * 1e-3),
                                   peak_mem_bytes=_peak_memory(run.device), prompt_len=shape.prefill_len)
                        return row

                    # in a CUDA graph the Python overhead per op is gone: the device-side cost
                    for graph in (False, True) if graphs else (False,):
                        _guarded(run, {"kind": "prefill", **base, "variant": "graph" if graph else "eager",
                                       "batch": b}, lambda b=b, graph=graph: prefill(graph, b))
            if "decode" in kinds:
                for b in shape.decode_batches:
                    ctx: dict[str, Any] = {}

                    def prepare(b: int = b, ctx: dict[str, Any] = ctx) -> None:
                        m = model()
                        cache = DecoderCache()
                        m(_tokens(shape, b, shape.decode_context, run.device), cache=cache)
                        tok = _tokens(shape, b, 1, run.device, seed=3)
                        ctx["step"] = lambda: m(tok, cache=_fork(cache)).logits

                    def decode(graph: bool, b: int = b, ctx: dict[str, Any] = ctx) -> dict[str, Any]:
                        if "step" not in ctx:
                            prepare(b, ctx)
                        fn = _capture(ctx["step"], run.device) if graph else ctx["step"]
                        _reset_memory(run.device)
                        many = run.device.type == "cuda"  # a decode step is short: more repeats on a GPU
                        ms = time_ms(fn, run.device, run.warmup + 2 * many, run.repeat * (4 if many else 1))
                        row = _summary(ms)
                        row.update(tokens_per_s=b / (row["ms"] * 1e-3), context=shape.decode_context,
                                   peak_mem_bytes=_peak_memory(run.device))
                        return row

                    dbase = {"kind": "decode", **base, "batch": b}
                    for graph in (False, True) if graphs else (False,):
                        _guarded(run, {**dbase, "variant": "graph" if graph else "eager"},
                                 lambda b=b, ctx=ctx, graph=graph: decode(graph, b, ctx))
                    ctx.clear()
    finally:
        holder.clear()
        _cleanup(run.device)


# ----------------------------------------------------------------------------- template vs hand-written


def _template_rows(run: _Run, shape: Shape, compile: bool, precision: str, per_step_callbacks: bool) -> None:
    """The ``LanguageModel`` step through a Lightning ``Trainer`` vs a hand-written step of the same model
    (standard residual; ``precision`` autocast; fused AdamW with the same parameter groups and a
    ``LambdaLR``; the same batch, copied to the device each step). Step time = the interval between
    consecutive step starts (CUDA events), so the loops' own overhead counts. ``per_step_callbacks``:
    the Trainer also runs the callbacks ``attnres fit`` always adds (NaN guard, throughput/MFU)."""
    base = {"kind": "template", "shape": shape.name, "mode": "standard", "impl": "attnres",
            "variant": "compile" if compile else "eager", "batch": shape.batch, "seq_len": shape.seq_len,
            "precision": precision, "optimizer": "adamw"}
    try:
        import lightning as L

        from lightning_modules.module import LanguageModel
    except Exception as exc:
        reason = f"lightning_modules.LanguageModel not importable: {type(exc).__name__}: {exc}"[:300]
        for who in ("hand-written", "template"):
            run.add({**base, "impl": who, "status": "skipped", "reason": reason})
        return

    cfg = shape.config.replace(residual="standard")
    fields = {f: v for f, v in dataclasses.asdict(cfg).items() if f != "name"}
    steps = max(run.warmup, 1) + run.repeat + 1
    batch = {"input_ids": _tokens(shape, shape.batch, shape.seq_len, torch.device("cpu")),
             "labels": _tokens(shape, shape.batch, shape.seq_len, torch.device("cpu"), seed=2)}
    peak = peak_flops(run.device)
    tokens = shape.batch * shape.seq_len
    fpt = cfg.flops_per_token(shape.seq_len)
    autocast_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def lm() -> Any:  # the LanguageModel of this shape: the preset's fields all overridden
        torch.manual_seed(0)
        return LanguageModel(preset="tiny", overrides=fields, compile=compile, lr=1e-4, warmup_steps=1,
                             schedule="constant")

    def mark() -> Any:
        if run.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def finish(marks: list[Any]) -> dict[str, Any]:
        """``marks``: one at each step start and one after the last step."""
        _sync(run.device)
        if run.device.type == "cuda":
            ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        else:
            ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        timed = ms[max(run.warmup, 1):] or ms
        row = _summary(timed)
        tps = tokens / (row["ms"] * 1e-3)
        row.update(tokens_per_s=tps, flops_per_token=fpt, mfu=_mfu(fpt, tps, peak),
                   peak_mem_bytes=_peak_memory(run.device), first_step_s=round(ms[0] / 1e3, 2), steps=len(ms))
        return row

    def hand_written() -> dict[str, Any]:
        module = lm()  # only for its model and parameter groups: the loop below is plain PyTorch
        model = module.model.to(run.device)
        fwd = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(module.param_groups(), lr=1e-4, betas=(0.9, 0.95),
                                fused=run.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model.train()
        _reset_memory(run.device)
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
            from lightning_modules.callbacks import NaNGuard, ThroughputMonitor

            callbacks += [NaNGuard(**guard), ThroughputMonitor()]
        trainer = L.Trainer(
            accelerator="gpu" if run.device.type == "cuda" else "cpu", devices=1, precision=precision,
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        )
        _reset_memory(run.device)
        loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        row = finish(marks)
        row["callbacks"] = [type(c).__name__ for c in callbacks]
        row["nan_guard"] = guard
        return row

    _guarded(run, {**base, "impl": "hand-written"}, hand_written, compiles=compile, reset=compile)
    # the template as `attnres fit` runs it, then (per_step_callbacks) what its per-step callbacks cost:
    # without the NaN guard's gradient check (one host sync a step), and without any of them
    variants = (
        [("template", {}), ("template-nogradcheck", {"check_gradients": False}), ("template-bare", None)]
        if per_step_callbacks
        else [("template", None)]
    )
    for impl, guard in variants:
        _guarded(run, {**base, "impl": impl}, lambda g=guard: template(g), compiles=compile, reset=compile)


# ----------------------------------------------------------------------------- ratios and table


def compute_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Block/standard, Full/standard (ours and fla's, against our standard row of the same kind, shape,
    variant, optimizer and batch; fla's model against its own standard row), ours/fla's model per mode
    (``attnres/fla-model``, target ``<= 1``) and template/hand-written, from rows of this run, on step
    time and (train) on peak memory, with the memory target ``standard + 1.1 x source bytes``."""
    def key(r: dict[str, Any]) -> tuple:
        return (r.get("kind"), r.get("shape"), r.get("variant"), r.get("optimizer"), r.get("batch"))

    def ratio(r: dict[str, Any], base: dict[str, Any], what: str) -> dict[str, Any]:
        """Row ``r`` against row ``base`` (same kind, shape, variant, optimizer and batch)."""
        entry = {"kind": r["kind"], "shape": r["shape"], "variant": r["variant"],
                 "optimizer": r.get("optimizer"), "batch": r.get("batch"), "what": what,
                 "time_ratio": r["ms"] / base["ms"]}
        if r.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
            entry["mem_ratio"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        return entry

    ok = [r for r in rows if r.get("status") == "ok"]
    std = {(key(r), r["impl"]): r for r in ok if r.get("mode") == "standard"
           and r.get("impl") in ("attnres", "fla-model") and r.get("kind") != "template"}
    out = []
    for r in ok:
        if r.get("kind") == "template" or r.get("mode") == "standard":
            continue
        own = r["impl"] == "fla-model"  # fla's model: AttnRes against its own standard residual
        s = std.get((key(r), "fla-model" if own else "attnres"))
        if s is None:
            continue
        suffix = {"fla": "(fla)", "attnres-recompute": "(recompute)", "attnres-unfused": "(unfused)",
                  "fla-model": "(fla-model)"}.get(r["impl"], "")
        what = f"{r['mode']}{suffix}/standard{suffix if own else ''}"
        entry = ratio(r, s, what)
        if "mem_ratio" in entry and r["kind"] == "train" and r.get("source_bytes"):
            target = s["peak_mem_bytes"] + 1.1 * r["source_bytes"]
            entry.update(mem_target_bytes=target, mem_target_met=r["peak_mem_bytes"] <= target)
        out.append(entry)
    peer = {(key(r), r.get("mode")): r for r in ok if r.get("impl") == "fla-model"}
    for r in ok:  # our model against fla's KDAForCausalLM in the same mode: the target is <= 1
        p = peer.get((key(r), r.get("mode"))) if r.get("impl") == "attnres" else None
        if p is None:
            continue
        out.append({**ratio(r, p, f"attnres/fla-model {r['mode']}"), "time_target_met": r["ms"] <= p["ms"]})
    tmpl = {r["impl"]: r for r in ok if r.get("kind") == "template"}
    h = tmpl.get("hand-written")
    for impl, t in tmpl.items() if h is not None else []:
        if impl == "hand-written":
            continue
        out.append({"kind": "template", "shape": t["shape"], "variant": t["variant"], "optimizer": "adamw",
                    "batch": t["batch"], "what": f"{impl}/hand-written", "time_ratio": t["ms"] / h["ms"],
                    "mem_ratio": t["peak_mem_bytes"] / h["peak_mem_bytes"] if h.get("peak_mem_bytes")
                    else None})
    return out


def _fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}G"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of every row, then the ratios."""
    cols = ("kind", "shape", "mode", "impl", "variant", "opt", "B", "ms", "tok/s", "MFU", "peak", "src",
            "status")
    lines = []
    for r in result["rows"]:
        ok = r.get("status") == "ok"
        mfu = r.get("mfu")
        lines.append((
            r.get("kind", ""), r.get("shape", ""), r.get("mode", ""), r.get("impl", ""), r.get("variant", ""),
            r.get("optimizer") or "", str(r.get("batch", "")),
            f"{r['ms']:.3f}" if ok else "-",
            f"{r['tokens_per_s']:.4g}" if ok and r.get("tokens_per_s") else "-",
            f"{100 * mfu:.1f}%" if ok and mfu is not None else "-",
            _fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
            _fmt_bytes(r.get("source_bytes")) if r.get("source_bytes") else "-",
            r.get("status", "") if ok else f"{r.get('status')}: {r.get('reason', '')[:60]}",
        ))
    widths = [max(len(c), *(len(x[i]) for x in lines)) if lines else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
    if result.get("ratios"):
        out += ["", "ratios (same run):"]
        for q in result["ratios"]:
            mem = f"  mem {q['mem_ratio']:.3f}x" if q.get("mem_ratio") else ""
            if "mem_target_met" in q:
                verdict = "met" if q["mem_target_met"] else "MISSED"
                mem += f" (target {_fmt_bytes(q['mem_target_bytes'])}: {verdict})"
            target = ""
            if "time_target_met" in q:
                target = f" (target <= 1: {'met' if q['time_target_met'] else 'MISSED'})"
            out.append(f"  {q['kind']:<8} {q['shape']:<7} {q['variant']:<8} {q.get('optimizer') or '':<6} "
                       f"B={q.get('batch')!s:<3} {q['what']:<25} time {q['time_ratio']:.3f}x{target}{mem}")
    env = result.get("ceilings") or {}
    if env:
        out.append(f"\nmeasured: matmul {env['matmul_tflops']:.3g} TFLOP/s "
                   f"({env['matmul_dtype']} {env['matmul_n']}^3), copy {env['copy_gbps']:.0f} GB/s; "
                   f"peak used for MFU: "
                   f"{(result.get('peak_flops') or 0) / 1e12:.0f} TFLOP/s; device {result.get('device')}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry points


def _versions() -> dict[str, str | None]:
    def ver(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": ver("triton"), "fla-core": ver("fla-core"), "lightning": ver("lightning"),
        "attnres": ver("attnres"), "attnres_commit": commit,
    }


def run_e2e_benchmark(
    quick: bool = False,
    shapes: Sequence[str] = ("dense", "medium"),
    modes: Sequence[str] = MODES,
    kinds: Sequence[str] = KINDS,
    variants: Sequence[str] = VARIANTS,
    impls: Sequence[str] = IMPLS,
    num_blocks: int = 8,
    graphs: bool = True,
    template_compile: bool | None = None,
    template_precision: str = "bf16-mixed",
    template_callbacks: bool = True,
    warmup: int = 3,
    repeat: int = 10,
    budget_s: float = 480.0,
    compile_reserve_s: float | None = None,
    profile: bool = True,
    device: str | None = None,
    out: str | Path | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Run the end-to-end benchmark; returns the result dict (also written as JSON to ``out``).

    Rows run in priority order, each phase over the shapes: train eager (ours, then fla), prefill and
    decode, train compiled (ours), template vs hand-written (on ``dense``, else the first shape), train
    compiled (fla); they are skipped once ``budget_s`` seconds have passed (a compiled row also needs
    ``compile_reserve_s`` left). ``tag`` names the run in the JSON (and in :func:`merge_results`).
    See :func:`bench_e2e` for the arguments. A quick run on a CPU uses one thread (tiny shapes run
    faster so, and a loaded machine does not stall them).
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
    variants: Sequence[str], impls: Sequence[str], num_blocks: int, graphs: bool,
    template_compile: bool | None, template_precision: str, template_callbacks: bool, warmup: int,
    repeat: int, budget_s: float, compile_reserve_s: float | None, profile: bool,
    device: str | None, out: str | Path | None, tag: str | None,
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
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "versions": _versions(),
        "ops_backend": ops.backend(dev),
        "extension_error": ops.extension_error,
        "dtype": f"{str(dtype).replace('torch.', '')} (parameters and activations; depth softmax in fp32)",
        "peak_flops": peak_flops(dev),
        "peak_flops_table": dict(PEAK_BF16_FLOPS),
        "settings": {"modes": list(modes), "kinds": list(kinds), "variants": list(variants),
                     "impls": list(impls), "num_blocks": num_blocks, "warmup": warmup, "repeat": repeat,
                     "budget_s": budget_s,
                     "graphs": graphs, "template_compile": template_compile,
                     "template_precision": template_precision, "template_callbacks": template_callbacks},
        "shapes": {s: all_shapes[s].describe() for s in shapes},
        "residual_traffic": {
            s: {m: residual_traffic(all_shapes[s].config.replace(residual=m), all_shapes[s].batch,
                                    all_shapes[s].seq_len, torch.finfo(dtype).bits // 8) for m in modes}
            for s in shapes
        },
    }
    run = _Run(dev, dtype, warmup, repeat, quick, t0 + budget_s, compile_reserve_s,
               Path(out) if out is not None else None, result, profile=profile)
    fla_why = fla_status() if "fla" in impls else None
    result["fla"] = {"available": fla_why is None, "reason": fla_why}
    fla_model_why = fla_model_status() if "fla-model" in impls else None
    result["fla_model"] = {"available": fla_model_why is None, "reason": fla_model_why}
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
        why = {"fla": fla_why, "fla-model": fla_model_why}.get(impl)
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
        for shape in picked:
            train(shape, "fla", "eager", theirs)
            if "fla-model" in impls:  # fla's own model, every mode (standard: attnres_block_size None)
                train(shape, "fla-model", "eager", ours)
    for shape in picked if serve else []:
        for m in ours if "attnres" in impls else []:
            _serve_rows(run, shape, m, "attnres", serve, graphs and dev.type == "cuda")
        for m in theirs if fla_why is None else []:
            _serve_rows(run, shape, m, "fla", serve, graphs and dev.type == "cuda")
    if "train" in kinds and "compile" in variants and "attnres" in impls:
        for shape in picked:
            train(shape, "attnres", "compile", ours)
            if "attnres-unfused" in impls:
                train(shape, "attnres-unfused", "compile", [m for m in ours if m != "standard"])
    if "template" in kinds:
        _template_rows(run, all_shapes["dense" if "dense" in shapes else shapes[0]], template_compile,
                       template_precision, template_callbacks)
    if "train" in kinds and "compile" in variants:
        for shape in picked:
            train(shape, "fla", "compile", theirs)
            if "fla-model" in impls:
                train(shape, "fla-model", "compile", ours)
    run.flush()
    result.pop("_t0", None)
    return result


def merge_results(paths: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Merge the JSON of several runs on one device (e.g. the parts of ``benchmarks/device_e2e.sh``)
    into one: ``runs`` keeps each run's command, versions, settings and ceilings; every row and ratio
    gets the ``run`` it came from (ratios are never formed across runs). Written to ``out`` if given."""
    runs, rows, ratios = [], [], []
    merged: dict[str, Any] = {"benchmark": "e2e"}
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = data.get("tag") or Path(path).stem
        for key in ("device", "device_slug", "versions", "ops_backend", "peak_flops", "fla", "quick"):
            merged.setdefault(key, data.get(key))
        merged.setdefault("shapes", {}).update(data.get("shapes", {}))
        merged.setdefault("residual_traffic", {}).update(data.get("residual_traffic", {}))
        runs.append({"run": name, "file": Path(path).name, **{k: data.get(k) for k in (
            "command", "settings", "ceilings", "elapsed_s", "versions", "ops_backend")}})
        rows += [{**r, "run": name} for r in data.get("rows", [])]
        ratios += [{**q, "run": name} for q in data.get("ratios", [])]
    merged.update(runs=runs, rows=rows, ratios=ratios, ceilings=runs[0]["ceilings"] if runs else None)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(merged, indent=1, default=_json_default))
    return merged


def default_out_path(
    device: torch.device | str | None = None, tag: str | None = None, quick: bool = False
) -> Path:
    """``benchmarks/results/e2e_<device>[_<tag>].json`` (``_quick`` for quick runs)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = ["e2e", device_slug(dev)] + ([tag] if tag else []) + (["quick"] if quick else [])
    return RESULTS_DIR / ("_".join(parts) + ".json")


def bench_e2e(
    quick: bool = False,
    shapes: list[Literal["dense", "medium", "kda-dense", "small", "s", "m"]] | None = None,
    modes: list[Literal["standard", "block", "full"]] | None = None,
    kinds: list[Literal["train", "prefill", "decode", "template"]] | None = None,
    variants: list[Literal["eager", "compile"]] | None = None,
    impls: list[Literal["attnres", "attnres-recompute", "attnres-unfused", "fla", "fla-model"]] | None = None,
    num_blocks: int = 8,
    graphs: bool = True,
    template_compile: bool | None = None,
    template_precision: str = "bf16-mixed",
    template_callbacks: bool = True,
    warmup: int = 3,
    repeat: int = 10,
    budget_s: float = 480.0,
    profile: bool = True,
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
        variants: training variants ``eager`` and/or ``compile`` (torch.compile of the whole model).
            Default: both (``quick``: eager only; compiling on a CPU takes minutes).
        impls: ``attnres`` (ours), ``attnres-recompute`` (ours with ``residual_recompute``: Block rows,
            eager), ``attnres-unfused`` (ours with ``residual_fuse_norm`` off: phase 2 and the sublayer
            norm as separate ops; AttnRes rows), ``fla`` (fla-core's fused_attnres in our decoder) and/or
            ``fla-model`` (fla's own KDAForCausalLM, flash-linear-attention 0.6 + transformers, at the
            ``kda-dense`` shape: ``attnres_block_size`` None / ``2 L / num_blocks`` / 1 for standard /
            block / full; other shapes get one skipped row saying why).
        num_blocks: N of Block AttnRes.
        graphs: also time prefill and decode replayed from a CUDA graph (GPU only).
        template_compile: compile in the template comparison (default: on a GPU).
        template_precision: Lightning precision of the template comparison (the hand-written step uses
            the same autocast).
        template_callbacks: the template's Trainer also runs the per-step callbacks ``attnres fit`` always
            adds (NaN guard, throughput/MFU monitor), as a user's run would.
        warmup: warm-up calls per row (the first includes compilation).
        repeat: timed repeats per row (median reported).
        budget_s: stop starting rows after this many seconds (the rest are recorded as skipped).
        profile: add a one-step profile (kernel count, top ops) to each train row without optimizer.
        device: ``cuda`` / ``cpu`` (default: cuda when available).
        tag: appended to the JSON file name (``e2e_<device>_<tag>.json``).
        out: JSON path (default ``benchmarks/results/e2e_<device>[_<tag>].json``).
    """
    path = Path(out) if out else default_out_path(device, tag, quick)
    result = run_e2e_benchmark(
        quick=quick, shapes=shapes or ["dense", "medium"], modes=modes or list(MODES),
        kinds=kinds or list(KINDS), variants=variants or (["eager"] if quick else list(VARIANTS)),
        impls=impls or list(IMPLS), num_blocks=num_blocks, graphs=graphs, template_compile=template_compile,
        template_precision=template_precision, template_callbacks=template_callbacks, warmup=warmup,
        repeat=repeat, budget_s=budget_s,
        profile=profile, device=device, out=path, tag=tag,
    )
    print(format_table(result))
    print(f"\nJSON: {path}")

