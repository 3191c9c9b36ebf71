"""The compiled depth-attention ops (``attnres._C``, CPU kernels) against ``attnres/reference.py``.

Forward and backward parity over a sampled grid of (sources n, queries S, tokens N, d) and every
dtype, gradcheck in fp64 through the ``attnres.ops`` wrappers, ``torch.library.opcheck`` on all six
ops, ``torch.compile`` (fullgraph, forward and backward), argument errors and NaN propagation.
Expected values come from ``reference.py`` evaluated in fp32 on the very inputs the kernel saw
(16-bit inputs upcast exactly), so they are far more accurate than a 16-bit kernel output.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnres import ops, reference

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# relative tolerances of a kernel output against the fp32 reference; atol is relative to the largest
# magnitude of the expected tensor (outputs are sums, so near-zero entries carry absolute error only)
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-4, atol=1e-5),  # the reference computes in fp32 even for fp64 inputs
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=5e-4),
}

needs_kernels = pytest.mark.skipif(
    ops.backend("cpu") != "compiled", reason="attnres._C CPU kernels not built"
)


def test_cpu_kernels_are_registered():
    assert ops.extension_error is None, ops.extension_error
    assert ops.backend("cpu") == "compiled"
    for name in (
        "phase1",
        "phase1_backward",
        "phase2",
        "phase2_backward",
        "depth_attn",
        "depth_attn_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attnres::{name}", "CPU"), name


# ----------------------------------------------------------------------------- helpers


def _sources(
    n: int, lead: tuple[int, ...], d: int, dtype: torch.dtype, gen: torch.Generator
) -> list[torch.Tensor]:
    # sources of different scales, as the summaries of a real network are
    return [(torch.randn(*lead, d, generator=gen) * (0.5 + i % 4)).to(dtype) for i in range(n)]


def _queries(S: int, d: int, gen: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    # logits q . v / rms(v) are O(scale): softmax weights spread over several sources
    return torch.randn(S, d, generator=gen) * (scale / math.sqrt(d))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(),
        expected,
        rtol=tol["rtol"],
        atol=tol["atol"] * max(scale, 1e-3),
        msg=lambda m: f"{what}: {m}",
    )


def _f32(ts):
    return [t.detach().float().requires_grad_() for t in ts]


# ----------------------------------------------------------------------------- forward + backward parity

# (n sources, S queries, lead shape, d): a sample of 1..33 x 1..16 x N in {1, ...} x d in {1, 7, 64, 2304}
GRID = [
    (1, 1, (1,), 1),
    (2, 3, (5,), 7),
    (33, 16, (3,), 64),
    (5, 1, (1,), 2304),
    (9, 8, (2, 3), 2304),
    (4, 4, (32,), 64),
    (3, 5, (17,), 7),
    (33, 1, (4,), 7),
    (8, 16, (6,), 1),
    (1, 7, (13,), 64),
    (17, 2, (2, 5), 64),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,S,lead,d", GRID, ids=lambda v: str(v))
def test_phase1_matches_reference_forward_and_backward(n, S, lead, d, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + S * 10 + d)
    sources = _sources(n, lead, d, dtype, gen)
    queries = _queries(S, d, gen)
    grad_outs = [torch.randn(*lead, d, generator=gen).to(dtype) for _ in range(S)]
    grad_lse = torch.randn(S, *lead, generator=gen)

    src = [s.clone().requires_grad_() for s in sources]
    q = queries.clone().requires_grad_()
    outs, lse = ops.phase1(src, q, EPS)
    assert len(outs) == S and all(o.shape == (*lead, d) and o.dtype == dtype for o in outs)
    assert lse.shape == (S, *lead) and lse.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    torch.autograd.backward([*outs, lse], [*grad_outs, grad_lse.to(lse.dtype)])

    ref_src, ref_q = _f32(sources), _f32([queries])[0]
    ref_out, ref_lse = reference.phase1(ref_src, ref_q, EPS)
    torch.autograd.backward([ref_out, ref_lse], [torch.stack(grad_outs).float(), grad_lse])

    for k in range(S):
        _assert_close(outs[k], ref_out[k], dtype, f"out[{k}]")
    _assert_close(lse, ref_lse, torch.float32, "lse")
    for i in range(n):
        _assert_close(src[i].grad, ref_src[i].grad, dtype, f"grad sources[{i}]")
    _assert_close(q.grad, ref_q.grad, torch.float32 if dtype == torch.float64 else dtype, "grad queries")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,lead,d", [(1, (1,), 1), (3, (7,), 7), (33, (2, 2), 64), (6, (3,), 2304)], ids=str)
def test_depth_attention_matches_reference_forward_and_backward(n, lead, d, dtype):
    gen = torch.Generator().manual_seed(n + d)
    sources = _sources(n, lead, d, dtype, gen)
    query = _queries(1, d, gen)[0]
    grad_out = torch.randn(*lead, d, generator=gen).to(dtype)
    grad_lse = torch.randn(*lead, generator=gen)

    src = [s.clone().requires_grad_() for s in sources]
    q = query.clone().requires_grad_()
    out, lse = ops.depth_attention(src, q, EPS)
    torch.autograd.backward([out, lse], [grad_out, grad_lse.to(lse.dtype)])

    ref_src, ref_q = _f32(sources), _f32([query])[0]
    ref_out, ref_lse = reference.depth_attention(ref_src, ref_q, EPS)
    torch.autograd.backward([ref_out, ref_lse], [grad_out.float(), grad_lse])

    _assert_close(out, ref_out, dtype, "out")
    _assert_close(lse, ref_lse, torch.float32, "lse")
    for i in range(n):
        _assert_close(src[i].grad, ref_src[i].grad, dtype, f"grad sources[{i}]")
    _assert_close(q.grad, ref_q.grad, torch.float32 if dtype == torch.float64 else dtype, "grad query")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,d", [((1,), 1), ((5,), 7), ((2, 3), 64), ((4,), 2304)], ids=str)
def test_phase2_matches_reference_forward_and_backward(lead, d, dtype):
    gen = torch.Generator().manual_seed(d)
    o, p = _sources(2, lead, d, dtype, gen)
    m = torch.randn(*lead, generator=gen)
    query = _queries(1, d, gen)[0]
    grad_h = torch.randn(*lead, d, generator=gen).to(dtype)
    grad_lse = torch.randn(*lead, generator=gen)

    inputs = [o.clone().requires_grad_(), m.clone().requires_grad_(), p.clone().requires_grad_()]
    q = query.clone().requires_grad_()
    h, lse = ops.phase2(*inputs, q, EPS)
    assert h.shape == p.shape and h.dtype == dtype and lse.shape == lead
    torch.autograd.backward([h, lse], [grad_h, grad_lse.to(lse.dtype)])

    ref_inputs, ref_q = _f32([o, m, p]), _f32([query])[0]
    ref_h, ref_lse = reference.phase2(*ref_inputs, ref_q, EPS)
    torch.autograd.backward([ref_h, ref_lse], [grad_h.float(), grad_lse])

    _assert_close(h, ref_h, dtype, "h")
    _assert_close(lse, ref_lse, torch.float32, "lse")
    _assert_close(inputs[0].grad, ref_inputs[0].grad, dtype, "grad partial_out")
    if dtype in (torch.float32, torch.float64):
        for name, x, r in zip(("partial_lse", "partial"), inputs[1:], ref_inputs[1:]):
            _assert_close(x.grad, r.grad, torch.float32, f"grad {name}")
        _assert_close(q.grad, ref_q.grad, torch.float32, "grad query")
        return
    # The backward reads the saved output h, rounded to the 16-bit dtype, instead of o (the schema's
    # choice: o need not be kept). Its rounding enters dz through g_h = dh . h, whose error is bounded
    # by eps/2 * sum_j |dh_j h_j|; the gradients that depend on dz get that bound (with a factor 2) as
    # an elementwise atol, on top of the 16-bit rtol.
    err_dz = torch.finfo(dtype).eps * (grad_h.double().abs() * h.double().abs()).sum(-1)  # [*lead]
    rp = reference.rms(p, EPS).double()
    z = (p.double() @ query.double()) / rp
    bounds = {
        "partial_lse": err_dz,
        "partial": (err_dz / rp).unsqueeze(-1) * query.double().abs()
        + (err_dz * z.abs() / (d * rp**2)).unsqueeze(-1) * p.double().abs(),
        "query": ((err_dz / rp).unsqueeze(-1) * p.double().abs()).reshape(-1, d).sum(0),
    }
    grads = {
        "partial_lse": (inputs[1].grad, ref_inputs[1].grad),
        "partial": (inputs[2].grad, ref_inputs[2].grad),
    }
    grads["query"] = (q.grad, ref_q.grad)
    for name, (got, want) in grads.items():
        tol = TOL[dtype]
        want = want.double()
        allowed = bounds[name] + tol["rtol"] * want.abs() + tol["atol"] * want.abs().max()
        excess = (got.double() - want).abs() - allowed
        assert (excess <= 0).all(), f"grad {name}: error exceeds the bound by up to {excess.max().item():.3g}"


@pytest.mark.parametrize("lead,d", [((5,), 7), ((2, 3), 64)], ids=str)
def test_phase2_norm_off_cuda_is_phase2_then_the_fp32_rmsnorm(lead, d):
    """Without its CUDA kernel ``ops.phase2_norm`` composes phase 2 and the decoder's norm: against
    ``reference.phase2_norm`` in fp64 (forward and every gradient, through the lse too)."""
    gen = torch.Generator().manual_seed(d + 1)
    o, p = _sources(2, lead, d, torch.float32, gen)
    m = torch.randn(*lead, generator=gen)
    q, w = _queries(1, d, gen)[0], 1 + 0.3 * torch.randn(d, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (o, m, p, q, w)]
    y, lse = ops.phase2_norm(*leaves, EPS, 1e-5)
    leaves64 = [t.double().requires_grad_() for t in (o, m, p, q, w)]
    ref_y, ref_lse = reference.phase2_norm(*leaves64, EPS, 1e-5)
    assert y.dtype == torch.float32 and y.shape == p.shape and lse.shape == lead
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    g_y, g_lse = torch.randn(*lead, d, generator=gen), torch.randn(*lead, generator=gen)
    got = torch.autograd.grad([y, lse], leaves, [g_y, g_lse])
    want = torch.autograd.grad([ref_y, ref_lse], leaves64, [g_y.double(), g_lse.double()])
    for name, a, b in zip("omwqg", got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    with pytest.raises(ValueError, match=r"weight must have shape \[d\]"):
        ops.phase2_norm(o, m, p, q, torch.ones(d + 1))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_phase1_then_phase2_equals_direct_softmax_over_all_sources(dtype):
    # the paper's two-phase computation: result is the direct softmax over the n + 1 sources
    gen = torch.Generator().manual_seed(7)
    sources = _sources(5, (3, 4), 64, dtype, gen)
    partial = _sources(1, (3, 4), 64, dtype, gen)[0]
    queries = _queries(3, 64, gen)
    outs, lse = ops.phase1(sources, queries, EPS)
    for k in range(3):
        h, lse_all = ops.phase2(outs[k], lse[k], partial, queries[k], EPS)
        direct, direct_lse = ops.depth_attention(sources + [partial], queries[k], EPS)
        _assert_close(h, direct.float(), dtype, f"h[{k}]")
        _assert_close(lse_all, direct_lse, torch.float32, f"lse[{k}]")


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_source_is_returned_bit_exactly(dtype):
    # one source: weight exactly 1, so the 16-bit load and store round trip must be exact,
    # subnormals and the largest finite values included
    info = torch.finfo(dtype)
    row = torch.tensor(
        [0.0, -0.0, 1.0, -3.5, info.tiny, -info.tiny, info.max / 4, info.eps, 1e-3], dtype=torch.float64
    )
    if dtype in (torch.float16, torch.bfloat16):
        row = torch.cat([row, torch.tensor([info.tiny / 4, -info.tiny / 8])])  # subnormals
    src = row.to(dtype).expand(3, -1).contiguous()
    outs, _ = ops.phase1([src], torch.randn(2, src.shape[-1]), EPS)
    for o in outs:
        assert torch.equal(o, src)


# ----------------------------------------------------------------------------- layouts and sizes


@needs_kernels
def test_non_contiguous_inputs_match_contiguous():
    gen = torch.Generator().manual_seed(3)
    d, N = 7, 6
    base = [torch.randn(d, 2 * N, generator=gen) for _ in range(4)]
    src_nc = [b.t()[::2] for b in base]  # [N, d], transposed and strided
    q_nc = torch.randn(d, 3, generator=gen).t()
    assert not src_nc[0].is_contiguous() and not q_nc.is_contiguous()
    src_c = [s.contiguous() for s in src_nc]
    for fn in (
        lambda s, q: ops.phase1(s, q, EPS),
        lambda s, q: ops.depth_attention(s, q[0], EPS),
        lambda s, q: ops.phase2(s[0], s[1][:, 0], s[2], q[1], EPS),
    ):
        got, want = fn(src_nc, q_nc), fn(src_c, q_nc.contiguous())
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # backward with non-contiguous gradients
    src = [s.clone().requires_grad_() for s in src_c]
    outs, lse = ops.phase1(src, q_nc, EPS)
    grads = [torch.randn(d, N, generator=gen).t() for _ in outs]
    torch.autograd.backward(outs, grads)
    ref = _f32(src_c)
    ref_out, _ = reference.phase1(ref, q_nc, EPS)
    torch.autograd.backward([ref_out], [torch.stack(grads)])
    for a, b in zip(src, ref):
        _assert_close(a.grad, b.grad, torch.float32, "grad")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_tokens(dtype):
    sources = [torch.zeros(0, 7, dtype=dtype, requires_grad=True) for _ in range(3)]
    q = torch.randn(2, 7, requires_grad=True)
    outs, lse = ops.phase1(sources, q, EPS)
    assert [o.shape for o in outs] == [(0, 7), (0, 7)] and lse.shape == (2, 0)
    h, lse2 = ops.phase2(outs[0], lse[0], sources[1], q[1], EPS)
    out, lse3 = ops.depth_attention(sources, q[0], EPS)
    assert h.shape == (0, 7) and out.shape == (0, 7) and lse2.shape == lse3.shape == (0,)
    (sum(o.sum() for o in outs) + h.sum() + out.sum() + lse.sum()).backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))
    assert all(s.grad.shape == (0, 7) for s in sources)


@needs_kernels
def test_result_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(11)
    sources = _sources(6, (64,), 64, torch.float32, gen)
    q = _queries(3, 64, gen)
    prev = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            src = [s.clone().requires_grad_() for s in sources]
            outs, lse = ops.phase1(src, q, EPS)
            (sum(o.square().sum() for o in outs) + lse.sum()).backward()
            results.append((outs, lse, [s.grad for s in src]))
    finally:
        torch.set_num_threads(prev)
    (o1, l1, g1), (o2, l2, g2) = results
    # every token is computed by one thread alone: bit-identical
    for a, b in zip(o1 + [l1] + g1, o2 + [l2] + g2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradcheck and opcheck


@needs_kernels
def test_gradcheck_phase1_fp64():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3)]
    q = torch.randn(2, 5, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(*args):
        outs, lse = ops.phase1(list(args[:-1]), args[-1], EPS)
        return (*outs, lse)

    assert torch.autograd.gradcheck(fn, (*src, q))


@needs_kernels
def test_gradcheck_phase2_fp64():
    gen = torch.Generator().manual_seed(1)
    o, p = (torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    m = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    q = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.phase2(*a, EPS), (o, m, p, q))


@needs_kernels
def test_gradcheck_depth_attention_fp64():
    gen = torch.Generator().manual_seed(2)
    src = [torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(4)]
    q = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.depth_attention(list(a[:-1]), a[-1], EPS), (*src, q))


def _opcheck_cases() -> list[tuple[str, torch.dtype, tuple]]:
    gen = torch.Generator().manual_seed(5)
    N, d, n, S = 6, 7, 3, 2
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def r(*shape, dt=dtype, grad=False):
            return torch.randn(*shape, generator=gen).to(dt).requires_grad_(grad)

        src = [r(N, d) for _ in range(n)]
        q = r(S, d, dt=torch.float32)
        _, lse = torch.ops.attnres.phase1(src, q, EPS)
        h, lse2 = torch.ops.attnres.phase2(src[0], lse[0], src[1], q[0], EPS)
        grad_src = [s.clone().requires_grad_() for s in src]
        cases += [
            ("phase1", dtype, (grad_src, q.clone().requires_grad_(), EPS)),
            ("phase1_backward", dtype, ([r(N, d) for _ in range(S)], r(S, N, dt=acc), src, q, lse, EPS)),
            (
                "phase2",
                dtype,
                (
                    r(N, d, grad=True),
                    r(N, dt=acc, grad=True),
                    r(N, d, grad=True),
                    r(d, dt=torch.float32, grad=True),
                    EPS,
                ),
            ),
            ("phase2_backward", dtype, (r(N, d), r(N, dt=acc), h, lse[0], lse2, src[1], q[0], EPS)),
            ("depth_attn", dtype, (grad_src, q[0].clone().requires_grad_(), EPS)),
            ("depth_attn_backward", dtype, (r(N, d), r(N, dt=acc), src, q[0], lse[0], EPS)),
        ]
    return cases


@needs_kernels
@pytest.mark.parametrize("case", range(18))
def test_opcheck(case):
    name, dtype, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.attnres, name).default, args)


@needs_kernels
def test_ops_under_torch_compile_fullgraph_forward_and_backward():
    def block(sources, queries, partial, q_out):
        outs, lse = ops.phase1(sources, queries, EPS)
        h, _ = ops.phase2(outs[1], lse[1], partial, queries[1], EPS)
        out, lse_out = ops.depth_attention(sources + [partial], q_out, EPS)
        return (outs[0] * h).sum() + out.square().sum() + lse_out.sum()

    gen = torch.Generator().manual_seed(9)
    leaves = (
        _sources(3, (2, 3), 8, torch.float32, gen)
        + [_queries(2, 8, gen)]
        + _sources(1, (2, 3), 8, torch.float32, gen)
    )
    leaves.append(_queries(1, 8, gen)[0])

    def run(fn):
        xs = [t.clone().requires_grad_() for t in leaves]
        loss = fn(xs[:3], xs[3], xs[4], xs[5])
        loss.backward()
        return loss, [x.grad for x in xs]

    compiled = torch.compile(block, fullgraph=True)
    (loss_c, grads_c), (loss_e, grads_e) = run(compiled), run(block)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- errors and NaN


def _bad_calls():
    d = 8
    s = [torch.randn(4, d) for _ in range(3)]
    q = torch.randn(2, d)
    return [
        (
            lambda: ops.phase1([torch.randn(d)], q),
            ValueError,
            r"sources\[0\] must have shape \[N, d\] or \[B, T, d\]",
        ),
        (
            lambda: ops.phase1([s[0], torch.randn(4, d + 1)], q),
            ValueError,
            r"sources\[1\] has shape \(4, 9\) but sources\[0\] has \(4, 8\)",
        ),
        (
            lambda: ops.phase1([s[0], s[1].double()], q),
            TypeError,
            r"sources\[1\] has dtype torch.float64 but sources\[0\] has torch.float32",
        ),
        (
            lambda: ops.phase1([s[0].int()], q),
            TypeError,
            r"sources\[0\] has dtype torch.int32; expected one of",
        ),
        (
            lambda: ops.phase1([s[0], s[1].to("meta")], q),
            ValueError,
            r"sources\[1\] is on meta but sources\[0\] is on cpu",
        ),
        (lambda: ops.phase1(s, q.to("meta")), ValueError, r"queries is on meta but the sources are on cpu"),
        (
            lambda: ops.phase1([], q),
            ValueError,
            r"sources is empty: depth attention needs at least one source \[\.\.\., d\]",
        ),
        (lambda: ops.phase1(s[0], q), TypeError, r"sources must be a list of tensors \[\.\.\., d\]"),
        (
            lambda: ops.phase1(s, torch.randn(0, d)),
            ValueError,
            r"queries must have shape \[S, d\] with S >= 1 and d = 8",
        ),
        (
            lambda: ops.phase1(s, torch.randn(2, d + 1)),
            ValueError,
            r"queries must have shape \[S, d\] .* got \[2, 9\]",
        ),
        (lambda: ops.phase1(s, torch.randn(d)), ValueError, r"queries must have shape \[S, d\]"),
        (lambda: ops.depth_attention(s, q), ValueError, r"query must have shape \[d\] = \[8\], got \[2, 8\]"),
        (lambda: ops.depth_attention(s, q[0].int()), TypeError, r"query must be a floating-point tensor"),
        (
            lambda: ops.phase2(s[0], torch.randn(5), s[1], q[0]),
            ValueError,
            r"partial_lse must have shape \[\.\.\.\] .* = \[4\], got \[5\]",
        ),
        (
            lambda: ops.phase2(s[0].half(), torch.randn(4), s[1], q[0]),
            TypeError,
            r"partial_out has dtype torch.float16 but the sources have torch.float32",
        ),
        (
            lambda: ops.phase2(s[0][:, :4], torch.randn(4), s[1], q[0]),
            ValueError,
            r"partial_out must have shape \[\.\.\., d\] like partial = \[4, 8\]",
        ),
        (
            lambda: ops.phase2(s[0], torch.randn(4), s[1], q[0].to("meta")),
            ValueError,
            r"query is on meta but the sources are on cpu",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_with_the_expected_shape_in_the_message(case):
    call, exc, pattern = _bad_calls()[case]
    with pytest.raises(exc, match=pattern):
        call()


@needs_kernels
def test_kernels_check_arguments_when_called_directly():
    s = [torch.randn(4, 8) for _ in range(2)]
    q = torch.randn(2, 8)
    outs, lse = torch.ops.attnres.phase1(s, q, EPS)
    with pytest.raises(
        RuntimeError, match=r"grad_outs has 1 tensors; expected one \[N, d\] per query \(S = 2\)"
    ):
        torch.ops.attnres.phase1_backward(outs[:1], lse, s, q, lse, EPS)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[S, N\] = \[2, 4\], got \[4\]"):
        torch.ops.attnres.phase1_backward(outs, lse, s, q, lse[0], EPS)
    with pytest.raises(RuntimeError, match=r"sources is empty; expected at least one source \[N, d\]"):
        torch.ops.attnres.depth_attn([], q[0], EPS)
    with pytest.raises(
        RuntimeError, match=r"queries must have shape \[S, d\] with S >= 1 and d = 8, got \[0, 8\]"
    ):
        torch.ops.attnres.phase1(s, q[:0], EPS)
    with pytest.raises(RuntimeError, match=r"sources\[0\] must have shape \[N, d\], got \[2, 2, 8\]"):
        torch.ops.attnres.phase1([torch.randn(2, 2, 8)], q, EPS)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_to_its_token_only(dtype):
    sources = [torch.randn(5, 16).to(dtype) for _ in range(4)]
    sources[2][3, 7] = float("nan")
    q = torch.randn(2, 16)
    outs, lse = ops.phase1(sources, q, EPS)
    for o in outs:
        assert torch.isnan(o[3]).all() and torch.isfinite(o[[0, 1, 2, 4]]).all()
    assert torch.isnan(lse[:, 3]).all() and torch.isfinite(lse[:, [0, 1, 2, 4]]).all()
    out, _ = ops.depth_attention(sources, q[0], EPS)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[[0, 1, 2, 4]]).all()
    m = lse[0].clone()
    m[1] = float("nan")
    h, lse2 = ops.phase2(outs[0], m, sources[0], q[1], EPS)
    assert torch.isnan(h[[1, 3]]).all() and torch.isnan(lse2[[1, 3]]).all()
    assert torch.isfinite(h[[0, 2, 4]]).all()
    src = [s.clone().requires_grad_() for s in sources]
    outs, lse = ops.phase1(src, q, EPS)
    (outs[0].sum() + lse.sum()).backward()
    assert torch.isnan(src[0].grad[3]).all() and torch.isfinite(src[0].grad[[0, 1, 2, 4]]).all()


def test_reference_accumulates_in_fp32_under_autocast():
    # reference.py: "Softmax and sums run in fp32; log-sum-exps in fp32". Autocast recasts the einsums'
    # bmm to bf16, so the reference (the fallback where no kernel is built) must leave autocast.
    torch.manual_seed(0)
    sources = [torch.randn(4, 5, 64) for _ in range(3)]
    queries = torch.randn(2, 64)
    out, lse = reference.phase1(sources, queries, 1e-6)
    h, lse2 = reference.phase2(out[0], lse[0], sources[0], queries[1], 1e-6)
    w = reference.depth_weights(sources, queries[0], 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_out, a_lse = reference.phase1(sources, queries, 1e-6)
        a_h, a_lse2 = reference.phase2(a_out[0], a_lse[0], sources[0], queries[1], 1e-6)
        a_w = reference.depth_weights(sources, queries[0], 1e-6)
    assert a_lse.dtype == torch.float32 and a_lse2.dtype == torch.float32
    for x, y in ((out, a_out), (lse, a_lse), (h, a_h), (lse2, a_lse2), (w, a_w)):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
