"""Channel mixers: the dense SwiGLU MLP and the Mixture-of-Experts layer (Kimi Linear / DeepSeek-V3
routing).

Router: ``scores = sigmoid(x W_r^T)`` in fp32; experts picked by top-k of ``scores + bias`` where
``bias`` is a buffer moved outside the gradient toward balanced load (auxiliary-loss-free
balancing); the weights are the *unbiased* scores of the picked experts, renormalised to sum 1 and
multiplied by ``routed_scaling_factor``. Shared experts always run, unscaled. Optionally a
sequence-level balance loss (DeepSeek-V3's ``L_Bal``).

Expert compute: the ``T * k`` (token, expert) pairs are sorted by expert so that each expert's
tokens are one contiguous slice; the experts' weights are stacked ``[E, ...]``. On CUDA in bf16 two
``torch._grouped_mm`` run all experts (gate and up as one, then down); elsewhere a loop over experts
(never over tokens) runs one GEMM per non-empty slice. Into and out of that order only gathers run
(``_Dispatch``, ``_Combine``, both ways), through the sort's permutation and its inverse: no
``index_add_``, whose atomics serialise the k slots of a token and make the sum's order (in bf16) vary
from run to run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.hardware import torch_at_least
from attnres.model import moe_kernels
from attnres.model.backends import fla_available, fla_runs
from attnres.model.projections import joint_linear

__all__ = ["MoE", "SwiGLU", "grouped_swiglu"]


class SwiGLU(nn.Module):
    """``down(silu(gate x) * up x)``: ``[..., dim] -> [..., dim]``.

    ``backend`` (the config's ``fused_backend``): where fla runs (:func:`attnres.model.backends.fla_runs`:
    ``auto`` on CUDA with fla installed), eager forwards take fla's ``swiglu_linear`` (fla's own MLP's
    fused path): ``silu(gate) * up`` in one Triton kernel, fed to the down projection and recomputed in the
    backward, which keeps only ``gate x`` and ``up x`` (the plain code also keeps ``silu(gate x)`` and the
    product).
    Under ``torch.compile`` Inductor fuses the plain code instead. ``gate x`` and ``up x`` come from one GEMM
    (:func:`attnres.model.projections.joint_linear`)."""

    def __init__(self, dim: int, hidden: int, backend: str = "auto") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.backend = backend
        self.fla_installed = backend != "torch" and fla_available()

    def forward(self, x: Tensor) -> Tensor:
        gate, up = joint_linear(x, self.gate_proj, self.up_proj)
        if fla_runs(self.backend, self.fla_installed, x.device) and not torch.compiler.is_compiling():
            from fla.modules.activations import swiglu_linear

            return swiglu_linear(gate, up, self.down_proj.weight, None)
        return self.down_proj(F.silu(gate) * up)


def grouped_mm_runs(x: Tensor, *weights: Tensor) -> bool:
    """Whether :func:`grouped_swiglu` takes ``torch._grouped_mm`` for input ``x`` and these expert weights
    (CUDA, sm90+, bf16 after autocast's cast, dims divisible by 8): no host-side split of the tokens, so
    no graph break under ``torch.compile``."""
    autocast = cuda_autocast_dtype(x)
    return grouped_mm_supported(x.device, weights, autocast or x.dtype, autocast)


def cuda_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype CUDA autocast casts ``x``'s matmuls to, or None (``x`` off CUDA, or autocast off)."""
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else None


# MoE.mix holds autograd.Functions (_RouterLogits, _Dispatch, _Combine), which Dynamo traces as higher-order
# ops with their forward and backward as subgraphs; torch 2.11's nested compile regions fail on those when
# a region is called again (KeyError 'example_value' in are_same_graph_modules; H100, session 25), torch
# 2.13 traces them (a CPU check). Below this version the MoE stays out of the regions of compile: nested.
MIX_REGION_MIN_TORCH = (2, 13)


def mix_region_supported() -> bool:
    """Whether this torch can hold :meth:`MoE.mix` in a nested compile region
    (:data:`MIX_REGION_MIN_TORCH`)."""
    return torch_at_least(MIX_REGION_MIN_TORCH)


def grouped_mm_supported(device: torch.device, weights: Sequence[Tensor], input_dtype: torch.dtype,
                         autocast: torch.dtype | None = None) -> bool:
    """:func:`grouped_mm_runs`'s test from dtypes, before any input exists (:meth:`MoE.mix_region_runs`):
    whether ``torch._grouped_mm`` runs on ``device`` for an input of ``input_dtype`` (as the GEMM sees it)
    and these expert weights, cast to ``autocast`` (None: their own dtype): CUDA, sm90+, bf16, dims
    divisible by 8."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm") or input_dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all((autocast or w.dtype) == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
               for w in weights)


def grouped_swiglu(
    x: Tensor, counts: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
    use_grouped_mm: bool | None = None,
) -> Tensor:
    """SwiGLU experts over tokens sorted by expert.

    x: ``[N, d]`` with expert ``e``'s tokens in rows ``offsets[e-1] .. offsets[e]``; counts: ``[E]``
    tokens per expert; w_gate, w_up: ``[E, h, d]``; w_down: ``[E, d, h]``. Returns ``[N, d]``.
    ``use_grouped_mm``: None picks ``torch._grouped_mm`` where it runs (:func:`grouped_mm_runs`). The gate
    and up projections run as one grouped GEMM over their weights side by side (``[E, 2h, d]``): ``x`` read
    once, one input-gradient GEMM in backward instead of two and the sum of their ``[N, d]`` outputs; in
    eager mode on CUDA the activation runs on that joint output as one Triton kernel each way
    (:func:`attnres.model.moe_kernels.packed_swiglu`).
    """
    if (dt := cuda_autocast_dtype(x)) is not None:
        # bf16-mixed training: fp32 weights and residual stream; compute in autocast's dtype, as
        # nn.Linear would (torch._grouped_mm has no autocast rule, and needs bf16)
        x, w_gate, w_up, w_down = (t.to(dt) for t in (x, w_gate, w_up, w_down))
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_runs(x, w_gate, w_up, w_down)
    if use_grouped_mm:
        offs = counts.cumsum(0).to(torch.int32)
        w_gate_up = torch.cat([w_gate, w_up], dim=1)
        gate_up = torch._grouped_mm(x, w_gate_up.transpose(-2, -1), offs=offs)
        if not torch.compiler.is_compiling() and _triton_takes(gate_up):  # eager: one Triton kernel each way
            act = moe_kernels.packed_swiglu(gate_up)
        else:  # Inductor fuses the same
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return torch._grouped_mm(act, w_down.transpose(-2, -1), offs=offs)
    # unbind once: indexing w[e] per expert would give every expert a full-size [E, ...] gradient buffer
    gates, ups, downs = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    pieces = []
    for e, xe in enumerate(x.split(counts.tolist())):
        if xe.shape[0]:
            pieces.append((F.silu(xe @ gates[e].t()) * (xe @ ups[e].t())) @ downs[e].t())
    return torch.cat(pieces) if pieces else x.new_zeros(x.shape)


class _Dispatch(torch.autograd.Function):
    """``x [N, d]`` -> each token's ``k`` copies in the expert-sorted order ``[N k, d]`` (row ``r`` is token
    ``order[r] // k``). Backward gathers each token's ``k`` gradient rows back through ``inv`` (the inverse
    of ``order``) and sums them: no scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inv,) = ctx.saved_tensors
        return _gather_sum(grad, inv.view(-1, ctx.k)), None, None, None


def _gather_sum(src: Tensor, index: Tensor, weights: Tensor | None = None) -> Tensor:
    """``out[t] = sum_s weights[t, s] src[index[t, s]]`` for ``index [N, k]`` (weights None: 1), in ``src``'s
    dtype, the weights rounded to it, accumulated in fp32 (or ``src``'s dtype, if wider). Eager on CUDA:
    one Triton kernel (:mod:`attnres.model.moe_kernels`: gather, weigh and sum in one pass, no ``[N, k, d]``
    temporary); elsewhere ``F.embedding_bag`` (the same in one call; its CUDA kernel is slow); under
    ``torch.compile``: the gather, products and sum, which Inductor fuses into one kernel."""
    if torch.compiler.is_compiling():
        acc = torch.promote_types(src.dtype, torch.float32)
        rows = src[index].to(acc)
        if weights is not None:
            rows = rows * weights.to(src.dtype).to(acc).unsqueeze(-1)
        return rows.sum(1).to(src.dtype)
    if _triton_takes(src):
        return moe_kernels.gather_sum(src, index, weights)
    return F.embedding_bag(index, src, mode="sum",
                           per_sample_weights=None if weights is None else weights.to(src.dtype))


def _row_dots(src: Tensor, index: Tensor, vec: Tensor) -> Tensor:
    """``out[t, s] = <vec[t], src[index[t, s]]>`` for ``index [N, k]``, ``vec [N, d]`` in ``src``'s dtype:
    ``[N, k]`` in that dtype, accumulated in fp32 (or wider). Eager on CUDA: one Triton kernel
    (:mod:`attnres.model.moe_kernels`); elsewhere the kernel behind ``embedding_bag``'s gradient of its
    per-sample weights (one pass over the gathered rows), or where that kernel lacks the dtype (bf16 on
    CUDA without triton) a gather and a batched ``[k, d] @ [d, 1]`` matmul; under ``torch.compile``: the
    gather, products and sum, which Inductor fuses."""
    N, k = index.shape
    if torch.compiler.is_compiling():
        acc = torch.promote_types(src.dtype, torch.float32)
        rows = src[index].to(acc)
        return (rows * vec.to(acc).unsqueeze(1)).sum(2).to(src.dtype)
    if _triton_takes(src):
        return moe_kernels.row_dots(src, index, vec.to(src.dtype))
    if not _per_sample_kernel_takes(src):  # a batched [k, d] @ [d, 1] (cuBLAS accumulates in fp32)
        return torch.bmm(src[index], vec.to(src.dtype).unsqueeze(2)).view(N, k)
    offsets = torch.arange(0, N * k, k, device=index.device)
    bag = torch.arange(N * k, device=index.device) // k  # bag t holds slots t k .. t k + k - 1
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        vec.contiguous(), src, index.reshape(-1), offsets, bag, 0, -1).view(N, k)  # mode 0: sum


def _triton_takes(src: Tensor) -> bool:
    """Whether the eager MoE runs :mod:`attnres.model.moe_kernels` on ``src``: CUDA with triton, a dtype that
    fp32 accumulation covers, and an sm80+ GPU (Triton's bf16)."""
    narrow = src.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return src.is_cuda and narrow and moe_kernels.available() and moe_kernels.capable(src.device)


def _per_sample_kernel_takes(src: Tensor) -> bool:
    """Whether ``embedding_bag``'s per-sample-weight gradient kernel runs in ``src``'s dtype on its device:
    the CUDA kernel takes fp32, fp64 and fp16 but not bf16 (torch 2.11-2.13)."""
    return not (src.is_cuda and src.dtype == torch.bfloat16)


class _Combine(torch.autograd.Function):
    """Expert outputs in the sorted order ``y [N k, d]`` and the routing weights ``w [N, k]`` ->
    ``out [N, d] = sum_s w[t, s] y[inv[t k + s]]``, in ``y``'s dtype, the weights rounded to it and the
    k products summed in fp32 (or ``y``'s dtype, if wider): :func:`_gather_sum` (eager, one Triton kernel
    on CUDA, ``embedding_bag`` elsewhere; compiled, one Inductor kernel). Backward: ``dy[r] = w[t, s]
    grad[t]`` for the row ``r = inv[t k + s]`` (the same gather-and-weigh, one row per bag), ``dw[t, s] =
    <grad[t], y[inv[t k + s]]>`` (:func:`_row_dots`)."""

    @staticmethod
    def forward(ctx, y: Tensor, w: Tensor, order: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(y, w, order, inv)
        return _gather_sum(y, inv.view(w.shape), w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        y, w, order, inv = ctx.saved_tensors
        grad = grad.to(y.dtype)
        dy = dw = None
        if ctx.needs_input_grad[0]:  # sorted row r is token order[r] // k's slot order[r] % k
            dy = _gather_sum(grad, (order // w.shape[1]).unsqueeze(1), w.flatten()[order].unsqueeze(1))
        if ctx.needs_input_grad[1]:
            dw = _row_dots(y, inv.view(w.shape), grad).to(w.dtype)
        return dy, dw, None, None


def _bf16_pair(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)``, two bf16 tensors whose fp32 sum is ``t`` to ~16 significant bits (fp32 has 24)."""
    t = t.float()
    hi = t.bfloat16()
    return hi, (t - hi.float()).bfloat16()


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two bf16 matrices with fp32 products and sums, returned in fp32: one tensor-core GEMM
    on CUDA (``mm`` with ``out_dtype``, no fp32 copy of either operand); elsewhere on fp32 copies."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def router_split_runs(x: Tensor) -> bool:
    """Whether :class:`_RouterLogits` runs its fp32 products as bf16 GEMMs of split operands: bf16 input
    on CUDA (``torch.mm`` with ``out_dtype`` is CUDA-only)."""
    return x.is_cuda and x.dtype == torch.bfloat16


class _RouterLogits(torch.autograd.Function):
    """``x @ weight.T`` in fp32 (the router's logits) that keeps ``x`` as it comes for the backward, not its
    fp32 copy: under bf16 autocast the MoE input is bf16, so the copy is exact to remake, and the shared
    experts keep ``x`` anyway (a ``[tokens, d]`` fp32 tensor less per MoE layer; 134 MB at ``medium``'s
    8 x 4096 tokens). Off :func:`router_split_runs`, forward and backward run the same fp32 matmuls as
    ``F.linear(x.float(), weight.float())``.

    With a bf16 ``x`` on CUDA those fp32 matmuls were SIMT GEMMs on fp32 copies of ``x`` (H100, ``medium``
    compiled: 5.6 ms a step in three fp32 GEMMs, beside the copies; session 27). There the fp32 operand
    is split into two bf16 parts (``w = w_hi + w_lo``, ~16 significant bits) and every product runs on
    the tensor cores with fp32 sums, reading ``x`` in bf16: the logits ``x [w_hi; w_lo]^T`` (one GEMM,
    the halves added), ``dx = [g_hi, g_hi, g_lo] [w_hi; w_lo; w_hi]`` (rounded to bf16 once, as the fp32
    path rounds it; the ``g_lo w_lo`` term is below that rounding), ``dw = [g_hi; g_lo]^T x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        if not router_split_runs(x):
            return x.float() @ weight.float().t()
        if x.dim() != 2:
            raise ValueError(f"the router takes tokens as rows [N, d], got x of shape {tuple(x.shape)}")
        e = weight.shape[0]
        y = _mm_f32(x, torch.cat(_bf16_pair(weight)).t())
        return y[:, :e] + y[:, e:]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        if not router_split_runs(x):
            dx = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = (grad.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
            return dx, dw
        e = weight.shape[0]
        g_hi, g_lo = _bf16_pair(grad)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_hi, w_lo = _bf16_pair(weight)
            dx = torch.cat([g_hi, g_hi, g_lo], 1) @ torch.cat([w_hi, w_lo, w_hi])
        if ctx.needs_input_grad[1]:
            dw2 = _mm_f32(torch.cat([g_hi, g_lo], 1).t(), x)
            dw = (dw2[:e] + dw2[e:]).to(weight.dtype)
        return dx, dw


class MoE(nn.Module):
    """Routed SwiGLU experts (top-k of E) plus shared experts: ``[B, T, d] -> ([B, T, d], aux loss)``.

    Buffers: ``score_bias [E]`` (the balancing bias, fp32, part of the checkpoint) and
    ``tokens_per_expert [E]`` (routed token counts accumulated over training forwards since the last
    :meth:`update_bias`; not checkpointed). Under data parallelism, all-reduce ``tokens_per_expert``
    across ranks before :meth:`update_bias` so that every rank moves its bias the same way.
    ``backend``: the shared experts' :class:`SwiGLU` backend.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, expert_dim: int, num_shared_experts: int = 1,
        routed_scaling_factor: float = 1.0, bias_update_rate: float = 1e-3, aux_loss_coef: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.bias_update_rate = bias_update_rate
        self.aux_loss_coef = aux_loss_coef
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, expert_dim, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, expert_dim, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, expert_dim))
        shared_dim = expert_dim * num_shared_experts
        self.shared = SwiGLU(dim, shared_dim, backend) if num_shared_experts > 0 else None
        self.register_buffer("score_bias", torch.zeros(num_experts, dtype=torch.float32))
        counts = torch.zeros(num_experts, dtype=torch.float32)
        self.register_buffer("tokens_per_expert", counts, persistent=False)
        self.last_load: Tensor | None = None  # fraction of routed slots per expert, last forward
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # keep the balancing state in fp32 under model.to(bf16): steps of 1e-3 vanish in bf16 near 1.0
        # and bf16 counts are not exact above 256
        kept = {name: self._buffers[name] for name in ("score_bias", "tokens_per_expert")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Experts Normal(0, std) (down projection ``out_std``); balancing bias and load counts 0."""
        self.score_bias.zero_()
        self.tokens_per_expert.zero_()
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=std if out_std is None else out_std)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ``[N, d]`` -> (expert ids ``[N, k]``, weights ``[N, k]`` fp32, scores ``[N, E]`` fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the linear in bf16
            scores = torch.sigmoid(_RouterLogits.apply(x, self.router.weight))
        idx = torch.topk(scores.detach() + self.score_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True) * self.routed_scaling_factor
        return idx, weights, scores

    def mix_region_runs(self, device: torch.device, input_dtype: torch.dtype,
                        autocast: torch.dtype | None = None) -> bool:
        """Whether ``Decoder.compile_nested`` runs :meth:`mix` as a nested compile region for an input of
        ``input_dtype`` on ``device`` (``autocast``: as :func:`grouped_mm_supported`): only where the experts
        run as grouped GEMMs (elsewhere, a CPU, fp16/fp32 or an sm80 GPU, they loop over a host-side split of
        the tokens, a graph break, which a region cannot hold) and on a torch whose regions hold its
        autograd functions (:func:`mix_region_supported`)."""
        return mix_region_supported() and grouped_mm_supported(
            device, (self.w_gate, self.w_up, self.w_down), input_dtype, autocast)

    def forward(self, x: Tensor, region: Callable | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, d] -> (out [B, T, d], the sequence balance loss)``; ``region``: a function that
        calls :meth:`mix` (``region(self, flat)``: a ``torch.compiler.nested_compile_region``, see
        ``Decoder.compile_nested``), else :meth:`mix` is called directly."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        out, idx, scores, counts = self.mix(flat) if region is None else region(self, flat)
        with torch.no_grad():  # outside mix: a compile region has no side effects
            self.last_load = counts.float() / counts.sum().clamp(min=1)
            if self.training:
                self.tokens_per_expert += counts.float()
        aux = self.sequence_aux_loss(idx.view(B, T, -1), scores.view(B, T, -1)) if self.aux_loss_coef > 0 \
            else flat.new_zeros((), dtype=torch.float32)
        return out.view(B, T, d), aux

    def mix(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The routed and shared experts of ``flat [N, d]``: ``(out [N, d], idx [N, k], scores [N, E],
        counts [E])``, no side effects."""
        idx, weights, scores = self.route(flat)
        # scatter_add, not bincount: bincount sizes its output from the data (a host sync on CUDA,
        # which also rules out CUDA-graph capture of a decode step)
        flat_idx = idx.flatten()
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=idx.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))
        # sort the (token, slot) pairs by expert: each expert's tokens become one contiguous slice
        order = torch.argsort(flat_idx, stable=True)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y = grouped_swiglu(_Dispatch.apply(flat, order, inv, self.top_k), counts, self.w_gate, self.w_up,
                           self.w_down)
        out = _Combine.apply(y, weights, order, inv)  # y (and out) are bf16 under autocast
        if self.shared is not None:
            out = out + self.shared(flat)
        return out, idx, scores, counts

    def sequence_aux_loss(self, idx: Tensor, scores: Tensor) -> Tensor:
        """DeepSeek-V3's sequence-wise balance loss ``coef * sum_e f_e P_e`` averaged over sequences:
        ``f_e = E / (k T) * #tokens routed to e``, ``P_e`` = mean over tokens of the scores
        normalised to sum 1. idx ``[B, T, k]``, scores ``[B, T, E]``."""
        B, T, _ = idx.shape
        hits = torch.zeros(B, self.num_experts, device=idx.device).scatter_add_(
            1, idx.reshape(B, -1), torch.ones(B, T * self.top_k, device=idx.device))
        f = hits * self.num_experts / (self.top_k * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.aux_loss_coef * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None, enabled: Tensor | None = None) -> None:
        """One balancing step: ``bias += rate * sign(mean(load) - load)`` (underloaded experts gain; no
        load, no change), from ``load [E]`` (default: the accumulated ``tokens_per_expert``), then reset
        the counts. ``enabled`` (a 0-dim bool tensor): the step is applied only where it is True, decided
        on the device (no host sync; a skipped optimizer step's loads are dropped all the same)."""
        load = self.tokens_per_expert if load is None else load.to(self.score_bias.device).float()
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.score_bias += step if enabled is None else step * enabled.to(step.dtype)
        self.tokens_per_expert.zero_()

    def extra_repr(self) -> str:
        e, h, d = self.w_gate.shape
        return f"experts={e}, top_k={self.top_k}, dim={d}, expert_dim={h}, scale={self.routed_scaling_factor}"


def output_init_std(std: float, num_layers: int) -> float:
    """GPT-2's scaled init of the projections that write into the residual path."""
    return std / math.sqrt(2 * num_layers)
