"""KDA: the chunkwise form equals the token-by-token recurrence (forward and backward), and both equal
fla's pure-PyTorch reference; the layer decodes token by token exactly as it runs a whole sequence."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from attnres.model.kda import KimiDeltaAttention, ShortConv, kda_chunked, kda_recurrent

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(B=2, T=37, H=3, K=8, V=8, decay=3.0, dtype=torch.float32, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gate = -torch.rand(B, T, H, K, generator=g, dtype=dtype) * decay
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if state else None
    return q, k, v, gate, beta, s0


@pytest.mark.parametrize("T,chunk", [(1, 16), (16, 16), (37, 16), (50, 32), (70, 64)])
def test_chunked_equals_recurrent_forward(T, chunk):
    q, k, v, g, beta, s0 = _inputs(T=T)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)


def test_chunked_is_stable_under_strong_decay():
    # log decays down to -60 per step: any factorisation e^{G_t} e^{-G_s} would overflow
    q, k, v, g, beta, s0 = _inputs(T=40, decay=60.0)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=16)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)


def test_chunked_equals_recurrent_backward():
    leaves = [t.requires_grad_() for t in _inputs(T=45, dtype=torch.float64)]
    grads = []
    for fn in (kda_recurrent, kda_chunked):
        o, s = fn(*leaves[:5], initial_state=leaves[5])
        w_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
        w_s = torch.randn(s.shape, generator=torch.Generator().manual_seed(2), dtype=s.dtype)
        grads.append(torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), leaves))
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), *grads):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-7, msg=f"gradient of {name}")


def test_chunked_gradcheck():
    inputs = [t.requires_grad_() for t in _inputs(B=1, T=7, H=1, K=3, V=2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda *a: kda_chunked(*a[:5], initial_state=a[5], chunk_size=16), inputs, eps=1e-6, atol=1e-6
    )


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None,
    reason="fla-core (and triton) not installed: pip install fla-core==0.6.0 triton einops",
)
def test_matches_fla_naive_recurrent_forward_and_backward():
    from fla.ops.kda.naive import naive_recurrent_kda

    leaves = [t.requires_grad_() for t in _inputs(T=33, H=2, K=16, V=8)]
    results = []
    for fn in (
        lambda *a: naive_recurrent_kda(*a[:5], initial_state=a[5], output_final_state=True),
        lambda *a: kda_recurrent(*a[:5], initial_state=a[5]),
        lambda *a: kda_chunked(*a[:5], initial_state=a[5], chunk_size=16),
    ):
        o, s = fn(*leaves)
        grads = torch.autograd.grad(o.square().sum() + s.sum(), leaves)
        results.append((o.detach(), s.detach(), grads))
    ref = results[0]
    for o, s, grads in results[1:]:
        torch.testing.assert_close(o, ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s, ref[1], atol=1e-5, rtol=1e-4)
        for a, b in zip(grads, ref[2]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_short_conv_streaming_equals_full_pass():
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 11, 6)
    full, _ = conv(x)
    state, parts = None, []
    for t in range(11):
        y, state = conv(x[:, t:t + 1], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), full)
    # and it is causal: the output at t ignores inputs after t
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(conv(x2)[0][:, :5], full[:, :5])


def test_layer_cached_decoding_equals_full_sequence():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, chunk_size=16)
    x = torch.randn(2, 29, 32)
    full = layer(x)
    cache: dict = {}
    parts = [layer(x[:, :20], cache)]  # chunked prefill, then token by token (recurrent)
    parts += [layer(x[:, t:t + 1], cache) for t in range(20, 29)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_layer_decay_is_negative_and_gate_shapes():
    torch.manual_seed(0)
    layer = KimiDeltaAttention(dim=32, num_heads=2, head_dim=16)
    g = layer.decay(torch.randn(3, 5, 32))
    assert g.shape == (3, 5, 2, 16) and g.dtype == torch.float32
    assert (g < 0).all()


def test_layer_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, backend="cuda-magic")


@pytest.mark.parametrize("fn", [kda_chunked, kda_recurrent])
def test_recurrence_runs_in_fp32_under_autocast(fn):
    # both implementations document fp32 compute (fp32 state): autocast must not run their matmuls in bf16
    torch.manual_seed(0)
    B, T, H, K = 2, 37, 2, 16
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(B, T, H, K), -torch.rand(B, T, H, K) * 0.5, torch.rand(B, T, H)
    o, S = fn(q, k, v, g, beta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o2, S2 = fn(q, k, v, g, beta)
    torch.testing.assert_close(o2, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S2, S, atol=1e-5, rtol=1e-5)


def test_short_conv_shifted_products_and_compiled_pass_equal_conv1d():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    ref, _ = conv(x)  # eager: conv1d
    torch.testing.assert_close(F.silu(conv._shifted(x)), ref, atol=1e-14, rtol=0)
    # compiled, the shifted products run (Inductor): the values and gradients of conv1d's pass
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (x, conv.weight))
    compiled = torch.compile(conv, fullgraph=True, backend="inductor")
    y, state = compiled(x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, x.detach()[:, -3:].transpose(1, 2))
    for a, b in zip(torch.autograd.grad((y * w).sum(), (x, conv.weight)), g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_short_conv_state_after_a_short_input_keeps_the_earlier_inputs():
    conv = ShortConv(3, 4)
    x = torch.randn(1, 5, 3)
    s2 = conv.next_state(x[:, :2])  # zeros, then x0, x1
    torch.testing.assert_close(s2, torch.cat([torch.zeros(1, 3, 1), x[:, :2].transpose(1, 2)], -1))
    s3 = conv.next_state(x[:, 2:4], s2)  # x0 .. x3: the last three
    torch.testing.assert_close(s3, x[:, 1:4].transpose(1, 2))


def test_short_conv_state_is_a_copy_that_does_not_keep_the_input_alive():
    # the decoding cache holds W - 1 inputs per channel: as a view it would keep the whole prompt's
    # projection output (all T rows, and with joint projections all six projections) alive
    conv = ShortConv(3, 4)
    wide = torch.randn(2, 50, 8)
    state = conv.next_state(wide[..., 2:5])
    torch.testing.assert_close(state, wide[:, -3:, 2:5].transpose(1, 2))
    assert state.is_contiguous() and state.untyped_storage().nbytes() == state.numel() * state.element_size()
