"""The ``attnres`` command.

``attnres fit|validate|test|predict -c configs/...yaml`` run the LightningCLI; the other
subcommands (``info``, ``bench``, ...) are typed functions exposed through jsonargparse, so every
one has ``--help``.
"""

from __future__ import annotations

import platform
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def info(model: str | None = None) -> None:
    """Print versions, whether attnres._C is loaded, the op backend per device and the CUDA arch.

    Args:
        model: a model preset (e.g. tiny, small, medium, kimi-linear-48b-a3b): print its total and
            active (per-token) parameter counts and its layer plan instead.
    """
    if model is not None:
        from attnres.model import PRESETS, describe

        if model not in PRESETS:
            raise SystemExit(f"unknown preset {model!r}; valid presets: {', '.join(PRESETS)}")
        print(describe(model))
        return
    import json
    from pathlib import Path

    import torch

    import attnres
    from attnres import ops

    rows = [
        ("attnres", attnres.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("attnres._C", "loaded" if ops.extension_error is None else f"not built ({ops.extension_error})"),
        ("backend cpu", ops.backend("cpu")),
    ]
    build_file = Path(attnres.__file__).with_name("_build_info.json")
    if build_file.exists():
        build = json.loads(build_file.read_text())
        arch = build["cuda_arch_list"] if build["cuda"] else "no (CPU-only build)"
        rows.append(("_C built with CUDA", arch))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"))
        rows.append(("backend cuda", ops.backend("cuda")))
        rows.append(("built arch list", " ".join(torch.cuda.get_arch_list())))
    else:
        rows.append(("cuda", "not available"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def bench_ops(
    device: str = "cpu",
    quick: bool = False,
    compile_reference: bool = False,
    out: str | None = None,
    threads: int | None = None,
    repeats: int | None = None,
    compare: str | None = None,
) -> None:
    """Benchmark the depth-attention ops: compiled kernels vs the eager PyTorch reference (CPU), or vs
    ``torch.compile``, flash-attn-res and fla (CUDA).

    Times phase1, phase2 and the direct op, forward and backward, and prints a table (ms, GB/s of the
    minimum traffic, % of the copy bandwidth measured in the same run, speed-ups); writes JSON to
    benchmarks/results/ops_<device type>.json. On CUDA (:mod:`attnres.bench.ops_cuda`): bf16 over the
    issue's grid (``quick``: the N = 16384 sweep), then the baselines on the ``compare`` shapes
    (flash-attn-res and fla are used where installed).

    Args:
        device: ``cpu`` or ``cuda`` (``cuda:1``...).
        quick: a small grid (a minute on a laptop; on CUDA the N = 16384 sweep) instead of the full one.
        compile_reference: CPU: also time ``torch.compile`` of the reference (slow to compile). On
            CUDA the baselines always include it.
        out: JSON path (default ``benchmarks/results/ops_<device type>.json``).
        threads: ``torch.set_num_threads`` before timing (default: leave as is).
        repeats: timed repeats per case, the median is reported (default 3 quick, 5 full).
        compare: CUDA: the shapes timed against the baselines, ``N,d,n,S`` separated by ``;``
            (default ``16384,2048,9,8;16384,2304,9,8``; ``none``: no baselines). Each compiles and
            autotunes the baselines: minutes per shape.
    """
    import torch

    if torch.device(device).type == "cuda":
        from attnres.bench.ops_cuda import DEFAULT_JSON, parse_shapes, run

        if not torch.cuda.is_available():
            raise SystemExit(
                "attnres bench ops --device cuda: no CUDA device here (torch.cuda.is_available()"
                " is False); run it on a GPU machine, or use --device cpu"
            )
        if device != "cuda":
            torch.cuda.set_device(torch.device(device))
        run(quick=quick, json_path=out or DEFAULT_JSON, compare_cases=parse_shapes(compare))
        return
    if compare is not None:
        raise SystemExit(
            "attnres bench ops: --compare is for --device cuda (the CPU baseline is --compile_reference true)"
        )
    from attnres.bench.ops import run_ops_benchmark

    run_ops_benchmark(
        device=device,
        quick=quick,
        out=out,
        compile_reference=compile_reference,
        threads=threads,
        repeats=repeats,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lightning_modules.cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    from jsonargparse import CLI

    from attnres.bench.e2e import bench_e2e
    from attnres.bench.scaling import bench_scaling
    from lightning_modules import commands

    if argv[:1] == ["compare"]:  # `attnres compare -c a.yaml -c b.yaml`, as for `attnres fit`
        argv = [("--configs+" if a == "-c" else a) for a in argv]
    CLI(
        {
            "info": info,
            "bench": {"ops": bench_ops, "e2e": bench_e2e, "scaling": bench_scaling},
            "generate": commands.generate,
            "plot": commands.plot,
            "export": commands.export,
            "compare": commands.compare,
            "tokenizer": {"train": commands.tokenizer_train},
            "prepare": commands.prepare,
        },
        args=argv,
        as_positional=False,
    )


if __name__ == "__main__":
    main()
