"""joint_linear: several projections of one input as one GEMM, and the layers that use it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnres.model import kda, mla, moe
from attnres.model.projections import joint_linear


def _separate(x, *linears):
    return tuple(lin(x) for lin in linears)


def _assert_equal_to_separate(x, linears, got):
    """``got`` (joint_linear's parts) equal the separate projections, and so do the gradients of x and of
    every parameter."""
    want = _separate(x, *linears)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    params = [x] + [p for lin in linears for p in lin.parameters()]
    g = torch.autograd.grad(sum((p * (i + 1)).square().sum() for i, p in enumerate(got)), params)
    w = torch.autograd.grad(sum((p * (i + 1)).square().sum() for i, p in enumerate(want)), params)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_joint_linear_equals_the_separate_projections_forward_and_backward():
    torch.manual_seed(0)
    linears = [nn.Linear(12, 8, bias=False), nn.Linear(12, 3, bias=True), nn.Linear(12, 5, bias=False)]
    x = torch.randn(2, 7, 12, requires_grad=True)
    got = joint_linear(x, *linears)
    # one GEMM: the parts are column slices of one output
    assert [p.shape for p in got] == [(2, 7, 8), (2, 7, 3), (2, 7, 5)]
    assert len({p.untyped_storage().data_ptr() for p in got}) == 1
    _assert_equal_to_separate(x, linears, got)
    assert joint_linear(x, linears[1])[0].shape == (2, 7, 3)
    with pytest.raises(ValueError, match="at least one"):
        joint_linear(x)


@pytest.mark.parametrize("bias", [False, True])
def test_the_joint_output_rows_are_padded_to_an_aligned_stride(bias):
    # 8 + 3 + 6 = 17 columns: the rows are padded to 32 (ALIGN 16), so Triton kernels reading a part see a
    # row stride divisible by 16 (session 22: KDA's 3336 made fla's short conv 2x slower each way); the
    # padding is dropped, values and gradients are the separate projections'
    from attnres.model.projections import ALIGN

    torch.manual_seed(0)
    linears = [nn.Linear(12, 8, bias=bias), nn.Linear(12, 3, bias=False), nn.Linear(12, 6, bias=bias)]
    x = torch.randn(2, 7, 12, requires_grad=True)
    got = joint_linear(x, *linears)
    assert ALIGN == 16 and len(got) == 3 and [p.shape[-1] for p in got] == [8, 3, 6]
    assert all(p.stride() == (7 * 32, 32, 1) for p in got)
    _assert_equal_to_separate(x, linears, got)


def test_kda_at_medium_width_reads_its_qkv_at_an_aligned_stride():
    # medium's KDA (8 heads x 128): q, k, v, the decay's and the gate's low ranks and beta, 3336 columns,
    # padded to 3344; q, k, v start at multiples of 1024 columns
    layer = kda.KimiDeltaAttention(dim=64, num_heads=8, head_dim=128, chunk_size=64)
    q, k, v, f_a, b, g_a = layer._project(torch.randn(1, 3, 64))
    assert (q.shape[-1], f_a.shape[-1], b.shape[-1], g_a.shape[-1]) == (1024, 128, 8, 128)
    assert q.stride(-2) == 3344 and q.stride(-2) % 16 == 0
    assert [p.storage_offset() for p in (q, k, v, f_a, g_a, b)] == [0, 1024, 2048, 3072, 3200, 3328]


@pytest.mark.parametrize("layer", ["kda", "kda-decode", "mla", "swiglu"])
def test_layers_on_joint_projections_equal_separate_projections(monkeypatch, layer):
    # the KDA, MLA and SwiGLU layers project their input once (joint_linear); with one GEMM per
    # projection instead (the code before), outputs and every gradient agree
    torch.manual_seed(0)
    if layer.startswith("kda"):
        module, where = kda.KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, chunk_size=8), kda
    elif layer == "mla":
        module, where = mla.MultiHeadLatentAttention(32, 4, 8, 4, 8, kv_rank=16), mla
    else:
        module, where = moe.SwiGLU(32, 48, backend="torch"), moe
    x = torch.randn(2, 11, 32)

    def run():
        leaf = x.clone().requires_grad_()
        if layer == "kda-decode":  # a prefill and two single-token steps through the cache
            cache: dict = {}
            y = torch.cat([module(leaf[:, a:b], cache) for a, b in ((0, 9), (9, 10), (10, 11))], 1)
        else:
            y = module(leaf)
        grads = torch.autograd.grad(y.square().sum(), [leaf, *module.parameters()])
        return y, grads

    got = run()
    monkeypatch.setattr(where, "joint_linear", _separate)
    want = run()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_decoding_caches_copy_their_slices_of_the_joint_projection():
    # a cache entry that is a column view of the joint projection's output would keep all of that output
    # (every projection, every prompt token) alive until the next step
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    attn = mla.MultiHeadLatentAttention(32, 4, 8, 4, 8, kv_rank=16)
    layer = kda.KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, chunk_size=8)
    caches: tuple[dict, dict] = ({}, {})
    with torch.no_grad():
        attn(x, caches[0])
        layer(x, caches[1])
    held = [caches[0]["latent"], caches[0]["k_shared"], caches[1]["state"], *caches[1]["conv"]]
    for t in held:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size(), t.shape


@pytest.mark.parametrize("joint", [True, False])
def test_kda_layer_under_bf16_autocast_keeps_one_bf16_copy_of_its_fp32_input(monkeypatch, joint):
    # bf16-mixed training hands the layer an fp32 input (a norm's output): each nn.Linear casts it to bf16
    # and keeps its own copy for the weight gradient; one joint GEMM keeps one (six before, per KDA layer)
    if not joint:
        monkeypatch.setattr(kda, "joint_linear", _separate)
    torch.manual_seed(0)
    layer = kda.KimiDeltaAttention(dim=48, num_heads=2, head_dim=16, chunk_size=8)
    x0 = torch.randn(2, 24, 48, requires_grad=True)
    kept: dict[int, tuple] = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.dtype))
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x0 * 1.0)  # not a leaf: autocast caches only leaf casts
    copies = [v for v in kept.values() if v == ((48, 48), torch.bfloat16)]
    assert len(copies) == (1 if joint else 6)
