"""Run each CUDA op a few times on one shape, for Nsight Compute (ncu) to profile.

    ncu --clock-control none --kernel-name regex:'p1_|p2_' --launch-skip 2 --launch-count 4 \
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,... \
        python benchmarks/ncu_ops_cuda.py --N 16384 --d 2048 --n 9 --S 8
"""

from __future__ import annotations

import argparse

import torch

from attnres import ops  # noqa: F401  (loads attnres._C)

EPS = 1e-6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--n", type=int, default=9)
    p.add_argument("--S", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    P = torch.ops.attnres
    src = [torch.randn(a.N, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(a.n)]
    q = torch.randn(a.S, a.d, device="cuda") / a.d**0.5
    g = [torch.randn(a.N, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(a.S)]
    gl = torch.randn(a.S, a.N, device="cuda")
    part = torch.randn(a.N, a.d, device="cuda", dtype=torch.bfloat16)
    for _ in range(a.reps):
        outs, lse = P.phase1(src, q, EPS)
        P.phase1_backward(g, gl, src, q, lse, EPS)
        h, lse2 = P.phase2(outs[0], lse[0], part, q[0], EPS)
        P.phase2_backward(g[0], gl[0], h, lse[0], lse2, part, q[0], EPS)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
