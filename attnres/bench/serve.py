"""The inference rows of ``attnres bench e2e``: prefill and decode of one model (eval, no grad), eager and
replayed from a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnres.bench.rows import Run, build_model, guarded, random_tokens, summary
from attnres.bench.shapes import Shape
from attnres.bench.timing import cleanup, peak_memory, reset_peak_memory
from attnres.model import Decoder, DecoderCache

__all__ = ["capture_graph", "fork_cache", "serve_rows"]


def fork_cache(cache: DecoderCache) -> DecoderCache:
    """A cache that reads the same tensors but whose updates do not touch ``cache``: a decode step run
    on a fork can be repeated (and replayed from a CUDA graph) on the same context."""
    return DecoderCache(layers={k: dict(v) for k, v in cache.layers.items()}, seq_len=cache.seq_len,
                        residual_queries=cache.residual_queries)


def capture_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
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


def serve_rows(run: Run, shape: Shape, mode: str, impl: str, kinds: Sequence[str], graphs: bool) -> None:
    """Prefill and decode rows of one model (eval, no grad): eager, and replayed from a CUDA graph."""
    holder: dict[str, Any] = {}
    base = {"shape": shape.name, "mode": mode, "impl": impl}

    def model() -> Decoder:
        if "model" not in holder:
            holder["model"] = build_model(shape, mode, impl, run).eval()
        return holder["model"]

    try:
        with torch.no_grad():
            if "prefill" in kinds:
                for b in shape.prefill_batches:
                    def prefill(graph: bool, b: int = b) -> dict[str, Any]:
                        m = model()
                        prompt = random_tokens(shape, b, shape.prefill_len, run.device)
                        call = lambda: m(prompt, cache=DecoderCache())  # noqa: B023 (used at once)
                        fn = capture_graph(call, run.device) if graph else call
                        reset_peak_memory(run.device)
                        ms = run.timer.samples_ms(fn, run.warmup, run.repeat)
                        row = summary(ms)
                        row.update(tokens_per_s=b * shape.prefill_len / (row["ms"] * 1e-3),
                                   peak_mem_bytes=peak_memory(run.device), prompt_len=shape.prefill_len)
                        return row

                    # in a CUDA graph the Python overhead per op is gone: the device-side cost
                    for graph in (False, True) if graphs else (False,):
                        guarded(run, {"kind": "prefill", **base, "variant": "graph" if graph else "eager",
                                       "batch": b}, lambda b=b, graph=graph: prefill(graph, b))
            if "decode" in kinds:
                for b in shape.decode_batches:
                    ctx: dict[str, Any] = {}

                    def prepare(b: int = b, ctx: dict[str, Any] = ctx) -> None:
                        m = model()
                        cache = DecoderCache()
                        m(random_tokens(shape, b, shape.decode_context, run.device), cache=cache)
                        tok = random_tokens(shape, b, 1, run.device, seed=3)
                        ctx["step"] = lambda: m(tok, cache=fork_cache(cache)).logits

                    def decode(graph: bool, b: int = b, ctx: dict[str, Any] = ctx) -> dict[str, Any]:
                        if "step" not in ctx:
                            prepare(b, ctx)
                        fn = capture_graph(ctx["step"], run.device) if graph else ctx["step"]
                        reset_peak_memory(run.device)
                        many = run.device.type == "cuda"  # a decode step is short: more repeats on a GPU
                        ms = run.timer.samples_ms(fn, run.warmup + 2 * many, run.repeat * (4 if many else 1))
                        row = summary(ms)
                        row.update(tokens_per_s=b / (row["ms"] * 1e-3), context=shape.decode_context,
                                   peak_mem_bytes=peak_memory(run.device))
                        return row

                    dbase = {"kind": "decode", **base, "batch": b}
                    for graph in (False, True) if graphs else (False,):
                        guarded(run, {**dbase, "variant": "graph" if graph else "eager"},
                                 lambda b=b, ctx=ctx, graph=graph: decode(graph, b, ctx))
                    ctx.clear()
    finally:
        holder.clear()
        cleanup(run.device)
