"""Why the compiled KDA model is slow: Dynamo's graph breaks and recompiles, reproduced on a CPU.

On a GPU, fla's Triton KDA call is a graph break inside the decoder's layer loop. This script puts a
``torch._dynamo.graph_break()`` at the same place (the KDA layer's forward) in a small model, compiles
it (backend ``eager``: only Dynamo's tracing matters) and prints what Dynamo did: frames compiled and
skipped, graph breaks, and whether the recompile limit was hit.

    python benchmarks/compile_breaks.py --mode block [--no_break]

Seen (session 10, torch 2.13 CPU; the H100 log of the s/m rows shows the same recompile-limit
warning): the break makes Dynamo skip ``run_layers`` ("graph break in loop": the whole layer loop runs
eagerly) and compile ``run_sublayer`` as its own frame; with Block AttnRes that frame specialises on
the sublayer index (``i % block_size`` decides the residual path's branches), so it recompiles once per
sublayer and stops at ``recompile_limit`` (8). Without the break (``--no_break``, the CPU's PyTorch
KDA) the model compiles without either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import attnres.model.kda as kda  # noqa: E402
from attnres.model import Decoder, get_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="block", choices=["standard", "block", "full"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no_break", action="store_true", help="no simulated break (the CPU KDA as it is)")
    args = ap.parse_args()
    if not args.no_break:
        forward = kda.KimiDeltaAttention.forward

        def broken(self, *a, **k):
            torch._dynamo.graph_break()  # where fla's Triton call breaks the graph on a GPU
            return forward(self, *a, **k)

        kda.KimiDeltaAttention.forward = broken
    cfg = get_config("tiny", residual=args.mode, num_layers=args.layers, num_blocks=4, dim=64,
                     kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16, mla_qk_shared_dim=8,
                     mla_kv_rank=32, expert_dim=32, mlp_dim=128, moe=False)
    model = torch.compile(Decoder(cfg), backend="eager")
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    for _ in range(2):
        out = model(x, labels=x)
        (out.loss + out.aux_loss).backward()
    reasons = {k.split("\n")[0]: v for k, v in counters["unimplemented"].items()}
    skipped = [k for k in counters["unimplemented"] if "frame skipped" in k]
    print(f"mode {args.mode}, {args.layers} layers, simulated fla break: {not args.no_break}")
    print(f"frames: {dict(counters['frames'])}; graphs: {counters['stats'].get('unique_graphs')}")
    print(f"recompile limit hit: {any('recompile limit' in k.lower() for k in reasons)}")
    print(f"layer loop skipped (run eagerly): {any('run_layers' in k for k in skipped)}")
    for reason, n in reasons.items():
        print(f"  {n} x {reason}")


if __name__ == "__main__":
    main()
