"""Benchmarks: ``attnres.bench.ops`` times the depth-attention ops against the PyTorch reference."""

from attnres.bench.ops import run_ops_benchmark

__all__ = ["run_ops_benchmark"]
