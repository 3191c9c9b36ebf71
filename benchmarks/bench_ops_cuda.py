"""The CUDA op benchmark as a script (the code is :mod:`attnres.bench.ops_cuda`; ``attnres bench ops
--device cuda`` runs it too). ``python benchmarks/bench_ops_cuda.py --help``."""

from attnres.bench.ops_cuda import *  # noqa: F403 - ``import bench_ops_cuda as b; b.run(...)`` keeps working
from attnres.bench.ops_cuda import main

if __name__ == "__main__":
    main()
