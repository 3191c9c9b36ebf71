"""Benchmarks of the library (torch only): ``ops`` (the depth-attention kernels on CPU or CUDA), ``e2e``
(the residual path in the whole decoder: train and serve rows), ``scaling`` (FSDP / PP x FSDP layouts),
with ``timing`` (the one timer), ``shapes``, ``peers`` (fla, flash-attn-res) and ``report`` (tables,
ratios, JSON merge). The Lightning template's rows are ``lightning_modules.bench_template``'s."""

from attnres.bench.ops import run_ops_benchmark

__all__ = ["run_ops_benchmark"]
