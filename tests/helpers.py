"""Helpers shared by the CPU and GPU tests of packed documents (``tests/test_documents.py`` and
``tests/gpu/test_documents_fla_gpu.py``): where the documents of a packed window are, and the packed
window against each document run alone; a stand-in for fla's kernels on a CPU (:func:`fake_fla`); and
the nested compile regions of a compiled decoder (:func:`nested_region_calls`, ``tests/test_model.py``
and ``tests/gpu/test_kda_fla_gpu.py``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn


def documents_of(segment_ids: Tensor) -> list[tuple[int, slice]]:
    """``(row, slice)`` of every document (contiguous run of one id) of ``segment_ids [B, T]``."""
    out = []
    for b, row in enumerate(segment_ids.cpu()):
        for s in row.unique():
            idx = (row == s).nonzero().flatten()
            out.append((b, slice(int(idx[0]), int(idx[-1]) + 1)))
    return out


def packed_and_alone(
    model: nn.Module, ids: Tensor, segment_ids: Tensor, w: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The logits ``[B, T, V]`` of the packed window ``ids [B, T]`` and of each document run alone (placed
    where it sits in the window), and the parameter gradients of ``(packed logits * w).sum()``; on return the
    model's ``.grad`` hold the gradients of the same objective over the documents run alone."""
    packed = model(ids, segment_ids=segment_ids).logits
    (packed * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone = torch.zeros_like(packed)
    total = 0.0
    for b, sl in documents_of(segment_ids):
        logits = model(ids[b:b + 1, sl]).logits[0]
        alone[b, sl] = logits.detach()
        total = total + (logits * w[b, sl]).sum()
    total.backward()
    return packed.detach(), alone, grads


def fake_fla(monkeypatch, calls: list) -> None:
    """Stand in for fla (no Triton here): ``chunk_kda`` and ``causal_conv1d`` with fla's documented varlen
    contract (``[1, N, ...]`` inputs, sequence ``i`` is ``cu_seqlens[i]:cu_seqlens[i + 1]``, each from a
    zero state), computed per sequence by our recurrence and ``F.conv1d``; records each call's
    ``cu_seqlens``. ``chunk_kda``'s in-kernel options, ``rms_norm_gated``, ``rms_norm``,
    ``swiglu_linear`` and ``cross_entropy_loss`` compute what fla's docstrings state, in plain torch
    (checked against fla's Triton kernels under Triton's CPU interpreter, ``benchmarks/e2e_notes.md``
    session 18)."""
    import sys
    import types

    import torch.nn.functional as F

    from attnres.model.kda import kda_recurrent

    def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, cu_seqlens_cpu=None, A_log=None, dt_bias=None,
                  use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                  **kwargs):
        calls.append(None if cu_seqlens is None else cu_seqlens.tolist())
        # fla's in-kernel options as its docstring states them (fla's KDA layer passes all three)
        if use_qk_l2norm_in_kernel:
            q, k = (t / (t.float().pow(2).sum(-1, keepdim=True) + 1e-6).sqrt().to(t.dtype) for t in (q, k))
        if use_gate_in_kernel:
            H, K = g.shape[-2:]
            g = -A_log.float().exp()[:, None] * F.softplus(g.float() + dt_bias.float().view(H, K))
        if use_beta_sigmoid_in_kernel:
            beta = torch.sigmoid(beta.float())
        if cu_seqlens is None:
            return kda_recurrent(q, k, v, g, beta, scale, initial_state)
        assert q.shape[0] == 1 and initial_state is None and not output_final_state
        assert torch.equal(cu_seqlens_cpu, cu_seqlens.cpu())
        bounds = cu_seqlens.tolist()
        o = torch.cat([kda_recurrent(*(t[:, a:b] for t in (q, k, v, g, beta)), scale)[0]
                       for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
        return o, None

    def causal_conv1d(x, weight, bias=None, activation=None, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
        calls.append(("conv", None if cu_seqlens is None else cu_seqlens.tolist()))
        assert activation == "silu" and bias is None
        W, xt = weight.shape[1], x.transpose(1, 2)
        if cu_seqlens is None:  # every row of [B, T, C] from zeros
            y = F.conv1d(F.pad(xt, (W - 1, 0)), weight.unsqueeze(1), groups=x.shape[2])
            return F.silu(y.transpose(1, 2)), None
        assert x.shape[0] == 1
        bounds = cu_seqlens.tolist()
        pieces = [F.conv1d(F.pad(xt[..., a:b], (W - 1, 0)), weight.unsqueeze(1), groups=x.shape[2])
                  for a, b in zip(bounds[:-1], bounds[1:])]
        return F.silu(torch.cat(pieces, dim=-1).transpose(1, 2)), None

    def rms(x, weight, eps):  # fp32, as fla's norm kernels compute it
        return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight.float()

    def rms_norm_gated(x, g, weight, bias, activation="swish", eps=1e-6, **kwargs):
        assert activation == "sigmoid" and bias is None
        return (rms(x, weight, eps) * torch.sigmoid(g.float())).to(x.dtype)

    def swiglu_linear(x, y, weight, bias):
        return F.linear(F.silu(x) * y, weight, bias)

    def cross_entropy_loss(logits, target, ignore_index=-100, **kwargs):
        losses = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
        return losses, torch.zeros_like(losses)

    def fla_rms_norm(x, weight, bias=None, residual=None, eps=1e-5, **kwargs):
        assert bias is None and residual is None
        return rms(x, weight, eps).to(x.dtype)

    kda_mod = types.ModuleType("fla.ops.kda")
    kda_mod.chunk_kda, kda_mod.fused_recurrent_kda = chunk_kda, chunk_kda
    conv_mod = types.ModuleType("fla.modules.causal_conv1d")
    conv_mod.causal_conv1d = causal_conv1d
    for name in ("fla", "fla.ops", "fla.modules"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.kda", kda_mod)
    monkeypatch.setitem(sys.modules, "fla.modules.causal_conv1d", conv_mod)
    norm_mod = types.ModuleType("fla.modules.fused_norm_gate")
    norm_mod.rms_norm_gated = rms_norm_gated
    monkeypatch.setitem(sys.modules, "fla.modules.fused_norm_gate", norm_mod)
    act_mod = types.ModuleType("fla.modules.activations")
    act_mod.swiglu_linear = swiglu_linear
    monkeypatch.setitem(sys.modules, "fla.modules.activations", act_mod)
    ln_mod = types.ModuleType("fla.modules.norm.layernorm")
    ln_mod.rms_norm = fla_rms_norm
    monkeypatch.setitem(sys.modules, "fla.modules.norm", types.ModuleType("fla.modules.norm"))
    monkeypatch.setitem(sys.modules, "fla.modules.norm.layernorm", ln_mod)
    ce_mod = types.ModuleType("fla.modules.fused_cross_entropy")
    ce_mod.cross_entropy_loss = cross_entropy_loss
    monkeypatch.setitem(sys.modules, "fla.modules.fused_cross_entropy", ce_mod)


def nested_region_calls(model: nn.Module, *args: Any, graphs: list | None = None, **kwargs: Any
                        ) -> tuple[Any, Counter]:
    """``model.compile_nested(fullgraph=True)(*args, **kwargs)`` through a backend that keeps Dynamo's graph
    (aot_eager runs it): the output, and how many times that one graph calls each nested compile region.
    ``graphs``: a list that receives Dynamo's graph module."""
    from torch._dynamo.backends.debugging import aot_eager

    def capture(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    graphs = [] if graphs is None else graphs
    torch._dynamo.reset()
    out = model.compile_nested(backend=capture, fullgraph=True)(*args, **kwargs)
    assert len(graphs) == 1
    return out, Counter(n.args[0].target for n in graphs[0].graph.nodes
                        if n.op == "call_function" and n.target is torch.ops.higher_order.invoke_subgraph)
