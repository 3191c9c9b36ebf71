"""The ``attnres`` command.

``attnres fit|validate|test|predict -c configs/...yaml`` run the LightningCLI; the other
subcommands (``info``, ``bench``, ...) are typed functions exposed through jsonargparse, so every
one has ``--help``.
"""

from __future__ import annotations

import platform
import sys

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def info() -> None:
    """Print versions, whether attnres._C is loaded, the op backend per device and the CUDA arch."""
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
) -> None:
    """Benchmark the depth-attention ops: compiled kernels vs the eager PyTorch reference.

    Times phase1, phase2 and the direct op, forward and forward+backward, and prints a table (ms, GB/s
    of the minimum traffic, % of the measured copy bandwidth, speed-up); writes JSON to
    benchmarks/results/ops_<device>.json.

    Args:
        device: where to run (``cpu``; other device types need a grid in attnres.bench.ops.GRIDS).
        quick: a small grid (a minute on a laptop) instead of the full one.
        compile_reference: also time ``torch.compile`` of the reference (slow to compile).
        out: JSON path (default ``benchmarks/results/ops_<device type>.json``).
        threads: ``torch.set_num_threads`` before timing (default: leave as is).
        repeats: timed repeats per case, the median is reported (default 3 quick, 5 full).
    """
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
    from lightning_modules import commands

    if argv[:1] == ["compare"]:  # `attnres compare -c a.yaml -c b.yaml`, as for `attnres fit`
        argv = [("--configs+" if a == "-c" else a) for a in argv]
    CLI(
        {
            "info": info,
            "bench": {"ops": bench_ops, "e2e": bench_e2e},
            "generate": commands.generate,
            "plot": commands.plot,
            "compare": commands.compare,
            "tokenizer": {"train": commands.tokenizer_train},
            "prepare": commands.prepare,
        },
        args=argv,
        as_positional=False,
    )


if __name__ == "__main__":
    main()
