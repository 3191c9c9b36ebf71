"""Kimi Delta Attention (KDA): gated delta-rule linear attention with channel-wise decay.

Per head, with state ``S [K, V]``, per-channel decay ``alpha_t = exp(g_t)`` and write strength
``beta_t``::

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (q_t / sqrt(K))

Three implementations of that recurrence, all on ``[B, T, H, K]`` tensors (fla's layout):

* :func:`kda_recurrent` — token by token, the ground truth (and the decoding step on CPU);
* :func:`kda_chunked` — chunkwise parallel form (WY representation), our CPU training path;
* fla's Triton ``chunk_kda`` / ``fused_recurrent_kda`` on CUDA when fla is installed (imported lazily).

Chunkwise form. Inside a chunk let ``G_t = g_1 + ... + g_t`` (cumulative log decay, per channel) and
``S_0`` the state entering the chunk. Unrolling ``S_t = Diag(alpha_t) S_{t-1} + k_t u_t^T`` with the
"pseudo-value" ``u_t = beta_t (v_t - S_{t-1}^T Diag(alpha_t) k_t)`` gives
``S_t = Diag(e^{G_t}) S_0 + sum_{s<=t} Diag(e^{G_t - G_s}) k_s u_s^T``. Substituting back into ``u_t``
gives a unit lower-triangular system ``(I + A) U = Diag(beta) (V - (e^G * K) S_0)`` with
``A[t, s] = beta_t k_t^T Diag(e^{G_t - G_s}) k_s`` for ``s < t``. Hence ``U = U~ - W S_0`` with
``U~ = T V``, ``W = T (e^G * K)`` and ``T = (I + A)^{-1} Diag(beta)`` (the WY representation; all
chunks at once), then one short sequential pass over chunks carries the state::

    U   = U~ - W S
    O   = (e^G * Q) S + (Aqk masked to s <= t) U,   Aqk[t, s] = q_t^T Diag(e^{G_t - G_s}) k_s
    S   = Diag(e^{G_C}) S + (e^{G_C - G} * K)^T U

Every exponent is ``<= 0`` (decays only shrink), so nothing overflows however strong the decay: the
pairwise factors ``e^{G_t - G_s}`` are formed explicitly per chunk (``[C, C, K]``), which is why the
CPU path uses short chunks (16 by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.model import fla_ops
from attnres.model.backends import fla_available, fla_runs
from attnres.model.documents import DocumentMask
from attnres.model.norm import RMSNorm
from attnres.model.projections import joint_linear

__all__ = ["KimiDeltaAttention", "ShortConv", "kda_chunked", "kda_recurrent"]


def _compute_dtype(v: Tensor) -> torch.dtype:
    """fp32 for every activation dtype; fp64 kept (for gradient checks)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def kda_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    scale: float | None = None, initial_state: Tensor | None = None, segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token KDA. q, k, g: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``;
    g is the log decay (``<= 0``); initial_state: ``[B, H, K, V]`` (the state before the first token);
    segment_ids: ``[B, T]`` int, packed documents (:mod:`attnres.model.documents`): the state is reset
    to zero where the id changes, so no document reads another's state.
    Returns ``(o [B, T, H, V]`` in v's dtype, ``S [B, H, K, V]`` fp32)."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the einsums in bf16
        return _kda_recurrent(q, k, v, g, beta, scale, initial_state, segment_ids)


def _kda_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None,
    initial_state: Tensor | None, segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    ct = _compute_dtype(v)
    q, k, v, g, beta = (t.to(ct) for t in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t, :, None]
        if segment_ids is not None and t > 0:  # a document starts: forget the previous one's state
            S = S * (segment_ids[:, t] == segment_ids[:, t - 1]).to(ct)[:, None, None, None]
        S = S * g[:, t].exp().unsqueeze(-1)  # Diag(alpha_t) S
        pred = torch.einsum("bhk,bhkv->bhv", k_t, S)  # what the state already returns for k_t
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * (v[:, t] - pred))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), S


def kda_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    scale: float | None = None, initial_state: Tensor | None = None, chunk_size: int = 16,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise KDA (WY representation, see the module docstring); same arguments and results as
    :func:`kda_recurrent`. Computed in fp32; T need not be a multiple of ``chunk_size``.

    ``segment_ids [B, T]`` (packed documents) resets the state at each document start, inside a chunk
    too: the pairwise terms ``A``, ``Aqk`` keep only pairs of one document, the state entering a chunk
    reaches only the tokens of the document it belongs to (``carry``), and only the chunk's last
    document writes the state leaving it (``to_end``). The decay cumsum ``G`` runs across boundaries,
    but it enters only as differences within one document, so nothing is approximated."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmuls in bf16
        return _kda_chunked(q, k, v, g, beta, scale, initial_state, chunk_size, segment_ids)


def _kda_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None,
    initial_state: Tensor | None, chunk_size: int, segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    ct = _compute_dtype(v)
    pad = (-T) % C
    # padded steps have k = 0, g = 0, beta = 0: they neither decay nor write the state
    q, k, v, g = (F.pad(t.to(ct), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
    beta = F.pad(beta.to(ct), (0, 0, 0, pad))
    N = (T + pad) // C

    def chunks(t: Tensor) -> Tensor:  # [B, N*C, H, ...] -> [B, H, N, C, ...]
        return t.reshape(B, N, C, H, *t.shape[3:]).transpose(1, 3).transpose(2, 3)

    q, k, v, g, beta = chunks(q) * scale, chunks(k), chunks(v), chunks(g), chunks(beta)
    G = g.cumsum(-2)  # [B, H, N, C, K]
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # s <= t
    strict = incl.tril(-1)  # s < t
    carry = to_end = None
    if segment_ids is not None:
        # padded steps join the last document (they write nothing); [B, 1, N, C]: broadcast over heads
        seg = torch.cat([segment_ids, segment_ids[:, -1:].expand(B, pad)], dim=1).reshape(B, 1, N, C)
        same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [B, 1, N, C(t), C(s)]
        incl, strict = incl & same, strict & same
        # the document of the token before each chunk (chunk 0: the initial state's, the first one)
        before = torch.cat([seg[:, :, :1, 0], seg[:, :, :-1, -1]], dim=2).unsqueeze(-1)  # [B, 1, N, 1]
        carry = (seg == before).to(ct).unsqueeze(-1)  # [B, 1, N, C, 1]: reached by the entering state
        to_end = (seg == seg[..., -1:]).to(ct).unsqueeze(-1)  # in the document that leaves the chunk
    # pairwise decay e^{G_t - G_s} on s <= t, 0 elsewhere (masked before exp: no inf * 0)
    diff = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~incl[..., None], float("-inf"))
    k_decayed = diff.exp() * k.unsqueeze(-3)  # [B, H, N, C(t), C(s), K]: e^{G_t - G_s} * k_s
    # k_t and q_t against every decayed k_s in one batched matmul (one pass over the [C, C, K] tensor)
    both = k_decayed @ torch.stack([k, q], dim=-2).transpose(-1, -2)  # [B, H, N, C(t), C(s), 2]
    Akk, Aqk = both[..., 0], both[..., 1]
    A = (Akk * beta.unsqueeze(-1)).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    k_from_start = G.exp() * k if carry is None else G.exp() * k * carry
    rhs = torch.cat([v, k_from_start], dim=-1) * beta.unsqueeze(-1)  # [B, H, N, C, V + K]
    sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U_tilde, W = sol[..., :V], sol[..., V:]
    q_decayed = q * G.exp()  # q_t against S_0
    k_to_end = k * (G[..., -1:, :] - G).exp()  # k_s decayed to the chunk end
    chunk_decay = G[..., -1, :].exp().unsqueeze(-1)  # [B, H, N, K, 1]
    if carry is not None:
        q_decayed, k_to_end = q_decayed * carry, k_to_end * to_end
        chunk_decay = chunk_decay * carry[..., -1:, :]  # the last token's document carried S_0 in

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(ct)
    outs = []
    # unbind once: indexing [:, :, n] per chunk would give each chunk a full-size gradient buffer
    per_chunk = zip(*(t.unbind(2) for t in (U_tilde, W, q_decayed, Aqk, chunk_decay, k_to_end)))
    for u_n, w_n, q_n, a_n, decay_n, k_n in per_chunk:
        U = u_n - w_n @ S
        outs.append(q_n @ S + a_n @ U)
        S = decay_n * S + k_n.transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2)  # [B, H, N, C, V]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), S


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``W``, one filter per channel) then SiLU.

    ``forward(x [B, T, C], state [B, C, W-1] | None, segment_ids [B, T] | None) -> (y [B, T, C], new state
    [B, C, W-1])``: the state holds the last ``W - 1`` inputs, so decoding one token at a time equals the
    full pass. ``segment_ids`` (packed documents): each document is convolved as if zero-padded on its
    left, i.e. ``y_t = sum_j w_j x_{t-j} [seg_{t-j} = seg_t]`` (W masked shifts instead of one
    ``conv1d``; W = 4). Under ``torch.compile`` without a state the same W shifted products (unmasked)
    replace ``conv1d``, so that Inductor fuses them; on fla the KDA layer calls fla's kernel instead:
    ``fla_dense`` eager, :func:`attnres.model.fla_ops.short_conv` under ``torch.compile``."""

    def __init__(self, channels: int, kernel: int = 4) -> None:
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel)  # nn.Conv1d's default for a depthwise filter
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self, x: Tensor, state: Tensor | None = None, segment_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if state is not None and segment_ids is not None:
            raise ValueError("ShortConv: segment_ids (packed documents) need state=None (no decoding state)")
        new_state = self.next_state(x, state)
        if segment_ids is not None:
            return F.silu(self._shifted(x, segment_ids)), new_state
        if state is None and torch.compiler.is_compiling():
            # W shifted products that Inductor fuses with the SiLU into one pass over x (and one for the
            # backward), instead of a depthwise conv1d kernel and the transposed copies around it
            return F.silu(self._shifted(x)), new_state
        B, T, C = x.shape
        xt = x.transpose(1, 2)
        if state is None:
            state = xt.new_zeros(B, C, self.kernel - 1)
        xp = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, C, W-1+T]
        y = F.conv1d(xp, self.weight.to(xt.dtype).unsqueeze(1), groups=C)
        return F.silu(y.transpose(1, 2)), new_state

    def next_state(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """The decoding state after ``x [B, T, C]`` (from ``state [B, C, W-1]``, zeros if None): the last
        ``W - 1`` inputs, ``[B, C, W-1]``, detached. Reads only those inputs, not the whole of ``x``, and
        copies them: a view would keep all of ``x`` (a whole prompt's projections) alive in the cache."""
        B, T, C = x.shape
        keep = self.kernel - 1
        tail = x[:, max(T - keep, 0):].transpose(1, 2)
        if tail.shape[-1] < keep:  # a short input: the rest comes from the state before it
            past = state.to(x.dtype) if state is not None else x.new_zeros(B, C, keep)
            tail = torch.cat([past, tail], dim=-1)[..., -keep:]
        return tail.detach().clone(memory_format=torch.contiguous_format)

    @torch.compiler.disable  # fla's Triton autograd function is not traced (as fla does for chunk_kda)
    def fla_dense(self, x: Tensor) -> Tensor:
        """The convolution then SiLU of ``x [B, T, C]`` (zeros before the start, no state) through fla's
        Triton ``causal_conv1d``, which reads ``[B, T, C]`` as it is: ``[B, T, C]``."""
        from fla.modules.causal_conv1d import causal_conv1d

        return causal_conv1d(x, self.weight, activation="silu")[0]

    @torch.compiler.disable  # fla's Triton autograd function is not traced (as fla does for chunk_kda)
    def fla_varlen(self, x: Tensor, documents: DocumentMask) -> Tensor:
        """The per-document convolution then SiLU through fla's varlen ``causal_conv1d`` (one Triton kernel
        over ``x [B, T, C]`` flattened to ``[1, B * T, C]`` with ``documents.cu_seqlens``): ``[B, T, C]``.
        Its ``weight [C, W]`` convention is ours (``conv1d`` with ``W - 1`` zeros on the left)."""
        from fla.modules.causal_conv1d import causal_conv1d

        B, T, C = x.shape
        y, _ = causal_conv1d(x.reshape(1, B * T, C), self.weight, activation="silu",
                             cu_seqlens=documents.cu_seqlens, cu_seqlens_cpu=documents.cu_seqlens_cpu)
        return y.reshape(B, T, C)

    def _shifted(self, x: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        """The convolution of ``x [B, T, C]`` (zeros before the start) as ``W`` shifted products; with
        ``segment_ids [B, T]``, every tap masked to the token's own document."""
        T = x.shape[1]
        w = self.weight.to(x.dtype)  # [C, W]: tap W-1 multiplies x_t, tap W-1-j multiplies x_{t-j}
        y = x * w[:, -1]
        for j in range(1, min(self.kernel, T)):
            tap = x[:, :-j] * w[:, -1 - j]
            if segment_ids is not None:
                same = (segment_ids[:, j:] == segment_ids[:, :-j]).unsqueeze(-1)  # [B, T-j, 1]
                tap = tap.masked_fill(~same, 0.0)
            y = y + F.pad(tap, (0, 0, j, 0))
        return y


class KimiDeltaAttention(nn.Module):
    """The KDA token mixer of Kimi Linear: ``[B, T, dim] -> [B, T, dim]``.

    q/k/v projections + short conv + SiLU, L2-normed q and k; decay
    ``g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)`` (low rank, rank = head dim); ``beta =
    sigmoid(b_proj(x))``; output ``o_proj(RMSNorm_head(o) * sigmoid(g_b(g_a(x))))``.

    ``cache``: a dict for this layer, filled and updated in place (``"state"``: ``[B, H, K, V]`` fp32,
    ``"conv"``: the three short-conv states); an empty dict starts a sequence.
    ``documents``: packed documents (:class:`attnres.model.documents.DocumentMask`): state and short
    convs restart at each document; on fla, its varlen ``causal_conv1d`` and ``chunk_kda`` over the batch
    flattened to ``[1, B * T]`` with the mask's ``cu_seqlens``; else our masked convs and chunked code
    with the segment ids.
    ``backend``: ``"auto"`` (fla on CUDA when installed, else our chunked / recurrent code),
    ``"torch"`` (always ours) or ``"fla"``. ``fused`` (``Config.fla_fused``): eager on fla without a
    cache, fla's KDA layer's fused path (:meth:`_fla_eager`); else the plain code around ``chunk_kda``.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, conv_size: int = 4, chunk_size: int = 16,
        norm_eps: float = 1e-5, backend: str = "auto", fused: bool = True,
    ) -> None:
        super().__init__()
        if backend not in ("auto", "torch", "fla"):
            raise ValueError(f"backend={backend!r} is invalid; valid: auto | torch | fla")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.chunk_size = chunk_size
        self.backend = backend
        self.fused = fused  # eager on fla: _fla_eager; else the plain code around chunk_kda
        # looked up once: a module search (~40 us) per layer and forward would be host time on the hot path
        self.fla_installed = backend != "torch" and fla_available()
        hk = num_heads * head_dim
        self.q_proj = nn.Linear(dim, hk, bias=False)
        self.k_proj = nn.Linear(dim, hk, bias=False)
        self.v_proj = nn.Linear(dim, hk, bias=False)
        self.q_conv = ShortConv(hk, conv_size)
        self.k_conv = ShortConv(hk, conv_size)
        self.v_conv = ShortConv(hk, conv_size)
        self.f_a_proj = nn.Linear(dim, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, hk, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(hk))
        # fla's convention: the optimizer should not decay these (1-D, like norms and biases)
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.b_proj = nn.Linear(dim, num_heads, bias=False)
        self.g_a_proj = nn.Linear(dim, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, hk, bias=True)
        self.o_norm = RMSNorm(head_dim, norm_eps)
        self.o_proj = nn.Linear(hk, dim, bias=False)
        self.reset_decay()

    def reset_decay(self) -> None:
        """Mamba-style decay init: ``A ~ U[1, 16]`` per head, ``softplus(dt_bias) ~ logU[1e-3, 0.1]``."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def decay(self, x: Tensor, f_a: Tensor | None = None) -> Tensor:
        """Log decay ``g [B, T, H, K]`` (fp32, ``<= 0``) of ``x``; ``f_a``: ``f_a_proj(x)``, when made."""
        f = self.f_b_proj(self.f_a_proj(x) if f_a is None else f_a).float() + self.dt_bias.float()
        g = -self.A_log.float().exp().repeat_interleave(self.head_dim) * F.softplus(f)
        return g.unflatten(-1, (self.num_heads, self.head_dim))

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        """The six projections of ``x`` as one GEMM (:func:`joint_linear`): the inputs of the q, k, v short
        convs, ``f_a_proj(x)`` (the decay's low rank), ``b_proj(x)`` (beta), ``g_a_proj(x)`` (the gate's)."""
        q, k, v, f_a, g_a, b = joint_linear(x, self.q_proj, self.k_proj, self.v_proj, self.f_a_proj,
                                            self.g_a_proj, self.b_proj)  # beta's H columns last: aligned
        return q, k, v, f_a, b, g_a

    def uses_fla(self, device: torch.device) -> bool:
        """Whether this layer runs fla's kernels on ``device``."""
        return fla_runs(self.backend, self.fla_installed, device)

    def _convs(self) -> tuple[ShortConv, ShortConv, ShortConv]:
        return self.q_conv, self.k_conv, self.v_conv

    def _fla_varlen_qkv(self, qkv: list[Tensor], documents: DocumentMask) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of packed documents through fla's varlen short conv (``documents`` with ``cu_seqlens``)
        from the three projections ``qkv``."""
        if documents.cu_seqlens is None:
            raise ValueError("KimiDeltaAttention on fla: the DocumentMask has no cu_seqlens; build it "
                             "with DocumentMask.build(..., varlen=True)")
        q, k, v = (conv.fla_varlen(p, documents) for conv, p in zip(self._convs(), qkv))
        return q, k, v

    def _fla_eager(self, x: Tensor, documents: DocumentMask | None) -> Tensor:
        """Training and prefill on fla without a cache, eager: fla's KDA layer's own fused path. The q/k L2
        norms, the decay ``-exp(A_log) * softplus(f + dt_bias)`` and beta's sigmoid run inside ``chunk_kda``
        (``use_qk_l2norm_in_kernel``, ``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``), and the head
        norm times the sigmoid gate is one ``rms_norm_gated`` kernel: no fp32 copies of q, k, the decay or
        the gate are made or kept for the backward (under ``torch.compile`` Inductor fuses the unfused code
        of :meth:`forward` instead). Same math as :meth:`forward`; fla's L2 norm divides by
        ``sqrt(|x|^2 + 1e-6)`` where ``F.normalize`` takes ``max(|x|, 1e-6)`` (equal but for ~0 vectors)."""
        from fla.modules.fused_norm_gate import rms_norm_gated
        from fla.ops.kda import chunk_kda

        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        *qkv, f_a, b, g_a = self._project(x)
        if documents is not None:
            q, k, v = self._fla_varlen_qkv(qkv, documents)
        else:
            q, k, v = (conv.fla_dense(p) for conv, p in zip(self._convs(), qkv))
        f = self.f_b_proj(f_a)  # the decay's pre-activation; the kernel adds dt_bias
        heads = [t.unflatten(-1, (H, K)) for t in (q, k, v, f)] + [b]
        varlen = {}
        if documents is not None:  # the batch as one sequence of documents
            heads = [t.reshape(1, B * T, *t.shape[2:]) for t in heads]
            varlen = {"cu_seqlens": documents.cu_seqlens, "cu_seqlens_cpu": documents.cu_seqlens_cpu}
        o, _ = chunk_kda(*heads, A_log=self.A_log, dt_bias=self.dt_bias, scale=K**-0.5,
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                         use_beta_sigmoid_in_kernel=True, **varlen)
        gate = self.g_b_proj(g_a).unflatten(-1, (H, K))
        o = rms_norm_gated(o.reshape(B, T, H, K), gate, self.o_norm.weight, None, activation="sigmoid",
                           eps=self.o_norm.eps)
        return self.o_proj(o.flatten(-2))

    def forward(self, x: Tensor, cache: dict | None = None, documents: DocumentMask | None = None) -> Tensor:
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        if documents is not None and cache is not None:
            raise ValueError("KimiDeltaAttention: documents (packed training windows) cannot be decoded "
                             "with a cache; decode one document per sequence")
        fla = self.uses_fla(x.device)
        eager_fla = fla and cache is None and not torch.compiler.is_compiling()
        if eager_fla and self.fused:
            return self._fla_eager(x, documents)  # fla's fused kernels; below: compiled, or decoding
        *qkv, f_a, b, g_a = self._project(x)
        if documents is not None and fla:  # fla's varlen functions (under torch.compile: a graph break)
            q, k, v = self._fla_varlen_qkv(qkv, documents)
            cq = ck = cv = None  # no decoding state with documents
        elif eager_fla:  # fused=False: fla's Triton short conv
            q, k, v = (conv.fla_dense(p) for conv, p in zip(self._convs(), qkv))
            cq = ck = cv = None  # no decoding state without a cache
        elif fla and cache is None and documents is None and torch.compiler.is_compiling():
            # training under torch.compile: fla's Triton short conv as an opaque op (fla_ops.short_conv)
            q, k, v = (fla_ops.short_conv(p, conv.weight) for conv, p in zip(self._convs(), qkv))
            cq = ck = cv = None
        else:
            seg = documents.segment_ids if documents is not None else None
            conv = cache.get("conv", (None, None, None)) if cache is not None else (None, None, None)
            (q, cq), (k, ck), (v, cv) = (c(p, state, seg) for c, p, state in zip(self._convs(), qkv, conv))
        # q, k, v in the projections' dtype (bf16 under autocast, while x, the residual stream,
        # stays fp32): fla's kernels need one dtype for all three
        q = F.normalize(q.unflatten(-1, (H, K)).float(), dim=-1, eps=1e-6).to(v.dtype)
        k = F.normalize(k.unflatten(-1, (H, K)).float(), dim=-1, eps=1e-6).to(v.dtype)
        v = v.unflatten(-1, (H, K))
        g = self.decay(x, f_a)
        beta = torch.sigmoid(b.float())
        state = cache.get("state") if cache is not None else None
        want_state = cache is not None
        if fla and documents is None and state is None and not want_state and torch.compiler.is_compiling():
            # training under torch.compile: fla's kernels as opaque custom ops (fla_ops), so Dynamo traces
            # the whole layer instead of breaking the graph at fla's compiler.disable. (Packed documents keep
            # fla's own varlen function and its graph break: the ops' varlen path has not run on a GPU yet.)
            o = fla_ops.chunk_kda(q, k, v, g, beta.to(q.dtype), scale=K**-0.5)
        elif fla and documents is not None:
            from fla.ops.kda import chunk_kda

            flat = [t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g, beta.to(q.dtype))]
            o, _ = chunk_kda(*flat, scale=K**-0.5, cu_seqlens=documents.cu_seqlens,
                             cu_seqlens_cpu=documents.cu_seqlens_cpu)
            o = o.reshape(B, T, H, K)
        elif fla:
            from fla.ops.kda import chunk_kda, fused_recurrent_kda

            # fla's fused_recurrent_kda has no backward: a one-token input with gradients goes to chunk_kda
            fn = fused_recurrent_kda if T == 1 and not torch.is_grad_enabled() else chunk_kda
            o, state = fn(q, k, v, g, beta.to(q.dtype), scale=K**-0.5, initial_state=state,
                          output_final_state=want_state)
        elif documents is not None:
            o, state = kda_chunked(q, k, v, g, beta, chunk_size=self.chunk_size,
                                   segment_ids=documents.segment_ids)
        elif T == 1:
            o, state = kda_recurrent(q, k, v, g, beta, initial_state=state)
        else:
            o, state = kda_chunked(q, k, v, g, beta, initial_state=state, chunk_size=self.chunk_size)
        if cache is not None:
            cache["state"], cache["conv"] = state.detach(), (cq, ck, cv)
        gate = torch.sigmoid(self.g_b_proj(g_a).float()).unflatten(-1, (H, K))
        o = (self.o_norm(o.float()) * gate).to(x.dtype).flatten(-2)
        return self.o_proj(o)
