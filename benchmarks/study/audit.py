"""Baseline audit (issue 25, item 1): an independent plain decoder on the study's data and budget.

Trains litgpt's ``GPT`` (``litgpt.model.GPT(litgpt.config.Config(...))``: a pre-norm Llama-style decoder
with RMSNorm, SwiGLU, RoPE and causal SDPA attention, code the project did not write) on the study's
data path (``lightning_modules.data.TextDataModule`` with ``configs/study/base.yaml``'s data settings:
the same shards, training windows, shuffle seed per epoch and validation windows) for a given number
of tokens, with AdamW (the study's betas, weight decay on matrices only, clipping 1.0) and a linear
warm-up + cosine schedule, and writes the validation curve at the study's steps to a JSON.

The reference is sized to a study model (``--model s``, ``m``, ... of ``configs/study/model/``): the
same layers and width, head size 64, and the SwiGLU width that makes its active parameters (every
parameter but the input embedding; the LM head counts) equal to the project's standard model's
(``attnres.model.Config.num_params(active=True)``). ``--describe`` prints the matched shapes.

``--residual`` picks the residual path of the reference:

* ``plain`` (default): litgpt's own ``GPT.forward``, unmodified;
* ``standard`` / ``block`` / ``full``: litgpt's blocks with each attention and MLP sublayer routed
  through ``attnres.residual.make_residual`` (``residual.begin/input/output/readout``, as
  ``attnres/model/decoder.py`` drives it); ``standard`` equals ``plain`` (a check of the wrapper),
  ``block`` is the reference with Block AttnRes (``--num_blocks``, default 8).

``--arch project`` trains the project's own decoder (``attnres.model.Decoder`` of the study's config)
through this same loop instead: with the Lightning runs of ``benchmarks/study/run.py`` that separates
the model from the training stack.

Runs on a GPU (bf16 autocast, fused AdamW); ``--device cpu --precision 32`` for a check. litgpt is
imported only to build the model, so ``--help`` works without it. Install (the device has no network:
carry the wheels in ``.whl/``, which ``benchmarks/device_common.sh`` installs)::

    python -m pip download --no-deps -d .whl litgpt==0.5.13 psutil==7.2.2

Example (docs/study_plan.md, "Baseline audit")::

    python -m benchmarks.study.audit --model s --seed 0                 # the plain reference at s
    python -m benchmarks.study.audit --model s --residual block --seed 0
    python -m benchmarks.study.audit --describe                         # matched shapes, no training
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs/study/base.yaml"
SWEEPS = ROOT / "configs/study/sweeps.yaml"
MODELS = ROOT / "configs/study/model"
RESULTS = ROOT / "benchmarks/results/audit"
HEAD_SIZE = 64
RESIDUALS = ("plain", "standard", "block", "full")
INITS = ("litgpt", "gpt2")


# ----------------------------------------------------------------------------- shapes and counts


def project_config(model: str, vocab_size: int = 8192, residual: str = "standard", num_blocks: int = 8):
    """The study's model ``model`` (``configs/study/model/<model>.yaml``) as an ``attnres.model.Config``."""
    from attnres.model import Config

    fields = yaml.safe_load((MODELS / f"{model}.yaml").read_text())["model"]["config"]
    fields = {k: v for k, v in fields.items() if k != "kda_backend"}  # fla where it runs
    return Config(**{**fields, "vocab_size": vocab_size, "residual": residual, "num_blocks": num_blocks})


def reference_params(n_layer: int, n_embd: int, intermediate_size: int, vocab_size: int,
                     active: bool = True) -> int:
    """Parameters of the reference GPT (no biases, untied head, as :func:`litgpt_config` builds it):
    per layer qkv ``3 d^2`` + proj ``d^2`` + SwiGLU ``3 d I`` + two RMSNorms; final norm; LM head;
    ``active=False`` adds the input embedding (a lookup, not counted as active, as in the project)."""
    d = n_embd
    per_layer = 4 * d * d + 3 * d * intermediate_size + 2 * d
    total = n_layer * per_layer + d + vocab_size * d
    return total if active else total + vocab_size * d


def matched_shape(project, multiple: int = 32) -> dict[str, int]:
    """The reference shape of the project's config ``project``: its layers and width, heads of
    ``HEAD_SIZE``, and the SwiGLU width (a multiple of ``multiple``) whose active parameters are
    nearest the project's standard model's. Returns the shape with both counts and their ratio."""
    target = project.replace(residual="standard").num_params(active=True)
    L, d, V = project.num_layers, project.dim, project.vocab_size
    if d % HEAD_SIZE:
        raise ValueError(f"dim {d} is not a multiple of the head size {HEAD_SIZE}")
    fixed = reference_params(L, d, 0, V)
    width = max(multiple, round((target - fixed) / (3 * d * L) / multiple) * multiple)
    active = reference_params(L, d, width, V)
    return {
        "n_layer": L, "n_embd": d, "n_head": d // HEAD_SIZE, "intermediate_size": width,
        "vocab_size": V, "reference_active": active,
        "reference_total": reference_params(L, d, width, V, active=False),
        "project_active": target, "project_total": project.replace(residual="standard").num_params(),
        "ratio": active / target,
    }


def litgpt_config(shape: dict[str, int], block_size: int):
    """litgpt's ``Config`` of a plain pre-norm decoder of ``shape`` (:func:`matched_shape`)."""
    from litgpt.config import Config as GPTConfig

    return GPTConfig(
        name="attnres-audit", block_size=block_size, vocab_size=shape["vocab_size"],
        padded_vocab_size=shape["vocab_size"], n_layer=shape["n_layer"], n_embd=shape["n_embd"],
        n_head=shape["n_head"], n_query_groups=shape["n_head"], head_size=HEAD_SIZE, rotary_percentage=1.0,
        parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
        mlp_class_name="LLaMAMLP", intermediate_size=shape["intermediate_size"], rope_base=10000,
    )


# ----------------------------------------------------------------------------- the models


class AttnResGPT(nn.Module):
    """litgpt's ``GPT`` with its residual stream replaced by an ``attnres`` residual path: sublayer
    ``2l`` is block ``l``'s attention (after ``norm_1``), ``2l + 1`` its MLP (after ``norm_2``)::

        state = residual.begin(wte(idx))
        for i, (norm, f) in sublayers:  h = residual.input(state, i); residual.output(state, i, f(norm(h)))
        logits = lm_head(ln_f(residual.readout(state)))

    Where the residual path leaves its last merge to the norm (a ``DepthInput``: CUDA with the fused
    kernel), the norm runs through it with the litgpt norm's weight and epsilon (the same RMSNorm)."""

    def __init__(self, gpt: nn.Module, mode: str, num_blocks: int = 8, fuse_norm: bool = True) -> None:
        super().__init__()
        from attnres.residual import make_residual

        self.gpt = gpt
        c = gpt.config
        self.residual = make_residual(mode, c.n_embd, 2 * c.n_layer, num_blocks, fuse_norm=fuse_norm)

    @staticmethod
    def _norm(norm: nn.Module, h: Any) -> Tensor:
        from attnres.residual import DepthInput

        return h.normalized(norm.weight, norm.eps) if isinstance(h, DepthInput) else norm(h)

    def forward(self, idx: Tensor, capture: list[Tensor] | None = None) -> Tensor:
        """Logits ``[B, T, V]`` of ``idx [B, T]``; ``capture``: append every sublayer's input ``h_i``, then
        the read-out (what the final norm reads)."""
        from attnres.residual import DepthInput

        gpt, T = self.gpt, idx.shape[1]
        cos, sin = gpt.cos[:T].unsqueeze(0), gpt.sin[:T].unsqueeze(0)
        state = self.residual.begin(gpt.transformer.wte(idx))
        for layer, block in enumerate(gpt.transformer.h):
            sublayers = ((block.norm_1, lambda x, b=block: b.attn(x, cos, sin, None)),
                         (block.norm_2, block.mlp))
            for j, (norm, fn) in enumerate(sublayers):
                i = 2 * layer + j
                h = self.residual.input(state, i)
                if capture is not None:
                    capture.append((h.tensor() if isinstance(h, DepthInput) else h).detach())
                self.residual.output(state, i, fn(self._norm(norm, h)))
        out = self.residual.readout(state)
        if capture is not None:
            capture.append(out.detach())
        return gpt.lm_head(gpt.transformer.ln_f(out))


def build_reference(shape: dict[str, int], block_size: int, residual: str = "plain", num_blocks: int = 8,
                    fuse_norm: bool = True, init: str = "litgpt", init_std: float = 0.02) -> nn.Module:
    """The reference GPT of ``shape``, wrapped in :class:`AttnResGPT` unless ``plain``. ``init``:

    * ``litgpt``: litgpt's own pre-training init (GPT-NeoX / TinyLlama,
      ``litgpt.pretrain.initialize_weights``): Normal(0, sqrt(2 / (5 d))) for the embedding and every
      projection, Normal(0, 1 / (sqrt(d) L)) for the two projections of each block that write into the
      residual stream (attention ``proj``, MLP ``proj``);
    * ``gpt2``: GPT-2's init on the same modules, Normal(0, ``init_std`` = 0.02) everywhere and
      ``init_std / sqrt(2 L)`` for those residual writers: the project decoder's default until the audit
      found it cost the standard residual (an ablation; the committed runs tagged ``pinit`` ran it under
      its old name ``--init project``)."""
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights

    from attnres.model.moe import output_init_std

    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {', '.join(INITS)}")
    gpt = GPT(litgpt_config(shape, block_size))
    if init == "litgpt":
        initialize_weights(SimpleNamespace(strategy=None), gpt, shape["n_layer"], shape["n_embd"])
    else:
        with torch.no_grad():
            for module in gpt.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=init_std)
            for block in gpt.transformer.h:
                for proj in (block.attn.proj, block.mlp.proj):
                    nn.init.normal_(proj.weight, std=output_init_std(init_std, shape["n_layer"]))
    return gpt if residual == "plain" else AttnResGPT(gpt, residual, num_blocks, fuse_norm)


def default_run_id(model: str, arch: str, residual: str, num_blocks: int, seed: int,
                   tag: str | None = None) -> str:
    """``<model>-<arch>-<mode>[<blocks>]-seed<seed>[-<tag>]`` (``s-reference-block8-seed0-pk``); the
    project's ``plain`` is its standard residual."""
    mode = "standard" if arch == "project" and residual == "plain" else residual
    blocks = str(num_blocks) if mode == "block" else ""
    return f"{model}-{arch}-{mode}{blocks}-seed{seed}" + (f"-{tag}" if tag else "")


def config_overrides(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (values parsed as YAML) for ``Config.replace``; a pair without ``=`` or a field
    Config lacks is a ValueError naming it."""
    import dataclasses

    from attnres.model import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE")
        if key not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with a Config field "
                             f"(e.g. init_std=0.04); {key!r} is not one")
        out[key] = yaml.safe_load(value)
    return out


class ProjectLM(nn.Module):
    """The project's decoder behind the same ``forward(idx) -> logits`` (``--arch project``)."""

    def __init__(self, config) -> None:
        super().__init__()
        from attnres.model import Decoder

        self.model = Decoder(config)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx).logits


def active_params(model: nn.Module) -> int:
    """Every parameter but the input embedding(s): the project's definition of active parameters
    (for the project's MoE decoder: ``Decoder.num_parameters(active=True)``)."""
    if isinstance(model, ProjectLM):
        return model.model.num_parameters(active=True)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeds)


# ----------------------------------------------------------------------------- optimisation


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Weight decay on matrices; none on vectors (norms, biases, pseudo-queries) nor, unless
    ``decay_embeddings``, the embeddings (the study's rule, lightning_modules.module.param_groups)."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or (id(p) in embeds and not decay_embeddings)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                             fused=device.type == "cuda")


def train_step(model: nn.Module, batch: dict[str, Tensor], opt: torch.optim.Optimizer, lr: float,
               clip: float, autocast: torch.dtype | None) -> float:
    """One optimizer step at learning rate ``lr`` on ``batch``; returns the loss (before the step)."""
    for group in opt.param_groups:
        group["lr"] = lr
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if isinstance(model, ProjectLM):
        model.model.update_router_bias()
    return float(loss.detach())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, limit: int, autocast: torch.dtype | None
) -> float:
    """Mean over at most ``limit`` validation batches of the batch's mean token loss (Lightning's
    ``val/loss`` for batches of equal size)."""
    model.eval()
    losses = []
    for b, batch in enumerate(loader):
        if b >= limit:
            break
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def stream_rms(model: nn.Module, batch: Tensor, autocast: torch.dtype | None) -> list[float]:
    """The hidden-state growth the study's dynamics table shows for its runs (``final_stats.hidden_rms``):
    the RMS of each sublayer's input ``h_i`` and, last, of what the final norm reads, on ``batch [B, T]``
    (the study takes the first 8 validation windows), in eval mode. litgpt's plain GPT: the inputs of
    each block's ``norm_1`` / ``norm_2`` and of ``ln_f`` (its residual stream, read by hooks); with an
    ``attnres`` residual path: :meth:`AttnResGPT.forward`'s capture; the project's decoder: its own
    ``return_stats``."""
    model = getattr(model, "_orig_mod", model)  # a compiled model's own module, run eagerly here
    was_training = model.training
    model.eval()
    captured: list[Tensor] = []
    hooks = []
    try:
        with torch.autocast(batch.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            if isinstance(model, ProjectLM):
                return model.model(batch, return_stats=True).stats["hidden_rms"].float().tolist()
            if isinstance(model, AttnResGPT):
                model(batch, capture=captured)
            else:
                t = model.transformer
                norms = [n for b in t.h for n in (b.norm_1, b.norm_2)] + [t.ln_f]
                hooks = [n.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
                         for n in norms]
                model(batch)
        return [float(h.float().pow(2).mean().sqrt()) for h in captured]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


# ----------------------------------------------------------------------------- the run


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The study's settings (base.yaml, sweeps.yaml, the model file's lr) with the CLI's overrides."""
    base = yaml.safe_load(BASE.read_text())
    plan = yaml.safe_load(SWEEPS.read_text())
    data = {k: v for k, v in base["data"].items()}
    for k in ("corpus", "shards_dir", "tokenizer", "seq_len", "batch_size", "num_workers", "files"):
        v = getattr(args, f"data_{k}")
        if v is not None:
            data[k] = v
    if args.data_batch_size is not None:
        data["val_batch_size"] = data["batch_size"]
    data["seed"] = args.seed  # the runner's --data.seed = the seed
    model_lr = yaml.safe_load((MODELS / f"{args.model}.yaml").read_text())["model"]["lr"]
    tokens_per_step = data["batch_size"] * data["seq_len"]
    tokens = args.tokens or plan["steps"] * plan["batch_size"] * plan["seq_len"]
    m, t = base["model"], base["trainer"]
    return {
        "data": data, "steps": max(1, tokens // tokens_per_step), "tokens_per_step": tokens_per_step,
        "lr": args.lr or model_lr, "weight_decay": m["weight_decay"], "betas": (0.9, 0.95),
        "warmup_steps": m["warmup_steps"] if args.warmup_steps is None else args.warmup_steps,
        "min_lr_ratio": m["min_lr_ratio"], "clip": t["gradient_clip_val"],
        "val_every": args.val_every or t["val_check_interval"],
        "limit_val_batches": args.limit_val_batches or t["limit_val_batches"],
        "log_every": t["log_every_n_steps"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_modules.data import TextDataModule

    s = study_settings(args)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(args.seed)  # the runner's --seed_everything = the seed
    dm = TextDataModule(**s["data"])
    dm.setup("fit")
    pc = project_config(args.model, dm.vocab_size)  # standard: what the reference is matched to
    if args.layers is not None or args.dim is not None:  # a smaller shape (CPU checks)
        pc = pc.replace(num_layers=args.layers or pc.num_layers, dim=args.dim or pc.dim)
    shape = matched_shape(pc)
    overrides = config_overrides(args.set)
    if args.arch == "project":
        mode = "standard" if args.residual == "plain" else args.residual
        pc = pc.replace(max_seq_len=s["data"]["seq_len"], residual=mode, num_blocks=args.num_blocks,
                        **overrides)
        model = ProjectLM(pc)
        from lightning_modules.warmup import prepare_kda_autotune

        prepare_kda_autotune(device)  # as training does, on CUDA with fla: no minutes of fla autotuning
    else:
        model = build_reference(shape, s["data"]["seq_len"], args.residual, args.num_blocks, init=args.init)
    model.to(device)
    if args.compile:
        model = torch.compile(model)
    run_id = args.run_id or default_run_id(args.model, args.arch, args.residual, args.num_blocks, args.seed,
                                           args.tag)
    total = sum(p.numel() for p in model.parameters())
    cuda = device.type == "cuda"
    print(f"[audit] {run_id}: {args.arch} model, residual {args.residual}, active {active_params(model):,} "
          f"(project standard {shape['project_active']:,}), total {total:,}; shape {shape}", flush=True)
    print(f"[audit] {s['steps']} steps x {s['tokens_per_step']:,} tokens, lr {s['lr']}, warmup "
          f"{s['warmup_steps']}, cosine to {s['min_lr_ratio']}, wd {s['weight_decay']}, clip {s['clip']}, "
          f"val every {s['val_every']} ({s['limit_val_batches']} batches), data {s['data']}", flush=True)
    opt = make_optimizer(model, s["lr"], s["weight_decay"], s["betas"], device)
    val_curve: list[list[float]] = []
    train_curve: list[list[float]] = []
    progress = {"step": 0, "t0": time.perf_counter()}
    out = Path(args.output) if args.output else RESULTS / f"{run_id}.json"

    def save(status: str, hidden_rms: list[float] | None = None) -> dict[str, Any]:
        """The run's JSON as it stands, written atomically (a run killed while writing leaves the last
        whole one): after every validation with status ``partial`` (a run killed outright, or stuck, keeps
        its curve so far; the analysis reads complete runs only), at the end ``complete`` or ``cut``."""
        step, wall = progress["step"], time.perf_counter() - progress["t0"]
        result = {
            "kind": "baseline-audit", "run_id": run_id, "status": status, "arch": args.arch,
            "model": args.model, "residual": args.residual, "num_blocks": args.num_blocks, "seed": args.seed,
            "shape": shape, "params": {"active": active_params(model), "total": total},
            "settings": {**s, "precision": args.precision, "compile": args.compile,
                         "config_overrides": overrides,
                         "init": args.init if args.arch == "reference" else "project",
                         "init_std": pc.weight_init_std if args.arch == "project" else None},
            "steps": step, "tokens": step * s["tokens_per_step"],
            "epochs": step * s["data"]["batch_size"] / len(dm.train_set),
            "val_curve": val_curve, "train_curve": train_curve, "final_val_loss": val_curve[-1][2],
            "hidden_rms": hidden_rms,
            "wall_s": wall, "tokens_per_s": step * s["tokens_per_step"] / wall,
            "device": {"name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "litgpt": _version("litgpt"),
                       "peak_memory_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None},
            "argv": sys.argv,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        return result

    status = "complete"
    try:
        train(model, dm, opt, s, device, autocast, progress, val_curve, train_curve,
              on_validation=lambda: save("partial"))
    except KeyboardInterrupt:  # SIGINT (the device scripts' timeout): keep what was validated
        status = "cut"
    step, wall = progress["step"], time.perf_counter() - progress["t0"]
    if not val_curve:
        print(f"[audit] {run_id}: cut at step {step}, before the first validation: no JSON", flush=True)
        return {"run_id": run_id, "status": status, "val_curve": []}
    hidden_rms = None
    if status == "complete":  # the study's dynamics: the first 8 validation windows, final weights
        hidden_rms = stream_rms(model, next(iter(dm.val_dataloader()))["input_ids"][:8].to(device), autocast)
    result = save(status, hidden_rms)
    what = "final val" if status == "complete" else f"CUT at step {step}/{s['steps']}; last val"
    print(f"[audit] {run_id}: {what} {result['final_val_loss']:.4f} in {wall:.0f} s -> {out}", flush=True)
    return result


def train(model: nn.Module, dm: Any, opt: torch.optim.Optimizer, s: dict[str, Any], device: torch.device,
          autocast: torch.dtype | None, progress: dict[str, Any], val_curve: list, train_curve: list,
          on_validation: Any = None) -> None:
    """The training loop of :func:`run`: ``s["steps"]`` steps over ``dm``'s training windows (reshuffled
    per epoch like Lightning's sampler), the LR schedule, validation every ``s["val_every"]`` steps and
    at the end (``on_validation()`` after each but the last). Appends to the curves and counts
    ``progress["step"]`` as it goes, so a run interrupted (KeyboardInterrupt) keeps everything up to its
    last step."""
    val_loader, train_loader = dm.val_dataloader(), dm.train_dataloader()
    epoch = 0
    while progress["step"] < s["steps"]:
        dm.train_sampler.set_epoch(epoch)  # Lightning's per-epoch shuffle: seed + epoch
        for batch in train_loader:
            step = progress["step"]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = s["lr"] * lr_multiplier(step, s["warmup_steps"], s["steps"], s["min_lr_ratio"])
            loss = train_step(model, batch, opt, lr, s["clip"], autocast)
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss {loss}")
            progress["step"] = step = step + 1
            if step % s["log_every"] == 0 or step == 1:
                train_curve.append([step, loss])
            if step % s["val_every"] == 0 or step == s["steps"]:
                val = evaluate(model, val_loader, device, s["limit_val_batches"], autocast)
                val_curve.append([step, step * s["tokens_per_step"], val])
                rate = step * s["tokens_per_step"] / (time.perf_counter() - progress["t0"])
                print(f"[audit] step {step}/{s['steps']}: train {loss:.4f} val {val:.4f} "
                      f"({rate:,.0f} tokens/s)", flush=True)
                if on_validation is not None and step < s["steps"]:  # the last one: the caller saves it
                    on_validation()
            if step >= s["steps"]:
                return
        epoch += 1


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def describe(vocab_size: int = 8192) -> str:
    """The matched shapes of every study model, as a Markdown table (no litgpt needed)."""
    rows = ["| size | layers x dim | heads | SwiGLU width | project active (standard) | reference active | "
            "ratio | project total | reference total |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in sorted(MODELS.glob("*.yaml")):
        sh = matched_shape(project_config(path.stem, vocab_size))
        rows.append(f"| {path.stem} | {sh['n_layer']} x {sh['n_embd']} | {sh['n_head']} | "
                    f"{sh['intermediate_size']} | {sh['project_active']:,} | {sh['reference_active']:,} | "
                    f"{sh['ratio']:.4f} | {sh['project_total']:,} | {sh['reference_total']:,} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/study_plan.md, 'Baseline audit'.")
    p.add_argument("--model", default="s", help="study size (configs/study/model/<model>.yaml): s, m, l, ...")
    p.add_argument("--arch", choices=("reference", "project"), default="reference",
                   help="litgpt's GPT (reference) or the project's decoder, through this same loop")
    p.add_argument("--residual", choices=RESIDUALS, default="plain",
                   help="plain: litgpt's own forward; standard/block/full: through attnres' residual path")
    p.add_argument("--num_blocks", type=int, default=8, help="Block AttnRes blocks (default 8)")
    p.add_argument("--init", choices=INITS, default="litgpt",
                   help="--arch reference: litgpt's own init (default) or GPT-2's (Normal(0, 0.02), "
                        "residual writers 0.02 / sqrt(2 L); the project's old default): an ablation")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: sweeps.yaml's 16.8M)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the model file's)")
    p.add_argument("--warmup_steps", type=int, default=None, help="default: base.yaml's")
    p.add_argument("--val_every", type=int, default=None, help="default: base.yaml's val_check_interval")
    p.add_argument("--limit_val_batches", type=int, default=None, help="default: base.yaml's")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--precision", choices=("bf16", "32"), default="bf16", help="bf16 autocast or fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the study runs eager)")
    p.add_argument("--output", default=None,
                   help="JSON path (default benchmarks/results/audit/<run id>.json)")
    p.add_argument("--run_id", default=None,
                   help="default <model>-<arch>-<residual>[<blocks>]-seed<seed>[-<tag>] "
                        "(s-reference-block8-seed0)")
    p.add_argument("--tag", default=None, help="appended to the default run id (pk: the package corpus)")
    p.add_argument("--describe", action="store_true", help="print the matched shapes and exit")
    g = p.add_argument_group("data overrides (default: configs/study/base.yaml's data section)")
    g.add_argument("--data.corpus", dest="data_corpus", default=None)
    g.add_argument("--data.files", dest="data_files", nargs="+", default=None)
    g.add_argument("--data.shards_dir", dest="data_shards_dir", default=None)
    g.add_argument("--data.tokenizer", dest="data_tokenizer", default=None)
    g.add_argument("--data.seq_len", dest="data_seq_len", type=int, default=None)
    g.add_argument("--data.batch_size", dest="data_batch_size", type=int, default=None)
    g.add_argument("--data.num_workers", dest="data_num_workers", type=int, default=None)
    g = p.add_argument_group("a smaller shape than the study's (CPU checks; no longer matched to a size)")
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--dim", type=int, default=None)
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="--arch project: Config fields to change after the shape is matched, for ablations "
                        "(YAML values: --set init_std=0.04 moe=false)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parser().parse_args(argv)
    if args.describe:
        print(describe())
        return None
    return run(args)


if __name__ == "__main__":
    main()
