"""MoE channel mixer: routing math, sorted/grouped dispatch, auxiliary-loss-free balancing, aux loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnres.model.moe import MoE, SwiGLU, grouped_swiglu
from tests.helpers import fake_fla

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    args = dict(dim=16, num_experts=6, top_k=2, expert_dim=24, num_shared_experts=1,
                routed_scaling_factor=2.5)
    return MoE(**{**args, **kw})


def test_dispatch_equals_per_token_reference():
    moe = _moe()
    x = torch.randn(3, 7, 16)
    y, _ = moe(x)
    flat = x.reshape(-1, 16)
    idx, w, scores = moe.route(flat)
    # per (token, slot): gather that expert's weights directly, no sorting
    wg, wu, wd = moe.w_gate[idx], moe.w_up[idx], moe.w_down[idx]  # [N, k, h, d] / [N, k, d, h]
    h = F.silu(torch.einsum("nkhd,nd->nkh", wg, flat)) * torch.einsum("nkhd,nd->nkh", wu, flat)
    ref = torch.einsum("nkdh,nkh,nk->nd", wd, h, w) + moe.shared(flat)
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-5, rtol=1e-4)


def test_routing_weights_are_renormalised_unbiased_scores_times_scale():
    moe = _moe()
    moe.score_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 5.0]))  # forces experts 0 and 5
    x = torch.randn(10, 16)
    idx, w, scores = moe.route(x)
    assert set(idx.flatten().tolist()) == {0, 5}
    picked = scores.gather(-1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32


def test_grouped_swiglu_skips_empty_experts_and_keeps_order():
    torch.manual_seed(0)
    E, h, d = 4, 8, 6
    wg, wu, wd = torch.randn(E, h, d), torch.randn(E, h, d), torch.randn(E, d, h)
    counts = torch.tensor([3, 0, 2, 0])
    x = torch.randn(5, d)
    y = grouped_swiglu(x, counts, wg, wu, wd, use_grouped_mm=False)
    owner = [0, 0, 0, 2, 2]
    ref = torch.stack([(F.silu(wg[e] @ x[i]) * (wu[e] @ x[i])) @ wd[e].t() for i, e in enumerate(owner)])
    torch.testing.assert_close(y, ref)


def test_router_bias_drives_a_skewed_router_toward_balance():
    moe = _moe(num_experts=8, top_k=2, bias_update_rate=0.01)
    g = torch.Generator().manual_seed(1)
    hot = F.normalize(torch.randn(16, generator=g), dim=0)
    with torch.no_grad():  # experts 0 and 1 score high for (almost) every token
        moe.router.weight.copy_(torch.randn(8, 16, generator=g) * 0.3)
        moe.router.weight[:2] += 2.0 * hot
    x = torch.randn(4, 32, 16, generator=g) + 2.0 * hot
    moe.train()
    late = torch.zeros(8)
    for step in range(80):
        with torch.no_grad():
            moe(x)
        if step == 0:
            before = (moe.last_load.max() / moe.last_load.mean()).item()
        if step >= 60:
            late += moe.last_load
        moe.update_bias()
    after = (late.max() / late.mean()).item()
    assert before > 3.0, before  # 8 experts, top-2: all slots on two experts would give 4
    assert after < 1.15, after
    assert moe.score_bias[:2].max() < moe.score_bias[2:].min()  # the hot experts were pushed down


def test_update_bias_uses_sign_of_mean_minus_load_and_resets_counts():
    moe = _moe(num_experts=4, bias_update_rate=0.1)
    moe.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    moe.update_bias()
    torch.testing.assert_close(moe.score_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert moe.tokens_per_expert.sum() == 0
    moe.update_bias(torch.tensor([0.0, 10.0, 0.0, 10.0]))
    torch.testing.assert_close(moe.score_bias, torch.tensor([0.0, 0.0, 0.1, -0.1]))


def test_loads_accumulate_only_in_training_mode():
    moe = _moe()
    x = torch.randn(2, 5, 16)
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()
    moe(x)
    moe(x)
    assert moe.tokens_per_expert.sum() == 2 * 10 * moe.top_k


def test_sequence_aux_loss_is_coef_for_uniform_scores_and_grows_with_imbalance():
    moe = _moe(aux_loss_coef=0.01)
    with torch.no_grad():
        moe.router.weight.zero_()  # all scores 0.5: P_e = 1/E, so sum_e f_e P_e = 1 whatever the routing
    _, aux = moe(torch.randn(2, 9, 16))
    torch.testing.assert_close(aux, torch.tensor(0.01))
    moe = _moe(aux_loss_coef=0.01)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0  # expert 0 dominates the scores and the routing
    x = torch.randn(2, 9, 16)
    x[..., 0] = x[..., 0].abs() + 1
    _, aux = moe(x)
    assert aux > 0.012  # 1.29 x coef: expert 0 always routed and holding 2/7 of the score mass


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_path_equals_expert_loop_forward_and_backward():
    torch.manual_seed(0)
    E, h, d = 4, 16, 8
    weights = [torch.randn(E, h, d), torch.randn(E, h, d), torch.randn(E, d, h)]
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, d)
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in [x, *weights]]
        y = grouped_swiglu(leaves[0], counts, *leaves[1:], use_grouped_mm=grouped)
        results.append((y, torch.autograd.grad(y.square().sum(), leaves)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_balancing_state_stays_fp32_when_the_model_is_cast_to_bf16():
    moe = _moe()
    moe.score_bias.fill_(0.123456)
    moe.to(torch.bfloat16)
    assert moe.w_gate.dtype == torch.bfloat16 and moe.router.weight.dtype == torch.bfloat16
    assert moe.score_bias.dtype == torch.float32 and moe.tokens_per_expert.dtype == torch.float32
    assert moe.score_bias[0].item() == pytest.approx(0.123456, abs=1e-7)  # not rounded through bf16
    moe.train()
    y, _ = moe(torch.randn(2, 300, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.tokens_per_expert.sum().item() == 2 * 300 * moe.top_k


def test_router_stays_fp32_under_autocast():
    # KIMI_LINEAR.md: router logits and sigmoid scores in fp32. Autocast recasts F.linear to bf16 even
    # for fp32 inputs, so the router must leave autocast; scores must equal the plain fp32 computation.
    moe = _moe()
    x = torch.randn(40, 16)
    ref = torch.sigmoid(x @ moe.router.weight.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w, scores = moe.route(x)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=1e-6, rtol=1e-6)


def test_gather_dispatch_and_combine_equal_the_index_add_formulation_and_its_gradients():
    # the scatter formulation the gathers replace: x[order // k] in, index_add_ of the weighted rows out
    torch.manual_seed(0)
    moe = _moe().double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y, _ = moe(x)
    flat = x.reshape(-1, 16)
    idx, w, _ = moe.route(flat)
    order = torch.argsort(idx.flatten(), stable=True)
    token = order // moe.top_k
    counts = torch.bincount(idx.flatten(), minlength=moe.num_experts)
    e = grouped_swiglu(flat[token], counts, moe.w_gate, moe.w_up, moe.w_down) * w.flatten()[order, None]
    ref = torch.zeros_like(flat).index_add_(0, token, e) + moe.shared(flat)
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    leaves = [x, moe.w_gate, moe.w_down, moe.router.weight]
    got = torch.autograd.grad((y.reshape(-1, 16) * g).sum(), leaves, retain_graph=True)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    for name, a, b in zip(("x", "w_gate", "w_down", "router"), got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def _capturing_backend():
    """An aot_eager-like backend that keeps the forward and backward graphs it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return graphs, aot_autograd(fw_compiler=keep, bw_compiler=keep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_combine_equals_the_eager_batched_matmul(dtype):
    # the weights rounded to the rows' dtype and the k products summed in fp32, both ways
    from attnres.model.moe import _Combine

    torch.manual_seed(0)
    n, k, d = 37, 3, 24
    y = torch.randn(n * k, d).to(dtype).requires_grad_()
    w = torch.rand(n, k, requires_grad=True)
    order = torch.randperm(n * k)
    inv = torch.argsort(order)
    g = torch.randn(n, d).to(dtype)
    f = lambda y, w: _Combine.apply(y, w, order, inv)  # noqa: E731
    want = f(y, w)
    want_grads = torch.autograd.grad(want, (y, w), g)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(y, w)
    got_grads = torch.autograd.grad(got, (y, w), g)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)
    # and against the definition, in fp64
    rows = y.detach().double()[inv].unflatten(0, (n, k))
    ref = (rows * w.detach().to(dtype).double().unsqueeze(-1)).sum(1)
    torch.testing.assert_close(got.double(), ref, atol=1e-12 if dtype == torch.float64 else 1e-2, rtol=1e-2)


def test_dispatch_and_combine_compile_to_one_graph_and_keep_their_gradients():
    from attnres.model.moe import _Combine, _Dispatch

    torch.manual_seed(0)
    x, w = torch.randn(5, 4, requires_grad=True), torch.rand(5, 2, requires_grad=True)
    order = torch.randperm(10)
    inv = torch.argsort(order)

    def f(x, w):
        return _Combine.apply(_Dispatch.apply(x, order, inv, 2).sin(), w, order, inv)

    want = torch.autograd.grad(f(x, w).square().sum(), (x, w))
    graphs, backend = _capturing_backend()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(x, w).square().sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # compiled, forward and backward are products and sums for Inductor to fuse, not batched matmuls
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert len(graphs) == 2 and not any("bmm" in op for op in ops), ops
    # and they are what they say: out[t] = sum_s w[t, s] sin(x[t]) here, every slot of a token its own row
    torch.testing.assert_close(f(x, w), w.sum(1, keepdim=True) * x.sin())


def test_swiglu_on_fla_calls_its_fused_swiglu_linear_with_the_down_projection(monkeypatch):
    # where fla runs, the eager MLP hands fla's swiglu_linear the two projections and the down projection's
    # weight (no bias); the stand-in computes fla's documented silu(x) * y @ W^T: equal to the plain path;
    # the torch backend, and auto on a CPU, never call it
    fake_fla(monkeypatch, [])
    import fla.modules.activations as act

    seen = []
    fused = act.swiglu_linear
    monkeypatch.setattr(act, "swiglu_linear", lambda *a: seen.append(a[2]) or fused(*a))
    torch.manual_seed(0)
    mlps = {b: SwiGLU(16, 40, backend=b) for b in ("fla", "torch")}
    mlps["torch"].load_state_dict(mlps["fla"].state_dict())
    x = torch.randn(2, 5, 16)
    out = {b: m(x) for b, m in mlps.items()}
    assert len(seen) == 1 and seen[0] is mlps["fla"].down_proj.weight
    torch.testing.assert_close(out["fla"], out["torch"], atol=1e-6, rtol=1e-6)
    SwiGLU(16, 40, backend="auto")(x)  # auto: fla on CUDA only
    assert len(seen) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_logits_equal_the_fp32_linear_and_keep_no_fp32_copy_of_the_input(dtype):
    # the router runs in fp32 on the (bf16 under autocast) MoE input: the same numbers as
    # F.linear(x.float(), w.float()) both ways, but autograd keeps x as it came, not its fp32 copy
    from attnres.model.moe import _RouterLogits

    torch.manual_seed(0)
    x = torch.randn(37, 16).to(dtype).requires_grad_()
    w = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(37, 6)
    ref = F.linear(x.float(), w.float())
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, w), g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _RouterLogits.apply(x, w)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    assert torch.equal(out, ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
    assert out.dtype == torch.float32 and dx.dtype == dx_ref.dtype == dtype
    assert [t.dtype for t in saved] == [dtype, torch.float32] and saved[0] is x


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_router_logits_from_split_bf16_operands_match_the_fp32_products(device, monkeypatch):
    # bf16 input on CUDA: the fp32 products as tensor-core GEMMs of split bf16 operands (on the CPU the
    # same algebra on fp32 copies, forced on): logits and dw within ~2^-16 of the fp32 linear's, dx its
    # bf16 rounding (one bf16 step at most)
    from attnres.model import moe

    if device == "cpu":
        monkeypatch.setattr(moe, "router_split_runs", lambda x: True)
    assert moe.router_split_runs(torch.empty(1, dtype=torch.bfloat16, device=device))
    torch.manual_seed(0)
    x = torch.randn(300, 64, device=device).bfloat16().requires_grad_()
    w = (torch.randn(8, 64, device=device) * 0.05).requires_grad_()
    g = torch.randn(300, 8, device=device)
    ref = F.linear(x.float(), w)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, w), g)
    out = moe._RouterLogits.apply(x, w)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    assert out.dtype == dw.dtype == torch.float32 and dx.dtype == torch.bfloat16

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(out, ref) < 3e-5 and rel(dw, dw_ref) < 3e-5, (rel(out, ref), rel(dw, dw_ref))
    # one bf16 step of the result (8 significant bits), or where the sum cancels to near 0, the split's
    # ~2^-16 of the terms' magnitude
    bound = dx_ref.float().abs() * 2.0**-7 + (g.abs() @ w.detach().abs()) * 2.0**-14
    assert ((dx.float() - dx_ref.float()).abs() <= bound).all()
    # the split is what makes it precise: the weight rounded to bf16 alone is ~100x further off
    assert rel(F.linear(x.float(), w.bfloat16().float()), ref) > 10 * rel(out, ref)


def test_eager_dispatch_and_combine_gather_and_sum_in_one_embedding_bag_each(monkeypatch):
    # eager off CUDA, each gather-and-sum is one embedding_bag (gather, weigh, sum in one kernel): the
    # combine's forward, its dy, and the dispatch's backward; dw one per-row-dot kernel; no [N, k, d]
    # temporary and no batched matmul (on CUDA the same four run as attnres.model.moe_kernels' Triton
    # kernels: tests/test_moe_kernels.py)
    from attnres.model.moe import _Combine, _Dispatch

    calls = []

    def counted(owner, name):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    counted(F, "embedding_bag")
    counted(torch, "bmm")
    counted(torch.ops.aten, "_embedding_bag_per_sample_weights_backward")
    torch.manual_seed(0)
    x, w = torch.randn(5, 4, requires_grad=True), torch.rand(5, 2, requires_grad=True)
    order = torch.randperm(10)
    inv = torch.argsort(order)
    out = _Combine.apply(_Dispatch.apply(x, order, inv, 2), w, order, inv)
    assert calls == ["embedding_bag"]
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    # backward: the combine's dy and the dispatch's sum, and dw's per-row dots (embedding_bag's own kernel
    # for the gradient of its per-sample weights), no batched matmul
    assert sorted(calls) == ["_embedding_bag_per_sample_weights_backward"] + ["embedding_bag"] * 3, calls
    # out[t] = sum_s w[t, s] x[t] here (every slot of a token a copy of its row), and its gradients
    torch.testing.assert_close(out, w.sum(1, keepdim=True) * x)
    torch.testing.assert_close(gx, 2 * out * w.sum(1, keepdim=True))
    torch.testing.assert_close(gw, (2 * out * x).sum(1, keepdim=True).expand(5, 2))


def test_row_dots_without_the_per_sample_kernel_equal_it_and_bf16_cuda_goes_without(monkeypatch):
    # embedding_bag's per-sample-weight gradient kernel has no bf16 on CUDA (session 22: every bf16 MoE
    # step failed there): such tensors take the batched matmul, which gives the same dots
    from attnres.model import moe

    torch.manual_seed(0)
    src, vec = torch.randn(12, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    index = torch.randint(0, 12, (5, 3))
    ref = torch.einsum("tsd,td->ts", src[index], vec)
    torch.testing.assert_close(moe._row_dots(src, index, vec), ref)
    monkeypatch.setattr(moe, "_per_sample_kernel_takes", lambda t: False)
    torch.testing.assert_close(moe._row_dots(src, index, vec), ref)
    monkeypatch.undo()
    assert moe._per_sample_kernel_takes(src.bfloat16())  # on a CPU it takes bf16
    cuda_bf16 = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16})()
    cuda_f16 = type("T", (), {"is_cuda": True, "dtype": torch.float16})()
    assert not moe._per_sample_kernel_takes(cuda_bf16) and moe._per_sample_kernel_takes(cuda_f16)


@pytest.mark.parametrize("capability, takes", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_the_eager_moe_runs_its_triton_kernels_on_sm80_and_newer_only(monkeypatch, capability, takes):
    # Triton compiles bf16 only on sm80+: older GPUs (T4, V100) keep torch's ops; the dtype must be one
    # that fp32 sums cover
    from attnres.model import moe, moe_kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(moe_kernels, "available", lambda: True)
    moe_kernels.capable.cache_clear()
    try:
        fake = type("T", (), {"is_cuda": True, "dtype": torch.bfloat16, "device": torch.device("cuda", 0)})()
        assert moe._triton_takes(fake) is takes
        fake.dtype = torch.float64
        assert not moe._triton_takes(fake)
        assert not moe._triton_takes(torch.empty(2, dtype=torch.bfloat16))  # a CPU tensor
    finally:
        moe_kernels.capable.cache_clear()


def test_the_moe_through_its_nested_region_equals_the_plain_call():
    """Decoder.compile_nested routes the experts through NESTED_REGIONS["moe"] (``region(moe, flat) =
    moe.mix(flat)``); run eagerly it is the same call: output, balance loss and both load statistics."""
    from attnres.model.decoder import NESTED_REGIONS

    x = torch.randn(2, 5, 16, requires_grad=True)
    outs = []
    for region in (None, NESTED_REGIONS["moe"]):
        moe = _moe(aux_loss_coef=0.01)
        moe.train()
        y, aux = moe(x, region=region)
        (y.square().mean() + aux).backward()
        outs.append((y, aux, moe.last_load, moe.tokens_per_expert.clone(), x.grad.clone(),
                     moe.w_gate.grad.clone()))
        x.grad = None
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert outs[0][3].sum() == 2 * 5 * 2  # every (token, slot) counted once


def test_torch_version_gates_build_no_version_object_when_traced(monkeypatch):
    # torch 2.11's Dynamo cannot trace TorchVersion's construction (str.__new__), which broke compile:
    # nested on the H100 (session 27): the gates compare the (major, minor) parsed at import instead
    import re

    from attnres import hardware
    from attnres.model import moe
    from attnres.residual import block

    def no_version(*args, **kwargs):
        raise AssertionError("a gate built a TorchVersion")

    monkeypatch.setattr(torch.torch_version, "TorchVersion", no_version)
    expected = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert expected == hardware.TORCH_RELEASE
    assert hardware.torch_at_least(expected) and not hardware.torch_at_least((expected[0], expected[1] + 1))
    assert moe.mix_region_supported() == (expected >= moe.MIX_REGION_MIN_TORCH)
    assert (expected >= block.DEFERRED_ADD_COMPILE_MIN_TORCH) == block._DEFERRED_ADD_COMPILES
    fn = torch.compile(lambda x: x + 1 if moe.mix_region_supported() else x - 1, fullgraph=True,
                       backend="eager")
    assert torch.equal(fn(torch.zeros(2)), torch.full((2,), 1.0 if moe.mix_region_supported() else -1.0))
