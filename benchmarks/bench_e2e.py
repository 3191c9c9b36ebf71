"""End-to-end benchmark (issue 8): ``python benchmarks/bench_e2e.py --help``.

A thin wrapper of :func:`attnres.bench.e2e.bench_e2e` (the same function that ``attnres bench e2e``
exposes). CPU smoke run: ``python benchmarks/bench_e2e.py --quick true``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jsonargparse import CLI  # noqa: E402

from attnres.bench.e2e import bench_e2e  # noqa: E402

if __name__ == "__main__":
    CLI(bench_e2e, as_positional=False)
