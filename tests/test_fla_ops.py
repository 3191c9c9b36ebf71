"""fla's KDA as torch.library custom ops (attnres.model.fla_ops), checked on a CPU: the op's real body is
fla's Triton kernels (GPU only; tests/gpu/test_kda_fla_gpu.py compares them with fla's own function), so
here the implementations behind the ops are swapped for our chunked KDA. What is checked is everything
around the kernels: the schema and fake kernels (opcheck), the autograd wiring (gradients equal those of
the reference) and that a KDA layer on the fla path compiles as one graph with the op inside."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from attnres.model import fla_ops
from attnres.model.kda import KimiDeltaAttention, kda_chunked

C = fla_ops.CHUNK


def _cumsum_per_chunk(g: torch.Tensor) -> torch.Tensor:
    B, T, H, K = g.shape
    pad = (-T) % C
    gc = F.pad(g, (0, 0, 0, 0, 0, pad)).reshape(B, -1, C, H, K).cumsum(2).reshape(B, -1, H, K)
    return gc[:, :T]


def _g_from_cumsum(gc: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([torch.zeros_like(gc[:, :1]), gc[:, :-1]], 1)
    first = (torch.arange(gc.shape[1], device=gc.device) % C == 0)[None, :, None, None]
    return torch.where(first, gc, gc - prev)


def _contiguous(*tensors):
    # fla's Triton kernels index raw memory: a strided view would be read as garbage, so the stand-ins insist
    assert all(t.is_contiguous() for t in tensors), [t.stride() for t in tensors]


def _ref_forward(q, k, v, g, beta, scale, cu_seqlens, cu_seqlens_cpu):
    assert cu_seqlens is None
    _contiguous(q, k, v, g, beta)
    o, _ = kda_chunked(q, k, v, g, beta, scale=scale)
    B, T, H, _ = k.shape
    # stand-ins of fla's saved intra-chunk matrices (shape, dtype): the reference backward ignores them
    gc = _cumsum_per_chunk(g.float()).contiguous()
    return o.to(q.dtype).contiguous(), gc, k.new_zeros(B, T, H, C), k.new_zeros(B, T, H, C)


def _ref_backward(do, q, k, v, beta, g_cumsum, Aqk, Akk, scale, cu_seqlens, cu_seqlens_cpu):
    _contiguous(do, q, k, v, beta, g_cumsum, Aqk, Akk)
    # torch.func, not torch.autograd: a custom op's body runs below the autograd dispatch key
    g = _g_from_cumsum(g_cumsum).to(q.dtype)
    _, vjp = torch.func.vjp(lambda *t: kda_chunked(*t, scale=scale)[0], q, k, v, g, beta)
    return vjp(do)


@pytest.fixture
def reference_impl(monkeypatch):
    monkeypatch.setitem(fla_ops.IMPL, "forward", _ref_forward)
    monkeypatch.setitem(fla_ops.IMPL, "backward", _ref_backward)


def _inputs(B=2, T=40, H=2, K=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    g = -F.softplus(torch.randn(B, T, H, K, generator=gen, dtype=dtype))
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, g, beta


def test_forward_op_schema_and_fake_kernel_pass_opcheck(reference_impl):
    q, k, v, g, beta = _inputs()
    # schema, fake kernel, and the backward registered on the op itself (torch.library.register_autograd:
    # no autograd.Function around it, whose higher-order op breaks torch 2.11's nested compile regions)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    q, k, v, g, beta = (t.requires_grad_() for t in (q, k, v, g, beta))
    torch.library.opcheck(torch.ops.attnres.fla_chunk_kda_fwd.default, (q, k, v, g, beta, 0.3, None, None),
                          test_utils=checks)
    # the backward op's stand-in body (torch.func) cannot run under opcheck's modes; its fake kernel is
    # exercised by the compile test below, its gradients by the gradient test


def test_op_gradients_are_the_reference_gradients(reference_impl):
    inputs = [t.requires_grad_() for t in _inputs()]
    # v as a transposed view, as the KDA layer's short conv hands it over: what the kernels get (forward and
    # backward) must still be contiguous
    inputs[2] = inputs[2].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not inputs[2].is_contiguous()
    o = fla_ops.chunk_kda(*inputs, scale=0.3)
    ref, _ = kda_chunked(*[t.detach().requires_grad_() for t in inputs[:4]], inputs[4].detach(), scale=0.3)
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, inputs, do)
    leaves = [t.detach().requires_grad_() for t in inputs]
    want = torch.autograd.grad(kda_chunked(*leaves, scale=0.3)[0], leaves, do)
    # the backward reads g back from the saved chunk-local cumsum, which is fp32 (as fla's): fp32 accuracy
    for a, b, name in zip(got, want, ["q", "k", "v", "g", "beta"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"d{name}")


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="the fla path needs fla installed")
def test_kda_layer_on_the_fla_path_compiles_to_one_graph_with_the_op(reference_impl, reference_conv):
    torch.manual_seed(0)
    layer = KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, backend="fla")
    ref = KimiDeltaAttention(dim=32, num_heads=2, head_dim=16, backend="torch")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 70, 32)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    y = compiled(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert reference_conv == ["forward"] * 3  # q, k, v through the short-conv op (fla's kernel on a GPU)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert reference_conv == ["forward"] * 3 + ["backward"] * 3
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def _ref_conv_forward(x, weight):
    # fla's kernel reads x through its row stride: the stand-in gets x as the layer hands it over
    return _short_conv_reference(x, weight)


def _short_conv_reference(x, weight):
    B, T, C = x.shape
    dt = torch.promote_types(x.dtype, torch.float32)  # fp32 math for bf16, as fla's kernel
    xp = F.pad(x.transpose(1, 2).to(dt), (weight.shape[1] - 1, 0))
    return F.silu(F.conv1d(xp, weight.to(dt).unsqueeze(1), groups=C)).transpose(1, 2).to(x.dtype)


def _ref_conv_backward(dy, x, weight):
    _, vjp = torch.func.vjp(_short_conv_reference, x, weight)
    return vjp(dy)


@pytest.fixture
def reference_conv(monkeypatch):
    calls = []  # which of the stand-ins ran, in order

    def forward(*args):
        calls.append("forward")
        return _ref_conv_forward(*args)

    def backward(*args):
        calls.append("backward")
        return _ref_conv_backward(*args)

    monkeypatch.setitem(fla_ops.IMPL, "conv_forward", forward)
    monkeypatch.setitem(fla_ops.IMPL, "conv_backward", backward)
    return calls


def test_short_conv_op_equals_the_layers_conv_forward_and_backward(reference_conv):
    # the op against ShortConv's own plain code (conv1d over the left-padded input, then SiLU), with x a
    # column view of a wider projection output as the KDA layer hands it over
    from attnres.model.kda import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    wide = torch.randn(2, 13, 15, dtype=torch.float64)
    x = wide[..., 3:9].requires_grad_()
    assert not x.is_contiguous()
    torch.library.opcheck(torch.ops.attnres.fla_short_conv_fwd.default, (x.detach(), conv.weight.detach()),
                          test_utils=("test_schema", "test_faketensor"))
    y = fla_ops.short_conv(x, conv.weight)
    assert y.is_contiguous()
    want, _ = conv(x)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight], dy)
    ref = torch.autograd.grad(want, [x, conv.weight], dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="the fla path needs fla installed")
def test_kda_region_of_compile_nested_holds_no_higher_order_op(reference_impl, reference_conv):
    # compile: nested makes the KDA layers one region, called once per layer. A higher-order op inside it (an
    # autograd.Function becomes one, its forward and backward as subgraphs) breaks torch 2.11 when the
    # region is called again (KeyError 'example_value', H100, session 25): fla's KDA and short conv must be
    # single op nodes there, and the model must still train as the eager one
    from attnres.model.config import get_config
    from attnres.model.decoder import Decoder
    from tests.helpers import nested_region_calls

    cfg = get_config("tiny", kda_backend="fla", moe=False)
    torch.manual_seed(0)
    model, ref = Decoder(cfg), Decoder(get_config("tiny", kda_backend="torch", moe=False))  # eager fla: GPU
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.kda_chunk_size))
    out, calls = nested_region_calls(model, ids, labels=ids, graphs=(graphs := []))
    kda_layers = sum(not cfg.is_mla(i) for i in range(cfg.num_layers))
    (body_name,) = [name for name, n in calls.items() if n == kda_layers]
    body = graphs[0].get_submodule(body_name)
    assert [n.target for n in body.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)] == []
    ops = {str(n.target).removesuffix(".default") for n in body.graph.nodes if n.op == "call_function"}
    assert {"attnres.fla_chunk_kda_fwd", "attnres.fla_short_conv_fwd"} <= ops, ops
    out.loss.backward()
    want = ref(ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
