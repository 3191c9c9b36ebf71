"""The ``attnres`` command (the console script, and ``python -m lightning_modules``).

``attnres fit|validate|test|predict -c configs/...yaml`` run the LightningCLI (:mod:`lightning_modules.cli`);
the other subcommands (``info``, ``bench``, ...) are typed functions exposed through jsonargparse, so every
one has ``--help``. The library's own ``python -m attnres`` serves only the commands that need no
Lightning (``info``).
"""

from __future__ import annotations

import sys

import torch

from attnres.__main__ import info
from attnres.errors import UsageError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def bench_ops(
    device: str = "cpu",
    quick: bool = False,
    compile_reference: bool = False,
    out: str | None = None,
    threads: int | None = None,
    repeats: int | None = None,
    compare: str | None = None,
) -> None:
    """Benchmark the depth-attention ops against their references and baselines.

    Compiled kernels vs the eager PyTorch reference (CPU), or vs ``torch.compile``, flash-attn-res and
    fla (CUDA). Times phase1, phase2 and the direct op, forward and backward, and prints a table (ms,
    GB/s of the minimum traffic, % of the copy bandwidth measured in the same run, speed-ups); writes JSON to
    benchmarks/results/ops_<device type>.json. On CUDA: bf16 over the issue's grid (``quick``: the
    N = 16384 sweep), then the baselines on the ``compare`` shapes (flash-attn-res and fla are used where
    installed).

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
    from attnres.bench.ops import parse_shapes, run_ops_benchmark

    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda: no CUDA device here (torch.cuda.is_available()"
                " is False); run it on a GPU machine, or use --device cpu"
            )
        if device != "cuda":
            torch.cuda.set_device(torch.device(device))
        run_ops_benchmark("cuda", quick=quick, out=out, compare=parse_shapes(compare))
        return
    if compare is not None:
        raise UsageError(
            "--compare is for --device cuda (the CPU baseline is --compile_reference true)"
        )
    run_ops_benchmark(device, quick=quick, out=out, compile_reference=compile_reference, threads=threads,
                      repeats=repeats)


# `attnres --help` lists these, one line each (the Lightning ones are parsed by LightningCLI)
DESCRIPTIONS = {
    "fit": "Train a model (LightningCLI: compose configs with -c, override any key with --section.key).",
    "validate": "Evaluate a checkpoint on the validation split (--ckpt_path).",
    "test": "Evaluate a checkpoint on the test split (--ckpt_path; data.test_fraction > 0).",
    "predict": "Score each validation (or test) sequence of a checkpoint: per-sequence NLL (--ckpt_path).",
    "generate": "Continue a prompt with a trained checkpoint (cached decoding, sampling or greedy).",
    "plot": "Write the depth-attention, magnitude and gradient-norm plots of a checkpoint.",
    "export": "Write a checkpoint's weights as safetensors plus config.json, for Decoder.from_pretrained.",
    "compare": "Train standard, Block and Full AttnRes on the same budget and tabulate the results.",
    "tokenizer": "Train a byte-level BPE tokenizer on a corpus (attnres tokenizer train).",
    "prepare": "Pre-tokenise a corpus into memmap shards for --data.corpus shards.",
    "new": "Start a new project from this repository's cookiecutter template, with checked answers.",
    "info": "Print versions, the attnres._C build, the op backend per device and the GPUs.",
    "bench": "Benchmark the ops (bench ops), training steps (bench e2e) or parallel scaling (bench scaling).",
}
NESTED = ("tokenizer", "bench")


def command_name(argv: list[str]) -> str:
    """The subcommand words of ``argv`` (``fit``, ``tokenizer train``), for error messages."""
    words = [a for a in argv[:2] if not a.startswith("-")]
    if not words or words[0] not in DESCRIPTIONS:
        return "attnres"
    n = 2 if words[0] in NESTED and len(words) > 1 else 1
    return "attnres " + " ".join(words[:n])


def main(argv: list[str] | None = None) -> None:
    """Entry of ``attnres``: runs the subcommand; a user error (:mod:`attnres.errors`) becomes one line
    ``attnres <subcommand>: <message>`` on stderr and exit status 2 (``ATTNRES_DEBUG=1``: the traceback)."""
    from attnres.errors import EXIT_USAGE, debug_mode, is_user_error, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(argv)
    except Exception as exc:
        if debug_mode() or not is_user_error(exc):
            raise
        sys.stdout.flush()
        sys.stderr.write(f"{command_name(argv)}: {one_line(str(exc))}\n")
        sys.exit(EXIT_USAGE)


def _dispatch(argv: list[str]) -> None:
    from attnres.errors import ParseError

    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lightning_modules.cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(top_level_help())
        if not argv:
            raise ParseError("give a subcommand (above); e.g. attnres fit -c configs/default.yaml")
        return
    if argv[0].startswith("-") or argv[0] not in DESCRIPTIONS:
        from attnres.errors import did_you_mean

        raise ParseError(
            f"unknown subcommand {argv[0]!r}{did_you_mean(argv[0], DESCRIPTIONS)}; "
            f"valid: {', '.join(DESCRIPTIONS)} (attnres --help)"
        )
    from jsonargparse import ArgumentParser, auto_cli

    from attnres.bench.scaling import bench_scaling
    from attnres.errors import RaiseOnParseError
    from lightning_modules import commands
    from lightning_modules.bench_template import bench_e2e
    from lightning_modules.compare import compare

    class Parser(RaiseOnParseError, ArgumentParser):
        pass

    if argv[:1] == ["compare"]:  # `attnres compare -c a.yaml -c b.yaml`, as for `attnres fit`
        argv = [("--configs+" if a == "-c" else a) for a in argv]
    auto_cli(
        {
            "info": info,
            "bench": {
                "_help": DESCRIPTIONS["bench"], "ops": bench_ops, "e2e": bench_e2e, "scaling": bench_scaling
            },
            "generate": commands.generate,
            "new": commands.new,
            "plot": commands.plot,
            "export": commands.export,
            "compare": compare,
            "tokenizer": {"_help": DESCRIPTIONS["tokenizer"], "train": commands.tokenizer_train},
            "prepare": commands.prepare,
        },
        args=argv,
        as_positional=False,
        parser_class=Parser,
        prog="attnres",
    )


def top_level_help() -> str:
    """``attnres --help``: every subcommand with its one-line description."""
    width = max(map(len, DESCRIPTIONS))
    rows = [f"  {name:<{width}}  {text}" for name, text in DESCRIPTIONS.items()]
    return "\n".join(
        [
            "usage: attnres <subcommand> [options]   (attnres <subcommand> --help for its options)",
            "",
            "Attention Residuals language models: training, evaluation, generation, data and benchmarks.",
            "",
            "subcommands:",
            *rows,
            "",
            "A bad argument or input stops with one line on stderr and exit status 2;",
            "ATTNRES_DEBUG=1 shows the full traceback instead.",
        ]
    )


if __name__ == "__main__":
    main()
