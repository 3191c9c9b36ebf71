"""The eager MoE's Triton gathers (attnres.model.moe_kernels) against their fp64 definitions, on a CPU
under Triton's interpreter (skipped where triton is not installed, as on the CPU CI machine; the GPU test
tests/gpu/test_kda_fla_gpu.py::test_moe_dispatch_and_combine_on_cuda_in_bf16_equal_the_definition runs
them compiled)."""

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import torch
    from attnres.model import moe_kernels as mk

    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        for R, n, k, d in [(40, 7, 1, 1000), (64, 9, 6, 3000), (50, 5, 8, 64), (3, 4, 2, 17)]:
            src = torch.randn(2 * R, d).to(dt)[::2]  # rows with a stride of 2 d
            idx = torch.randint(0, R, (n, k))
            w = torch.rand(n, k)  # fp32: rounded to src's dtype first
            vec = torch.randn(n, d).to(dt)
            rows = src[idx].double()
            refs = {
                "weighted": (rows * w.to(dt).double().unsqueeze(-1)).sum(1),
                "plain": rows.sum(1),
                "dots": torch.einsum("tsd,td->ts", rows, vec.double()),
            }
            outs = {"weighted": mk.gather_sum(src, idx, w), "plain": mk.gather_sum(src, idx),
                    "dots": mk.row_dots(src, idx, vec)}
            for name, out in outs.items():
                ref = refs[name]
                assert out.dtype == dt and out.shape == ref.shape, (name, out.dtype, out.shape)
                # fp32 sums rounded once to the output's dtype
                tol = (1e-6 if dt == torch.float32 else 8e-3) * ref.abs().max().item()
                err = (out.double() - ref).abs().max().item()
                assert err <= tol, (name, dt, (R, n, k, d), err, tol)
    empty = mk.gather_sum(torch.randn(3, 8), torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0, 8)
    print("ok")
""")


def test_gather_sum_and_row_dots_equal_their_definitions_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_the_kernels_check_their_arguments():
    import torch

    from attnres.model import moe_kernels as mk

    with pytest.raises(ValueError, match=r"src must be \[R, d\] and index \[N, k\] integers"):
        mk.gather_sum(torch.randn(3, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="src must be"):
        mk.row_dots(torch.randn(3, 4, 1), torch.zeros(2, 2, dtype=torch.long), torch.randn(2, 4))
