"""The paper's cross-stage caching: pack/unpack against torch.cat/split, opcheck, the
StageCache plan and its invariant, and the analytic byte counts with and without the cache."""

from __future__ import annotations

import pytest
import torch

from attnres import ops
from attnres.ops import pack, unpack
from attnres.parallel.stage_cache import StageCache, StageLayout

needs_ext = pytest.mark.skipif(ops.extension_error is not None, reason="attnres._C is not built")


@needs_ext
@pytest.mark.parametrize("device,key", [("cpu", "CPU"), ("cuda", "CUDA")])
def test_pack_kernels_are_where_the_depth_kernels_are(device, key):
    # one kernel-presence table (ops.backend) serves every op: pack/unpack are built with the depth ops
    for op in ("attnres::pack", "attnres::unpack"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        assert has == (ops.backend(device) == "compiled"), (op, device)


def _tensors(dtype=torch.float32, requires_grad=False):
    shapes = [(2, 3, 8), (2, 3, 8), (5,), (1, 7)]
    return [torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pack_unpack_roundtrip_matches_cat(dtype):
    ts = _tensors(dtype)
    ts[1] = ts[1].transpose(0, 1)  # non-contiguous input
    buf = pack(ts)
    assert buf.shape == (sum(t.numel() for t in ts),) and buf.dtype == dtype
    torch.testing.assert_close(buf, torch.cat([t.reshape(-1) for t in ts]), rtol=0, atol=0)
    outs = unpack(buf, [t.shape for t in ts])
    for o, t in zip(outs, ts):
        assert o.shape == t.shape and o.is_contiguous()
        torch.testing.assert_close(o, t, rtol=0, atol=0)
    assert all(o.data_ptr() != buf.data_ptr() for o in outs)  # copies, not views of the buffer


def test_pack_unpack_gradients_are_each_others_inverse():
    ts = _tensors(torch.float64, requires_grad=True)
    w = torch.randn(sum(t.numel() for t in ts), dtype=torch.float64)
    (pack(ts) * w).sum().backward()
    torch.testing.assert_close(torch.cat([t.grad.reshape(-1) for t in ts]), w)
    buf = torch.randn(w.numel(), dtype=torch.float64, requires_grad=True)
    outs = unpack(buf, [t.shape for t in ts])
    (outs[0].sum() * 2 + outs[2].sum()).backward()  # outs[1] and outs[3] unused: zero gradient
    scale = [2.0, 0.0, 1.0, 0.0]
    expect = torch.cat([torch.full((t.numel(),), g, dtype=torch.float64) for t, g in zip(ts, scale)])
    torch.testing.assert_close(buf.grad, expect)
    assert torch.autograd.gradcheck(lambda *x: pack(list(x)), [t.detach().requires_grad_() for t in ts[2:]])


@needs_ext
def test_pack_unpack_opcheck():
    ts = _tensors(requires_grad=True)
    torch.library.opcheck(torch.ops.attnres.pack.default, (ts,))
    buf = torch.randn(sum(t.numel() for t in ts), requires_grad=True)
    torch.library.opcheck(torch.ops.attnres.unpack.default, (buf, [list(t.shape) for t in ts]))


@needs_ext
def test_pack_under_torch_compile():
    ts = _tensors()
    fn = torch.compile(
        lambda a, b: unpack(pack([a, b]) * 2, [a.shape, b.shape]), backend="aot_eager", fullgraph=True
    )
    a, b = fn(ts[0], ts[2])
    torch.testing.assert_close(a, ts[0] * 2)
    torch.testing.assert_close(b, ts[2] * 2)


def test_pack_unpack_reject_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        pack([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one"):
        pack([])
    with pytest.raises(ValueError, match="hold 5 elements but the buffer has 6"):
        unpack(torch.zeros(6), [[5]])
    with pytest.raises(ValueError, match="1-D"):
        unpack(torch.zeros(2, 3), [[6]])


# ----------------------------------------------------------------------------- the plan


def _interleaved(num_layers, block_size, ranks, virtual):
    """Looped layout: stage k on rank k % ranks, layers split evenly over ranks * virtual stages."""
    stages = ranks * virtual
    per = [2 * (num_layers // stages + (1 if k < num_layers % stages else 0)) for k in range(stages)]
    return StageLayout.build(per, block_size, [k % ranks for k in range(stages)])


def _simulate(layout, enabled, microbatches=3):
    """Run the cache logic of every rank through a forward and a backward of each microbatch (no
    tensors), counting sends as the pipeline stages do; return the caches, one per rank."""
    caches = {r: StageCache(layout, r, enabled) for r in set(layout.stage_rank)}
    source_bytes = 100
    for mb in range(microbatches):
        for k in range(layout.num_stages):
            cache = caches[layout.stage_rank[k]]
            if k > 0:  # what this stage holds: cached + received covers every source before it
                have = cache.cached_ids(k) + cache.recv_ids(k)
                assert have == list(range(layout.sources_before(k)))
                assert not set(cache.cached_ids(k)) & set(cache.recv_ids(k))
            if k < layout.num_stages - 1:
                cache.count(mb, "forward", k, cache.payload_sources(k) * source_bytes)
        for k in reversed(range(layout.num_stages - 1)):
            sender = caches[layout.stage_rank[k + 1]]
            sender.count(mb, "backward", k, sender.payload_sources(k) * source_bytes)
    return caches


@pytest.mark.parametrize("ranks,virtual", [(2, 1), (4, 1), (2, 2), (4, 2), (2, 3)])
@pytest.mark.parametrize("block_size", [1, 2, 4, 6])
def test_each_summary_crosses_each_link_at_most_once(ranks, virtual, block_size):
    layout = _interleaved(12, block_size, ranks, virtual)
    on = _simulate(layout, enabled=True)
    off = _simulate(layout, enabled=False)
    assert max(c.max_crossings() for c in on.values()) == 1
    per_dir = {d: sum(c.bytes_per_microbatch()[d] for c in on.values()) for d in ("forward", "backward")}
    base = {d: sum(c.bytes_per_microbatch()[d] for c in off.values()) for d in ("forward", "backward")}
    assert per_dir["forward"] == per_dir["backward"] == on[0].analytic_bytes(100)
    assert base["forward"] == base["backward"] == off[0].analytic_bytes(100)
    if virtual == 1:  # one stage per rank: caching changes nothing
        assert per_dir == base
    else:  # a microbatch comes back to a rank: strictly fewer bytes, and without the cache repeats
        assert per_dir["forward"] < base["forward"]
        assert max(c.max_crossings() for c in off.values()) > 1


def test_analytic_counts_of_a_known_layout():
    # 8 decoder layers = 16 sublayers, blocks of 4 sublayers, 2 ranks x 2 virtual stages of 2 layers:
    # sources after each stage: b0,b1 | b2 | b3 | b4; no boundary is inside a block.
    layout = _interleaved(8, 4, 2, 2)
    assert layout.sources_after == (2, 3, 4, 5) and layout.partial_after == (False,) * 4
    on, off = StageCache(layout, 0, True), StageCache(layout, 0, False)
    assert [on.send_ids(k) for k in range(3)] == [[0, 1], [2], [3]]
    assert [off.send_ids(k) for k in range(3)] == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert on.analytic_bytes(1) == 4 and off.analytic_bytes(1) == 9
    assert on.keep_ids(0) == [0, 1] and on.cached_ids(2) == [0, 1] and on.recv_ids(2) == [2]
    assert StageCache(layout, 1, True).keep_ids(1) == [0, 1, 2] and on.keep_ids(2) == []
    # a boundary inside a block carries the partial summary: 6 layers, blocks of 6 sublayers,
    # stages of 2, 2, 1, 1 layers (4, 4, 2, 2 sublayers)
    layout = _interleaved(6, 6, 2, 2)
    assert layout.partial_after == (True, True, True, False) and layout.sources_after == (1, 2, 2, 3)
    on = StageCache(layout, 0)
    assert [on.payload_sources(k) for k in range(3)] == [2, 2, 1]  # b0+p | b1+p (rank 0 has b0) | p
    # the standard residual sends the hidden state at every boundary
    layout = _interleaved(8, 0, 2, 2)
    assert layout.hidden and StageCache(layout, 0).analytic_bytes(1) == 3


def test_cache_put_get_and_gradients():
    layout = _interleaved(8, 4, 2, 2)
    cache = StageCache(layout, 0)
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    cache.put(0, [0], [y])
    (leaf,) = cache.get(0, [0])
    assert leaf.is_leaf and leaf.requires_grad
    (leaf.sum() * 3).backward()
    (leaf * 1).sum().backward()  # a second reading stage accumulates
    (g,) = cache.pop_grads(0, [0])
    torch.testing.assert_close(g, torch.full((3,), 4.0))
    assert cache.num_cached() == 0
    with pytest.raises(RuntimeError, match="not cached"):
        cache.get(0, [0])
    with pytest.raises(ValueError, match="at least one sublayer"):
        StageLayout.build([2, 0], 2, [0, 1])
