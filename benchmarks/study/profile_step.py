"""Training-step time of the study's models on one GPU, without Lightning (issue 10's sizing).

    python -m benchmarks.study.profile_step                          # every variant below
    python -m benchmarks.study.profile_step --only "s standard" "m"  # labels containing any of these
    python -m benchmarks.study.profile_step --profile "s block8 mla-only" --json out.json

One step = the study's batch (32 x 1024 tokens of random ids) through ``LanguageModel`` under bf16
autocast, backward, ``clip_grad_norm_`` 1.0, fused AdamW, the router-bias update: what
``configs/study/base.yaml`` makes Lightning do, minus its hooks. Prints ms/step and tokens/s per
variant (3 warm-up steps, then the mean of ``--steps``, timed by the benchmarks' one timer:
:class:`attnres.bench.timing.Timer`, CUDA events), and with ``--profile LABEL`` the
``torch.profiler`` tables (self CUDA time, self CPU time) of that variant. The first step of a model
shape pays fla's Triton autotuning (minutes on a fresh machine; ``TRITON_CACHE_DIR`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from attnres.bench.timing import Timer
from attnres.model import Config
from lightning_modules.module import LanguageModel

ROOT = Path(__file__).resolve().parents[2]
TORCH_KDA = {"kda_backend": "torch"}
# label -> (model file, model.config fields over the model file's)
VARIANTS: dict[str, tuple[str, dict]] = {
    "s standard kda-torch": ("s", dict(residual="standard", **TORCH_KDA)),
    "s block8 kda-torch": ("s", dict(residual="block", num_blocks=8, **TORCH_KDA)),
    "s standard kda-torch dense": ("s", dict(residual="standard", moe=False, **TORCH_KDA)),
    "s standard mla-only": ("s", dict(residual="standard", token_mixer="mla")),
    "s block8 mla-only": ("s", dict(residual="block", num_blocks=8, token_mixer="mla")),
    "s full mla-only": ("s", dict(residual="full", token_mixer="mla")),
    "s standard": ("s", dict(residual="standard")),
    "s block8": ("s", dict(residual="block", num_blocks=8)),
    "s full": ("s", dict(residual="full")),
    "m standard": ("m", dict(residual="standard")),
    "m block8": ("m", dict(residual="block", num_blocks=8)),
    "l standard": ("l", dict(residual="standard")),
}


def model_kwargs(name: str, over: dict) -> dict:
    """``LanguageModel`` arguments of the model file's ``model:`` section, with ``over`` on top of its
    ``config`` fields (vocabulary 8192: the study's BPE tokenizer)."""
    m = yaml.safe_load((ROOT / f"configs/study/model/{name}.yaml").read_text())["model"]
    return {**m, "config": Config(**{**m["config"], "vocab_size": 8192, **over})}


def build(name: str, over: dict) -> tuple[LanguageModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    lm = LanguageModel(**model_kwargs(name, over)).cuda()
    return lm, torch.optim.AdamW(lm.param_groups(), lr=1e-3, fused=True)


def step(lm: LanguageModel, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lm(ids[:, :-1], ids[:, 1:])
        loss = out.loss + out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    lm.model.update_router_bias()


def time_steps(lm: LanguageModel, opt: torch.optim.Optimizer, ids: torch.Tensor, n: int) -> float:
    """Milliseconds per step: the mean of ``n`` back-to-back steps after 3 warm-up steps."""
    (ms,) = Timer("cuda").samples_ms(lambda: step(lm, opt, ids), warmup=3, repeats=1, calls=n)
    return ms


def profile(lm: LanguageModel, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(lm, opt, ids)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", nargs="*", default=None, help="run the variants whose label contains any of these"
    )
    ap.add_argument("--profile", default=None, choices=sorted(VARIANTS), help="profile this variant")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--json", default=None, help="write {label: {ms_per_step, tokens_per_s}} here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA device (the study's settings are bf16 autocast on a GPU)")
    ids = torch.randint(0, 8192, (args.batch_size, 1025), device="cuda")
    tokens = args.batch_size * 1024
    results: dict[str, dict] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for label, (name, over) in VARIANTS.items():
        if args.only is not None and not any(a in label for a in args.only):
            continue
        t0 = time.perf_counter()
        lm, opt = build(name, over)
        ms = time_steps(lm, opt, ids, args.steps)
        results[label] = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3}
        first = time.perf_counter() - t0
        rate = tokens / ms * 1e3
        print(f"{label:28s} {ms:8.1f} ms/step {rate:12,.0f} tok/s  (incl. first steps {first:.0f} s)")
        if label == args.profile:
            profile(lm, opt, ids)
        del lm, opt
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
