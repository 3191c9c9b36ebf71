"""The eager MoE's Triton kernels (attnres.model.moe_kernels: the gathers, the packed SwiGLU) against their
fp64 definitions, on a CPU under Triton's interpreter (triton is in the test extras, so CI runs it; skipped
where triton is missing). On a GPU, compiled: tests/gpu/test_kda_fla_gpu.py's MoE tests."""

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
    # packed_swiglu: [gate | up] -> silu(gate) * up, and the gradient of [gate | up] in one [M, 2h] tensor
    for dt in (torch.float32, torch.bfloat16):
        for M, h in [(37, 48), (5, 384), (3, 7)]:
            gu = (2 * torch.randn(M, 2 * h)).to(dt).requires_grad_()
            dy = torch.randn(M, h).to(dt)
            out = mk.packed_swiglu(gu)
            (dgu,) = torch.autograd.grad(out, gu, dy)
            ref_in = gu.detach().double().requires_grad_()
            g, u = ref_in.chunk(2, dim=1)
            ref = torch.nn.functional.silu(g) * u
            (ref_d,) = torch.autograd.grad(ref, ref_in, dy.double())
            assert out.dtype == dgu.dtype == dt and out.shape == (M, h) and dgu.shape == (M, 2 * h)
            assert dgu.is_contiguous()
            for got, want in ((out, ref), (dgu, ref_d)):
                tol = (2e-6 if dt == torch.float32 else 8e-3) * want.abs().max().item()
                err = (got.double() - want).abs().max().item()
                assert err <= tol, (dt, (M, h), err, tol)
    # the routed experts in eager mode: two grouped GEMMs with the packed SwiGLU between them (forced here;
    # on a GPU it runs wherever triton does), against the per-expert loop, values and every gradient
    from attnres.model import moe
    moe._triton_takes = lambda t: True
    E, d, h = 4, 32, 48
    counts = torch.tensor([5, 0, 9, 2])
    args = [torch.randn(16, d), torch.randn(E, h, d) / d**0.5, torch.randn(E, h, d) / d**0.5,
            torch.randn(E, d, h) / h**0.5]
    args = [a.bfloat16().requires_grad_() for a in args]
    ref_args = [a.detach().float().requires_grad_() for a in args]
    y = moe.grouped_swiglu(args[0], counts, *args[1:], use_grouped_mm=True)
    y_ref = moe.grouped_swiglu(ref_args[0], counts, *ref_args[1:], use_grouped_mm=False)
    g = torch.randn(16, d)
    grads = torch.autograd.grad(y, args, g.bfloat16())
    ref_grads = torch.autograd.grad(y_ref, ref_args, g)
    for got, want in ((y, y_ref), *zip(grads, ref_grads)):
        err = (got.float() - want).abs().max().item()
        assert got.dtype == torch.bfloat16 and err <= 2e-2 * want.abs().max().item(), err
    print("ok")
""")


def test_the_kernels_equal_their_definitions_under_the_interpreter():
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
    with pytest.raises(ValueError, match=r"gu must be \[M, 2h\]"):
        mk.packed_swiglu(torch.randn(3, 5))
