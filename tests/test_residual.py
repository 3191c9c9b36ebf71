"""The residual modules against a naive transcription of the paper's definition (direct softmax, no two
phases)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnres.model import valid_num_blocks
from attnres.residual import DepthInput, Residual, ResidualState, depth_weight_matrix, make_residual

D = 24
EPS = 1e-6


def attend(sources: list[torch.Tensor], w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h = sum_i softmax_i(w . RMSNorm_g(v_i)) v_i, written from the spec (w and g kept apart)."""
    v = torch.stack(sources)  # [n, B, T, d]
    keys = F.rms_norm(v, (v.shape[-1],), weight=g, eps=EPS)
    a = torch.softmax(keys @ w, dim=0)  # [n, B, T]
    return (a.unsqueeze(-1) * v).sum(0)


def naive_forward(mode: str, emb, sublayers, res: Residual, block_size: int = 1):
    """Run the stack the way the paper defines it, sublayer by sublayer."""
    q = {k: (m.weight, m.norm_weight) for k, m in res.queries.items()} if mode != "standard" else {}
    if mode == "standard":
        h = emb
        for f in sublayers:
            h = h + f(h)
        return h
    if mode == "full":
        vs = [emb]
        for i, f in enumerate(sublayers):
            vs.append(f(attend(vs, *q[str(i)])))
        return attend(vs, *q["out"])
    blocks, partial = [emb], None
    for i, f in enumerate(sublayers):
        srcs = blocks + ([partial] if partial is not None else [])
        v = f(attend(srcs, *q[str(i)]))
        partial = v if partial is None else partial + v
        if (i + 1) % block_size == 0:
            blocks.append(partial)
            partial = None
    return attend(blocks, *q["out"])


def run(res: Residual, emb, sublayers, record: bool = False):
    state = res.begin(emb, record=record)
    for i, f in enumerate(sublayers):
        res.output(state, i, f(res.input(state, i)))
    return res.readout(state), state


def make_stack(n: int, dtype=torch.float64, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)).to(dtype)


def randomise_queries(res: Residual, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in res.queries.values():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
            m.norm_weight.copy_(
                1 + 0.3 * torch.randn(m.norm_weight.shape, generator=gen, dtype=m.weight.dtype)
            )


def grads(module: nn.Module, *tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in module.parameters()]
    out += [t.grad.clone() for t in tensors]
    return out


@pytest.mark.parametrize(
    ("mode", "num_sublayers", "num_blocks", "full_group"),
    [("standard", 6, 0, 2), ("full", 6, 0, 1), ("full", 6, 0, 2), ("full", 7, 0, 3), ("full", 6, 0, 6),
     ("block", 8, 4, 2), ("block", 8, 2, 2), ("block", 8, 1, 2), ("block", 12, 3, 2)],
)  # fmt: skip
def test_two_phase_path_equals_direct_softmax_forward_and_backward(
    mode, num_sublayers, num_blocks, full_group
):
    # Full in groups (phase 1 per group, a phase-2 merge per output of the group so far; 7 sublayers in
    # groups of 3 end with a short group) is the direct softmax per sublayer of the spec
    sublayers = make_stack(num_sublayers)
    res = make_residual(mode, D, num_sublayers, max(num_blocks, 1), EPS, full_group=full_group).double()
    if mode != "standard":
        randomise_queries(res)
    block_size = num_sublayers // num_blocks if mode == "block" else 1
    emb = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)

    out, _ = run(res, emb, sublayers)
    out.square().sum().backward()
    got = grads(nn.ModuleList([res, sublayers]), emb)

    for p in [*res.parameters(), *sublayers.parameters(), emb]:
        p.grad = None
    ref = naive_forward(mode, emb, sublayers, res, block_size)
    ref.square().sum().backward()
    want = grads(nn.ModuleList([res, sublayers]), emb)

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_block_with_one_sublayer_per_block_equals_full():
    sublayers = make_stack(6)
    full = make_residual("full", D, 6, eps=EPS).double()
    randomise_queries(full)
    block = make_residual("block", D, 6, num_blocks=6, eps=EPS).double()
    block.load_state_dict(full.state_dict())
    emb = torch.randn(3, 4, D, dtype=torch.float64)
    out_full, _ = run(full, emb, sublayers)
    out_full.sum().backward()
    g_full = [p.grad.clone() for p in full.parameters()]
    out_block, _ = run(block, emb, sublayers)
    out_block.sum().backward()
    torch.testing.assert_close(out_block, out_full, rtol=1e-12, atol=1e-12)
    for a, b in zip((p.grad for p in block.parameters()), g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("mode", "num_blocks"), [("full", 0), ("block", 2)])
def test_zero_queries_give_uniform_weights(mode, num_blocks):
    sublayers = make_stack(8)
    res = make_residual(mode, D, 8, num_blocks=max(num_blocks, 1), eps=EPS).double()
    emb = torch.randn(2, 3, D, dtype=torch.float64)
    _, state = run(res, emb, sublayers, record=True)
    assert len(state.records) == 9  # 8 sublayers and the read-out
    for r in state.records:
        n = len(r["weights"])
        torch.testing.assert_close(r["weights"], torch.full((n,), 1.0 / n, dtype=r["weights"].dtype))
    # with uniform weights the first sublayer's input is the mean of the sources: the embedding
    state = res.begin(emb)
    torch.testing.assert_close(res.input(state, 0), emb)


def test_depth_weight_matrix_places_block_sources_and_partial():
    sublayers = make_stack(8)
    res = make_residual("block", D, 8, num_blocks=2, eps=EPS).double()
    randomise_queries(res)
    _, state = run(res, torch.randn(2, 3, D, dtype=torch.float64), sublayers, record=True)
    m = depth_weight_matrix(res, state.records)
    assert m.shape == (4, 9)  # b_0, b_1, b_2, partial x (8 sublayers + read-out)
    assert torch.isnan(m[1:, 0]).all() and torch.isnan(m[-1, 4])  # sublayer 0 sees b_0 only; 4 starts block 2
    torch.testing.assert_close(m.nansum(0), torch.ones(9, dtype=m.dtype))


def test_standard_mode_is_the_plain_sum():
    sublayers = make_stack(4)
    res = make_residual("standard", D, 4)
    emb = torch.randn(1, 2, D, dtype=torch.float64)
    state = res.begin(emb)
    total = emb
    for i, f in enumerate(sublayers):
        h = res.input(state, i)
        torch.testing.assert_close(h, total)
        v = f(h)
        total = total + v
        res.output(state, i, v)
    torch.testing.assert_close(res.readout(state), total)
    assert not list(res.parameters())


@pytest.mark.parametrize(("mode", "num_blocks"), [("standard", 1), ("full", 1), ("block", 2)])
def test_toy_stack_of_mlp_sublayers_trains(mode, num_blocks):
    torch.manual_seed(0)
    sublayers = nn.ModuleList(
        nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(8)
    )
    res = make_residual(mode, D, 8, num_blocks=num_blocks)
    head = nn.Linear(D, 1)
    params = [*sublayers.parameters(), *res.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    x = torch.randn(64, 1, D)
    y = torch.sin(3 * x[..., :4].sum(-1, keepdim=True)) * x[..., 4:5]
    losses = []
    for _ in range(60):
        out, _ = run(res, x, sublayers)
        loss = F.mse_loss(head(out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"{mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if mode != "standard":  # the pseudo-queries received gradient and moved off zero
        assert any(m.weight.abs().sum() > 0 for m in res.queries.values())


def test_bad_configuration_names_the_field_and_valid_values():
    with pytest.raises(
        ValueError, match=r"residual mode 'dense' is unknown; valid modes: standard, full, block"
    ):
        make_residual("dense", D, 8)
    with pytest.raises(ValueError, match=r"num_blocks=3 must divide the 8 sublayers \(valid: 1, 2, 4, 8\)"):
        make_residual("block", D, 8, num_blocks=3)
    assert valid_num_blocks(12) == [1, 2, 3, 6]


def test_readout_in_the_middle_of_a_block_is_an_error():
    res = make_residual("block", D, 4, num_blocks=1)
    state = res.begin(torch.randn(1, 2, D))
    res.output(state, 0, res.input(state, 0))
    with pytest.raises(RuntimeError, match="middle of a block"):
        res.readout(state)


@pytest.mark.parametrize("mode", ["block", "full"])
def test_stage_starting_mid_block_runs_phase1_for_its_own_sublayers(mode):
    """A pipeline stage that owns sublayers 2..7, starting inside a 4-sublayer block (Block) or a
    3-sublayer phase-1 group (Full), given the sources and the partial, computes the same inputs as
    the unsplit module."""
    sublayers = make_stack(8)
    whole = make_residual(mode, D, 8, num_blocks=2, eps=EPS, full_group=3).double()
    randomise_queries(whole)
    emb = torch.randn(2, 3, D, dtype=torch.float64)
    out_whole, _ = run(whole, emb, sublayers)

    stage = make_residual(mode, D, 8, num_blocks=2, eps=EPS, full_group=3).double()
    stage.load_state_dict(whole.state_dict())
    state = stage.begin(emb)
    for i in range(2):
        stage.output(state, i, sublayers[i](stage.input(state, i)))
    # hand over as a stage boundary would: the sources and the partial only
    handed = stage.begin(emb)
    handed.sources = list(state.sources)
    handed.set_partial(state.partial)
    for key in ("0", "1"):
        del stage.queries[key]
    for i in range(2, 8):
        stage.output(handed, i, sublayers[i](stage.input(handed, i)))
    torch.testing.assert_close(stage.readout(handed), out_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("mode", "num_blocks"), [("standard", 1), ("full", 1), ("block", 2)])
def test_mixed_precision_autocast_keeps_the_stream_in_the_embedding_dtype(mode, num_blocks):
    """bf16-mixed: sublayers return bf16 under autocast while the embedding is fp32; the depth mixer
    must accept that (as the standard residual's promotion does) and match the fp32 run closely."""
    torch.manual_seed(0)
    sublayers = nn.ModuleList(nn.Linear(D, D) for _ in range(8))
    res = make_residual(mode, D, 8, num_blocks=num_blocks)
    if mode != "standard":
        randomise_queries(res)
    emb = torch.randn(2, 3, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = run(res, emb, sublayers)
    out.float().sum().backward()
    assert out.dtype == torch.float32 and emb.grad is not None
    ref, _ = run(res, emb.detach(), sublayers)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_block_partial_sums_of_bf16_outputs_are_exact_fp32_sums_with_bf16_gradients():
    """The partial summary of an fp32 stream adds bf16 outputs by promotion (no cast kernel first): the
    same fp32 values as casting each output, the stream's dtype, and each output's gradient in bf16; a
    wider output is rounded to the stream's dtype and added to the partial sum, not put in its place."""
    torch.manual_seed(0)
    res = make_residual("block", D, 4, num_blocks=1)
    state = res.begin(torch.randn(2, 3, D))
    vs = [torch.randn(2, 3, D).bfloat16().requires_grad_() for _ in range(3)]
    for i, v in enumerate(vs):
        res.output(state, i, v)
    assert state.partial.dtype == torch.float32
    assert torch.equal(state.partial, vs[0].float() + vs[1].float() + vs[2].float())
    (state.partial * torch.arange(D, dtype=torch.float32)).sum().backward()
    for v in vs:
        assert v.grad.dtype == torch.bfloat16
        torch.testing.assert_close(v.grad, torch.arange(D, dtype=torch.bfloat16).expand(2, 3, D))
    # an output wider than the stream (fp32 into a bf16 stream) is rounded to it and still summed
    state = res.begin(torch.randn(2, 3, D).bfloat16())
    ws = [torch.randn(2, 3, D) for _ in range(3)]
    for i, w in enumerate(ws):
        res.output(state, i, w)
    assert state.partial.dtype == torch.bfloat16
    assert torch.equal(state.partial, ws[0].bfloat16() + ws[1].bfloat16() + ws[2].bfloat16())


@pytest.mark.parametrize("mode,num_blocks", [("full", 6), ("block", 2)])
def test_query_cache_computes_each_query_once_and_changes_nothing(mode, num_blocks):
    torch.manual_seed(0)
    res = make_residual(mode, 16, 6, num_blocks)
    with torch.no_grad():
        for q in res.queries.values():
            q.weight.normal_()
    calls = []
    for q in res.queries.values():
        q.register_forward_hook(lambda *_: calls.append(1))
    layers = [nn.Linear(16, 16) for _ in range(6)]

    def run(x, cache=None):
        state = res.begin(x, query_cache=cache)
        for i, f in enumerate(layers):
            res.output(state, i, f(res.input(state, i)))
        return res.readout(state)

    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = run(x)
        per_call = len(calls)
        assert per_call == 6 + 1  # every query once per forward (phase 2 reuses phase 1's), plus the read-out
        cache: dict = {}
        first = run(x, cache)
        again = run(x, cache)
    assert len(calls) == 2 * per_call  # the cached call computed no query
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_ops_skip_autograd_only_when_no_gradient_can_flow():
    from attnres import ops

    src = [torch.randn(4, 8) for _ in range(3)]
    q = torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():
        outs, lse = ops.phase1(src, q)
    assert lse.grad_fn is None and not ops._no_grad_needed(src, q)
    outs_g, lse_g = ops.phase1(src, q)
    assert lse_g.grad_fn is not None
    torch.testing.assert_close(lse_g.detach(), lse, rtol=0, atol=0)
    assert ops._no_grad_needed(src, q.detach())


def _phase2_norm_standin(o, lse, p, q, w, eps, norm_eps):
    """``ops.phase2_norm`` where it has no kernel (the CPU): the reference merge, then the model's norm
    (in fp32 even for fp64 input), standing in for the CUDA kernel."""
    from attnres import reference
    from attnres.ops import rms_norm

    h, lse = reference.phase2(o, lse, p, q, eps)
    return rms_norm(h, w, norm_eps), lse


def _phase2_norm_add_standin(calls: list):
    """``ops.phase2_norm_add`` composed as :func:`_phase2_norm_standin` after the add; each call appends its
    ``eps`` to ``calls``."""

    def fused_add(o, lse, prev, addend, q, w, eps, norm_eps):
        calls.append(eps)
        partial = prev + addend
        return (*_phase2_norm_standin(o, lse, partial, q, w, eps, norm_eps), partial)

    return fused_add


# ----------------------------------------------------------------------------- recompute mode


def _normed_run(res: Residual, emb, sublayers, norms, first: int = 0, state=None):
    """The stack with each sublayer's input through its norm, which finishes the residual path's last
    step (as the decoder runs it)."""
    state = res.begin(emb) if state is None else state
    for i in range(first, len(sublayers)):
        res.output(state, i, sublayers[i](norms[i](res.input(state, i))))
    return state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_recompute_mode_gives_the_plain_gradients_bit_for_bit_across_a_mid_block_stage_split(dtype):
    """Block AttnRes with ``recompute`` (only the partial summaries kept; phase 1 again in backward) vs
    the plain path: same read-out and the same gradient of every input and parameter, exactly, also
    for a pipeline stage that starts in the middle of a block (its phase 1 covers its own sublayers)."""
    from attnres.model.norm import RMSNorm

    sublayers = make_stack(8, dtype)
    norms = nn.ModuleList(RMSNorm(D, 1e-5) for _ in range(8)).to(dtype)
    with torch.no_grad():
        for n in norms:
            n.weight.uniform_(0.5, 1.5)
    plain = make_residual("block", D, 8, num_blocks=2, eps=EPS).to(dtype)
    randomise_queries(plain)
    lean = make_residual("block", D, 8, num_blocks=2, eps=EPS, recompute=True).to(dtype)
    lean.load_state_dict(plain.state_dict())
    emb = torch.randn(2, 3, D, dtype=dtype)
    params = [*sublayers.parameters(), *norms.parameters()]

    def grads(res: Residual, split: int | None):
        x = emb.clone().requires_grad_()
        state = _normed_run(res, x, sublayers[:split] if split else sublayers, norms)
        if split:  # hand over the sources and the partial, as a stage boundary does
            handed = res.begin(x)
            handed.sources = list(state.sources)
            handed.set_partial(state.partial)
            state = _normed_run(res, x, sublayers, norms, first=split, state=handed)
        out = res.readout(state)
        (out.float() * torch.linspace(-1, 1, D)).sum().backward()
        got = [out.detach(), x.grad] + [p.grad for p in [*res.parameters(), *params]]
        for p in [*res.parameters(), *params]:
            p.grad = None
        return got

    for split in (None, 2, 5):
        expected, actual = grads(plain, split), grads(lean, split)
        assert len(expected) == len(actual) == 2 + 2 * 9 + len(params)
        for e, a in zip(expected, actual):
            assert torch.equal(e, a)
    assert "recompute=True" in repr(lean)
    assert not make_residual("full", D, 8, recompute=True).recompute  # a Block-only option


def test_recompute_mode_refuses_a_second_backward_through_the_graph():
    from attnres.model.norm import RMSNorm

    sublayers, norms = make_stack(4), nn.ModuleList(RMSNorm(D) for _ in range(4)).double()
    res = make_residual("block", D, 4, num_blocks=2, eps=EPS, recompute=True).double()
    emb = torch.randn(1, 2, D, dtype=torch.float64, requires_grad=True)
    state = res.begin(emb)
    res.output(state, 0, sublayers[0](norms[0](res.input(state, 0))))
    holder = state._pending.recompute
    out = res.readout(_normed_run(res, emb, sublayers, norms, first=1, state=state)).sum()
    assert holder is not None and len(holder.sources) == 1
    out.backward(retain_graph=True)
    # nothing large outlives backward in the recompute state while the graph is still referenced
    assert holder.sources is None and holder.outs == [None, None]
    with pytest.raises(RuntimeError, match="retain_graph is not supported in recompute mode"):
        out.backward()
    # without gradients (decoding) the plain path runs: nothing is kept for a backward
    with torch.no_grad():
        state = res.begin(emb)
        norms[0](res.input(state, 0))
    assert state._pending.recompute is None
    state = res.begin(emb)
    norms[0](res.input(state, 0))
    assert state._pending.recompute is not None


@pytest.mark.parametrize(("mode", "recompute"), [("block", False), ("block", True), ("full", False)])
def test_fused_norm_routing_takes_the_last_merge_of_each_sublayer(mode, recompute, monkeypatch):
    """``fuse_norm``: the residual path hands each sublayer's last phase-2 merge and its input norm to
    ``ops.phase2_norm`` (here its reference, standing in for the CUDA kernel): the read-out and every
    gradient equal the separate ops' (fp64), across a stage split mid-block, and the op runs once per
    sublayer that merges (Block: all but a block's first; Full in groups of 2: every second)."""
    from attnres import ops, reference
    from attnres.model.norm import RMSNorm
    from attnres.ops import rms_norm

    calls = []

    def fused(o, lse, p, q, w, eps, norm_eps):  # the model's norm computes in fp32 even for fp64 input
        calls.append(norm_eps)
        h, lse = reference.phase2(o, lse, p, q, eps)
        return rms_norm(h, w, norm_eps), lse

    sublayers = make_stack(8)
    norms = nn.ModuleList(RMSNorm(D, 1e-5) for _ in range(8)).double()
    with torch.no_grad():
        for n in norms:
            n.weight.uniform_(0.5, 1.5)
    emb = torch.randn(2, 3, D, dtype=torch.float64)

    def grads(fuse: bool, split: int | None):
        res = make_residual(mode, D, 8, num_blocks=2, eps=EPS, recompute=recompute, fuse_norm=fuse).double()
        randomise_queries(res)
        x = emb.clone().requires_grad_()
        state = _normed_run(res, x, sublayers[:split] if split else sublayers, norms)
        if split:
            handed = res.begin(x)
            handed.sources = list(state.sources)
            handed.set_partial(state.partial)
            state = _normed_run(res, x, sublayers, norms, first=split, state=handed)
        out = res.readout(state)
        (out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum().backward()
        params = [*res.parameters(), *sublayers.parameters(), *norms.parameters()]
        got = [out.detach(), x.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return got

    monkeypatch.setattr(ops, "fused_norm", lambda device: True)
    monkeypatch.setattr(ops, "phase2_norm", fused)
    for split in (None, 2, 5):
        calls.clear()
        expected = grads(False, split)
        assert calls == []
        actual = grads(True, split)
        assert calls and set(calls) == {1e-5}
        # Full: a stage starting at 5 (mid group) runs phase 1 over every earlier output for it: no merge
        forward_calls = {"block": 6, "full": 3 if split == 5 else 4}[mode]
        # recompute: the merge runs again in backward
        assert len(calls) == forward_calls * (2 if recompute else 1)
        for e, a in zip(expected, actual, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_block_leaves_each_output_add_to_the_next_inputs_fused_kernel(recompute, monkeypatch):
    """Block AttnRes on a device with ``phase2_norm_add`` (its reference standing in for the CUDA kernel):
    each output inside a block is added to the partial summary by the next sublayer's input, in the op
    that also merges and normalises; read-out, every gradient and each input's ``h`` (read after the
    output, as the decoder's stats do) are those of the add made at once, across stage splits (the
    handed-over partial makes a pending add), and the op runs for every sublayer but a block's first
    two. ``recompute`` keeps the add at once (its merge runs again in backward)."""
    from attnres import ops
    from attnres.model.norm import RMSNorm

    calls = []
    sublayers = make_stack(8)
    norms = nn.ModuleList(RMSNorm(D, 1e-5) for _ in range(8)).double()
    emb = torch.randn(2, 3, D, dtype=torch.float64)

    def run_split(add_kernel: bool, split: int | None):
        monkeypatch.setattr(ops, "fused_add", lambda device: add_kernel)
        res = make_residual("block", D, 8, num_blocks=2, eps=EPS, recompute=recompute).double()
        randomise_queries(res)
        x = emb.clone().requires_grad_()
        inputs, state = [], res.begin(x)
        for i, f in enumerate(sublayers):
            if i == split:  # the next stage starts from the handed-over fields
                state = ResidualState(sources=list(state.sources), partial=state.partial)
            h = res.input(state, i)
            res.output(state, i, f(norms[i](h)))
            inputs.append(h if isinstance(h, torch.Tensor) else h.tensor())
        out = res.readout(state)
        (out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum().backward()
        params = [*res.parameters(), *sublayers.parameters()]
        got = [out.detach(), x.grad, *[h.detach() for h in inputs], *[p.grad.clone() for p in params]]
        for p in params:
            p.grad = None
        return got

    monkeypatch.setattr(ops, "fused_norm", lambda device: True)
    monkeypatch.setattr(ops, "phase2_norm", _phase2_norm_standin)
    monkeypatch.setattr(ops, "phase2_norm_add", _phase2_norm_add_standin(calls))
    for split, count in [(None, 4), (2, 3), (5, 4)]:
        calls.clear()
        expected = run_split(False, split)
        assert calls == []
        actual = run_split(True, split)
        assert len(calls) == (0 if recompute else count)
        for e, a in zip(expected, actual, strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize("phase2_inductor", [False, True])
def test_block_deferred_add_under_torch_compile_equals_eager(monkeypatch, phase2_inductor):
    """The pending add lives on the state across sublayers: torch.compile (fullgraph) traces it (writes
    through ``set_partial``: Dynamo stores an assignment to a property as a plain attribute, which left
    the partial summary unset under compile on the H100, session 26) and gives eager's read-out and
    gradients, with the fused op (its composition standing in) in the graph. With ``PHASE2_INDUCTOR``
    (ATTNRES_COMPILED_PHASE2=inductor) the compiled graph holds neither fused op: phase 2 + norm and the
    add are torch code there, with the same results."""
    from attnres import ops
    from attnres.model.norm import RMSNorm
    from attnres.residual import state as state_module

    calls, norm_calls = [], []

    def phase2_norm_counted(*args):
        norm_calls.append(1)
        return _phase2_norm_standin(*args)

    for name, fn in [("fused_norm", lambda device: True), ("fused_add", lambda device: True),
                     ("phase2_norm", phase2_norm_counted),
                     ("phase2_norm_add", _phase2_norm_add_standin(calls))]:
        monkeypatch.setattr(ops, name, fn)
    monkeypatch.setattr(state_module, "PHASE2_INDUCTOR", phase2_inductor)
    sublayers = make_stack(8, torch.float32)
    norms = nn.ModuleList(RMSNorm(D, 1e-5) for _ in range(8))
    res = make_residual("block", D, 8, num_blocks=2, eps=EPS)
    randomise_queries(res)
    emb = torch.randn(2, 5, D)

    def step(x):
        state = res.begin(x)
        for i, f in enumerate(sublayers):
            res.output(state, i, f(norms[i](res.input(state, i))))
        return res.readout(state).square().mean()

    def run(fn):
        x = emb.clone().requires_grad_()
        fn(x).backward()
        params = [*res.parameters(), *sublayers.parameters(), *norms.parameters()]
        got = [x.grad, *[p.grad.clone() for p in params]]
        for p in params:
            p.grad = None
        return got

    eager = run(step)
    # eager: 4 sublayer inputs take a pending add, 2 more merge a partial summary without one
    assert (len(calls), len(norm_calls)) == (4, 2)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    # traced once through the stand-ins, or not at all with phase 2 as torch code
    assert (len(calls), len(norm_calls)) == ((4, 2) if phase2_inductor else (8, 4))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_pending_add_is_made_by_any_reader_of_the_partial_summary():
    a, b = torch.randn(2, D), torch.randn(2, D)
    state = ResidualState(sources=[a], partial=a)
    state.defer_add(b)
    assert state.add_pending and state.partial is not None and torch.equal(state.partial, a + b)
    assert not state.add_pending and state.take_add() is None
    state.defer_add(a)
    prev, addend = state.take_add()
    assert prev is not a and torch.equal(prev, a + b) and addend is a and not state.add_pending
    with pytest.raises(RuntimeError, match="no addition pending"):
        state.defer_add(a)
        state.defer_add(a)
    with pytest.raises(RuntimeError, match="needs a partial summary"):
        ResidualState(sources=[a]).defer_add(b)


# ----------------------------------------------------------------------------- the structure


def test_make_residual_builds_the_class_named_for_each_mode_with_the_checkpoint_names():
    from attnres.residual import BlockAttnRes, FullAttnRes, StandardResidual

    kinds = {"standard": StandardResidual, "full": FullAttnRes, "block": BlockAttnRes}
    for mode, cls in kinds.items():
        res = make_residual(mode, D, 4, num_blocks=2)
        assert type(res) is cls and res.mode == mode
        # checkpoints (DCP, safetensors) name the depth queries by sublayer index: the layout's names
        names = [] if mode == "standard" else [f"queries.{n}.{p}" for n in [*"0123", "out"]
                                                 for p in ("weight", "norm_weight")]
        assert list(res.state_dict()) == names
    assert (make_residual("block", D, 8, 2).block_size, make_residual("full", D, 8).block_size) == (4, 1)
    with pytest.raises(TypeError):
        Residual(D, 4, 0, 0)  # the interface alone computes nothing


def test_a_state_built_by_keyword_starts_a_stage_and_knows_its_device():
    # a pipeline stage builds the state it receives from the handed-over fields alone
    emb = torch.randn(1, 2, D)
    assert ResidualState(hidden=emb).device == emb.device
    state = ResidualState(sources=[emb], partial=None)
    assert state.device == emb.device and state.records is None and state._pending is None
    assert ResidualState(partial=emb).device == emb.device


@pytest.mark.parametrize(("mode", "recompute"), [("block", False), ("block", True), ("full", False)])
def test_rmsnorm_of_a_depth_input_equals_the_norm_of_its_tensor(mode, recompute, monkeypatch):
    """A :class:`DepthInput` (the input left for the norm to finish: fused here through the reference
    standing in for the CUDA kernel, or recomputed) normalises to the same bits as its plain ``h``."""
    from attnres import ops
    from attnres.model.norm import RMSNorm

    monkeypatch.setattr(ops, "fused_norm", lambda device: True)
    monkeypatch.setattr(ops, "phase2_norm", _phase2_norm_standin)
    res = make_residual(mode, D, 4, num_blocks=1, eps=EPS, recompute=recompute).double()
    randomise_queries(res)
    norm = RMSNorm(D).double()
    sublayers = make_stack(4)
    state = res.begin(torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True))
    lazy = 0
    for i, f in enumerate(sublayers):
        h = res.input(state, i)
        if isinstance(h, DepthInput):
            lazy += 1
            assert torch.equal(norm(h), norm(h.tensor()))
            h = h.tensor()
        res.output(state, i, f(h))
    # recompute: every input is lazy (phase 1 again in backward); fused: those with a merge left
    assert lazy == {("block", True): 4, ("block", False): 3, ("full", False): 2}[mode, recompute]
    with torch.no_grad():  # without gradients nothing is kept for a recompute: plain tensors
        state = res.begin(torch.randn(2, 3, D, dtype=torch.float64))
        assert isinstance(res.input(state, 0), torch.Tensor)


def test_the_op_layer_and_the_residual_path_import_nothing_from_the_model():
    """csrc <- ops, reference <- residual <- model: no import upward, at module level or in a function."""
    import ast
    from pathlib import Path

    import attnres

    root = Path(attnres.__file__).parent
    for path in [root / "ops.py", root / "reference.py", *sorted((root / "residual").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("attnres.model", "lightning", "jsonargparse")) for n in names), path
