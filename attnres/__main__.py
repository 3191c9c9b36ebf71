"""``python -m attnres``: the library's own command line, the commands that need no Lightning.

``python -m attnres info [--model PRESET]`` prints versions, the ``attnres._C`` build and the op backend
per device (the device scripts and ``make install`` run it to check a build). Everything else (``fit``,
``bench``, ``generate``, ...) drives the Lightning application: the ``attnres`` console script, or
``python -m lightning_modules``. The library imports neither Lightning nor jsonargparse, so the one
option here is parsed with ``argparse``.
"""

from __future__ import annotations

import argparse
import platform
import sys

from attnres.errors import UsageError

APPLICATION = "python -m lightning_modules"  # the same command as the `attnres` console script


def info(model: str | None = None) -> None:
    """Print versions, whether attnres._C is loaded, the op backend per device and the CUDA arch.

    Args:
        model: a model preset (e.g. tiny, small, medium, kimi-linear-48b-a3b): print its total and
            active (per-token) parameter counts and its layer plan instead.
    """
    if model is not None:
        from attnres.model import PRESETS, describe

        if model not in PRESETS:
            from attnres.errors import did_you_mean

            raise UsageError(
                f"--model {model!r}: unknown preset; valid: {', '.join(PRESETS)}"
                + did_you_mean(model, PRESETS)
            )
        print(describe(model))
        return
    import torch

    import attnres
    from attnres import ops
    from attnres._extension import build_info

    build = build_info()
    if ops.extension_error is None:
        built = f"loaded (compiled against torch {build['torch']})" if build else "loaded"
    else:
        built = "not built: the ops run the PyTorch reference (slow); build with `pip install .`"
    rows = [
        ("attnres", attnres.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("attnres._C", built),
        ("backend cpu", ops.backend("cpu")),
    ]
    if build and ops.extension_error is None:
        kernels = f"yes ({build['cuda_arch_list']})" if build["cuda"] else "no (CPU-only build)"
        rows.append(("_C CUDA kernels", kernels))
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


def main(argv: list[str] | None = None) -> None:
    """Entry of ``python -m attnres``: ``info``; any other subcommand is refused with one line naming the
    command that runs it (exit status 2, as every user error of ``attnres``)."""
    from attnres.errors import EXIT_USAGE, debug_mode, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m attnres",
        description="The library's commands (no Lightning). The application's (fit, bench, generate, ...): "
        f"the `attnres` console script or `{APPLICATION}`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="info")
    p = sub.add_parser("info", help=(info.__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="a model preset: its parameter counts and layer plan")
    try:
        if argv and not argv[0].startswith("-") and argv[0] != "info":
            raise UsageError(
                f"{argv[0]!r} is not a library command (python -m attnres serves info only); run "
                f"`attnres {' '.join(argv)}` (the console script) or `{APPLICATION} {' '.join(argv)}`"
            )
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            raise UsageError(f"give a subcommand: info (the application's: attnres --help or {APPLICATION})")
        info(model=args.model)
    except UsageError as exc:
        if debug_mode():
            raise
        sys.stdout.flush()
        name = "attnres info" if argv[:1] == ["info"] else "attnres"
        sys.stderr.write(f"{name}: {one_line(str(exc))}\n")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
