"""Pipeline parallelism applied from outside the model (torchtitan style). Plain PyTorch (no Lightning).

A stage *is* the pruned decoder (:class:`attnres.model.Decoder`, which skips a missing embedding or
head and then hands back its :class:`~attnres.residual.ResidualState`); this module only adapts it to
``torch.distributed.pipelining``:

* :func:`keep_layers` is the one pruning function: it keeps the layers a rank (or stage) owns, with their
  ``residual.queries`` entries, the embedding on the first stage, the final norm, the LM head and the
  read-out query on the last. A deep copy for the rank's model (what gets checkpointed), a shared view of
  it per stage. Layers are a ``ModuleDict`` keyed by index, so parameter names (and DCP checkpoints) are
  those of the full model whatever the layout.
* :class:`PipelineStageModule` is one stage: ``forward(payload) -> payload``, i.e. unpack the received
  buffer and add what the rank's :class:`~attnres.parallel.stage_cache.StageCache` holds, run the pruned
  decoder, pack what the next stage lacks. Its payload is the token ids on the first stage, the logits
  out of the last; in between the residual stream: the hidden state ``[B, T, d]`` (standard residual)
  or, for AttnRes, the sources the receiving rank lacks plus the partial summary, packed into one 1-D
  buffer (one message per boundary: :func:`attnres.ops.pack`).
* :func:`build_pipeline` runs the stages with ``torch.distributed.pipelining`` (GPipe, 1F1B,
  Interleaved1F1B with virtual stages), optionally each sharded with FSDP2
  (:func:`attnres.parallel.fsdp.apply_fsdp`).

Shapes stay static under caching: what stage ``k`` sends is fixed per stage (the summaries completed
since the receiver's last visit, plus the partial), so each stage declares its input and output once.
A stage learns which microbatch it runs from the schedule (:class:`CachingPipelineStage` reads the
chunk id the schedule passes to ``forward_one_chunk``).
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from attnres.model.decoder import lm_loss
from attnres.ops import pack, unpack
from attnres.parallel.fsdp import apply_fsdp
from attnres.parallel.stage_cache import StageCache, StageLayout
from attnres.residual import ResidualState

__all__ = [
    "SCHEDULES",
    "CachingPipelineStage",
    "Pipeline",
    "PipelineStageModule",
    "ScheduleName",
    "build_pipeline",
    "keep_layers",
    "payload_bytes",
    "split_layers",
]

ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b"]
SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


# ----------------------------------------------------------------------------- splitting


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous layer indices per stage, as even as possible (earlier stages take the extra ones)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} pipeline stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for k in range(num_stages):
        n = base + (1 if k < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def keep_layers(model: nn.Module, layers: Sequence[int], first: bool, last: bool, copy: bool) -> nn.Module:
    """The decoder ``model`` pruned to ``layers`` (and their depth queries), the embedding if ``first``,
    the final norm, LM head and read-out query if ``last``; the deleted attributes are set to None and
    the parameter names of what remains are those of the full model.

    ``copy=True``: a deep copy (the rank's own model, whose parameters it trains and checkpoints);
    ``copy=False``: a view that shares every kept module with ``model`` (one pipeline stage of a rank's
    model; ``model`` itself is left whole)."""
    if getattr(model.config, "tie_embeddings", False) and not (first and last):
        raise ValueError(
            "tie_embeddings=True shares the embedding and the LM head, which a pipeline split "
            "puts on different stages: use tie_embeddings=False for pipeline parallelism"
        )
    keep = {str(i) for i in layers}
    unknown = keep - set(model.layers.keys())
    if unknown:
        held = [int(k) for k in model.layers]
        raise ValueError(f"layers {sorted(int(k) for k in unknown)} are not in the model (it holds {held})")
    part = _copy.deepcopy(model) if copy else _view(model)
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    queries = getattr(part.residual, "queries", None)
    if queries is not None:
        owned = {str(2 * i + j) for i in layers for j in (0, 1)} | ({"out"} if last else set())
        for key in list(queries.keys()):
            if key not in owned:
                del queries[key]
    if not first:
        part.embed = None
    if not last:
        part.norm = None
        part.lm_head = None
    return part


def _view(model: nn.Module) -> nn.Module:
    """A shallow copy of the decoder ``model`` with registries of its own (its ``layers`` and its
    residual's ``queries`` new ``ModuleDict`` s holding the same modules), so that deleting from the
    copy leaves ``model`` whole while every parameter stays shared."""
    part = _shallow(model)
    part.layers = nn.ModuleDict(dict(model.layers.items()))
    part.residual = _shallow(model.residual)
    if getattr(model.residual, "queries", None) is not None:
        part.residual.queries = nn.ModuleDict(dict(model.residual.queries.items()))
    return part


def _shallow(module: nn.Module) -> nn.Module:
    out = _copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out


# ----------------------------------------------------------------------------- autograd glue


class _Receive(torch.autograd.Function):
    """Unpack a received buffer into its tensors; backward packs their gradients into the one
    gradient message and counts its bytes (the backward direction of the boundary before stage k)."""

    @staticmethod
    def forward(ctx, buffer, shapes, cache, microbatch, k):
        ctx.shapes, ctx.cache, ctx.mb, ctx.k = shapes, cache, microbatch, k
        ctx.like = buffer.new_empty(0)
        return tuple(unpack(buffer, shapes))

    @staticmethod
    def backward(ctx, *grads):
        grads = [
            torch.zeros(s, dtype=ctx.like.dtype, device=ctx.like.device) if g is None else g
            for g, s in zip(grads, ctx.shapes)
        ]
        out = pack(grads)
        ctx.cache.count(ctx.mb, "backward", ctx.k - 1, out.numel() * out.element_size())
        return out, None, None, None, None


class _SendAndKeep(torch.autograd.Function):
    """Pack the payload of stage k into one buffer. Backward unpacks the received gradient and adds,
    to the sources stage k put in the cache, the gradients the later stages of this rank accumulated
    on them (those backward passes ran first: the schedule runs a microbatch's stages backwards)."""

    @staticmethod
    def forward(ctx, cache, microbatch, keep_ids, n_send, *tensors):
        send = tensors[:n_send]
        ctx.cache, ctx.mb, ctx.keep_ids = cache, microbatch, keep_ids
        ctx.shapes = [t.shape for t in send]
        return pack(send)

    @staticmethod
    def backward(ctx, grad):
        send_grads = unpack(grad.contiguous(), ctx.shapes)
        keep_grads = ctx.cache.pop_grads(ctx.mb, ctx.keep_ids)
        return (None, None, None, None, *send_grads, *keep_grads)


class _AddAuxGrad(torch.autograd.Function):
    """Identity on the stage output that gives ``aux`` (the stage's MoE balance losses) a gradient
    of one: as if it were added to the loss on the last stage, without carrying it there."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_like = aux.new_empty(())
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones_like(ctx.aux_like)


# ----------------------------------------------------------------------------- the stage


class PipelineStageModule(nn.Module):
    """Stage ``stage_index`` of ``num_stages``: an adapter around ``decoder``, the rank's model pruned to
    this stage (:func:`keep_layers` with ``copy=False``; it shares the rank model's modules).

    ``forward``: first stage ``input_ids [b, T] ->`` payload; middle ``payload -> payload``; last
    ``payload -> logits [b, T, V]``. The payload is the hidden state ``[b, T, d]`` for the standard
    residual, else a 1-D buffer of ``cache.payload_sources(k)`` tensors ``[b, T, d]``: the sources the next
    rank lacks (ids ``cache.send_ids(k)``), then the partial summary. The stage's MoE balance loss gets
    its gradient here (:class:`_AddAuxGrad`); its value, detached, is kept in ``aux_losses`` (one per
    forward) for the pipeline to report.
    """

    def __init__(self, decoder: nn.Module, stage_index: int, num_stages: int, cache: StageCache) -> None:
        super().__init__()
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        if (decoder.embed is not None) != self.is_first or (decoder.lm_head is not None) != self.is_last:
            raise ValueError(
                f"stage {stage_index} of {num_stages} needs a decoder with the embedding only on the first "
                "stage and the head only on the last (keep_layers(..., first, last, copy=False))"
            )
        self.config = decoder.config
        self.decoder = decoder
        self.cache = cache
        self.microbatch = 0  # set by CachingPipelineStage before each forward
        self.source_shape: list[int] = []  # [b, T, d] of one payload tensor, set by Pipeline.step
        self.payload_dtype: torch.dtype | None = None  # declared by io_shapes
        self.aux_losses: list[Tensor] = []  # detached MoE balance loss per forward; Pipeline.step clears it

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder(x if self.is_first else self._receive(x))
        y = out.logits if self.is_last else self._send(out.state)
        aux = out.aux_loss
        self.aux_losses.append(aux.detach())
        if aux.requires_grad and torch.is_grad_enabled():
            y = _AddAuxGrad.apply(y, aux)
        return y

    def _receive(self, buffer: Tensor) -> ResidualState:
        """The state this stage starts from: the received buffer's tensors and the cached sources."""
        k, mb, cache = self.stage_index, self.microbatch, self.cache
        n = cache.payload_sources(k - 1)
        parts = _Receive.apply(buffer, [self.source_shape] * n, cache, mb, k)
        if cache.layout.hidden:
            return ResidualState(hidden=parts[0])
        sources = cache.get(mb, cache.cached_ids(k)) + list(parts[: len(cache.recv_ids(k))])
        partial = parts[-1] if cache.layout.partial_after[k - 1] else None
        return ResidualState(sources=sources, partial=partial)

    def _send(self, state: ResidualState) -> Tensor:
        """The payload for the next stage (counted); the sources a later stage of this rank reads are
        put in the cache."""
        k, mb, cache = self.stage_index, self.microbatch, self.cache
        if cache.layout.hidden:
            out = _SendAndKeep.apply(cache, mb, [], 1, state.hidden)
        else:
            send = [state.sources[i] for i in cache.send_ids(k)]
            if cache.layout.partial_after[k]:
                send.append(state.partial)
            keep_ids = cache.keep_ids(k)
            keep = [state.sources[i] for i in keep_ids]
            cache.put(mb, keep_ids, keep)
            out = _SendAndKeep.apply(cache, mb, keep_ids, len(send), *send, *keep)
        if self.payload_dtype is not None and out.dtype != self.payload_dtype:
            raise TypeError(
                f"stage {k} produced {out.dtype} activations but the pipeline declared "
                f"{self.payload_dtype}: build it with dtype={out.dtype} (strategy: activation_dtype)"
            )
        cache.count(mb, "forward", k, out.numel() * out.element_size())
        return out

    def io_shapes(self, microbatch_size: int, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Example (meta) input and output of this stage for a microbatch ``[b, T]``."""
        d, k, cache = self.config.dim, self.stage_index, self.cache
        self.payload_dtype = dtype
        meta = torch.device("meta")
        if self.is_first:
            inp = torch.empty(microbatch_size, seq_len, dtype=torch.long, device=meta)
        else:
            inp = torch.empty(
                cache.payload_sources(k - 1) * microbatch_size * seq_len * d,
                dtype=dtype,
                device=meta,
                requires_grad=True,
            )
        if self.is_last:
            out = torch.empty(
                microbatch_size, seq_len, self.config.vocab_size, dtype=dtype, device=meta, requires_grad=True
            )
        else:
            out = torch.empty(
                cache.payload_sources(k) * microbatch_size * seq_len * d,
                dtype=dtype,
                device=meta,
                requires_grad=True,
            )
        return inp, out


class CachingPipelineStage(PipelineStage):
    """A :class:`PipelineStage` that tells its :class:`PipelineStageModule` which microbatch the
    schedule is running (the key of the rank's per-microbatch cache)."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        self._stage_module().microbatch = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def _stage_module(self) -> PipelineStageModule:
        return self.submod


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """One rank's part of a pipeline: its pruned decoder ``model`` (the layers of all its stages; what
    gets checkpointed), its :class:`PipelineStageModule` s, the cache, and one schedule per microbatch
    shape (built on first use: stage inputs and outputs are declared statically, so a batch of another
    size, e.g. validation, gets its own ``PipelineStage`` s over the same modules)."""

    def __init__(
        self,
        model: nn.Module,
        modules: list[PipelineStageModule],
        cache: StageCache,
        group: dist.ProcessGroup,
        schedule: ScheduleName,
        n_microbatches: int,
        device: torch.device,
        dtype: torch.dtype,
        loss_fn=lm_loss,
    ) -> None:
        self.model, self.modules, self.cache, self.group = model, modules, cache, group
        self.schedule_name, self.n_microbatches, self.device, self.dtype = (
            schedule,
            n_microbatches,
            device,
            dtype,
        )
        self.loss_fn = loss_fn
        self.num_stages = cache.layout.num_stages
        self.has_first = any(m.is_first for m in modules)
        self.has_last = any(m.is_last for m in modules)
        last = cache.layout.stage_rank[-1]
        self.last_rank = dist.get_global_rank(group, last) if group is not None else last
        self._schedules: dict[tuple[int, int], object] = {}

    def schedule(self, batch_size: int, seq_len: int):
        """The schedule for batches ``[batch_size, seq_len]`` (split into ``n_microbatches``)."""
        key = (batch_size, seq_len)
        if key not in self._schedules:
            if batch_size % self.n_microbatches != 0:
                raise ValueError(
                    f"batch size {batch_size} does not split into {self.n_microbatches} microbatches"
                )
            mb = batch_size // self.n_microbatches
            stages = []
            for mod in self.modules:
                inp, out = mod.io_shapes(mb, seq_len, self.dtype)
                stages.append(
                    CachingPipelineStage(
                        mod,
                        mod.stage_index,
                        self.num_stages,
                        self.device,
                        input_args=inp,
                        output_args=out,
                        group=self.group,
                    )
                )
            cls = SCHEDULES[self.schedule_name]
            looped = self.schedule_name == "interleaved_1f1b"
            self._schedules[key] = cls(
                stages if looped else stages[0], n_microbatches=self.n_microbatches, loss_fn=self.loss_fn
            )
        return self._schedules[key]

    def step(
        self, input_ids: Tensor, labels: Tensor, train: bool = True, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run one batch ``input_ids, labels [B, T]`` (the same on every rank of the pipeline: the first
        stage reads the ids, the last the labels) through the schedule. ``train``: forward and backward
        (gradients accumulate in ``.grad``, scaled to the mean over microbatches), else forward only.
        Returns the mean loss over the microbatches, on every rank of the pipeline group; with
        ``return_aux``, ``(loss, aux_loss)``: also the MoE balance loss summed over the stages (the
        decoder's ``aux_loss``), mean over the microbatches (one more all-reduce)."""
        sched = self.schedule(*labels.shape)
        for mod in self.modules:
            mod.source_shape = [labels.shape[0] // self.n_microbatches, labels.shape[1], mod.config.dim]
            mod.aux_losses.clear()
        self.cache.clear()
        losses: list[Tensor] = []
        args = (input_ids.to(self.device),) if self.has_first else ()
        target = labels.to(self.device) if self.has_last else None
        if train:
            sched.step(*args, target=target, losses=losses)
        else:
            with torch.no_grad():
                sched.eval(*args, target=target, losses=losses)
        self.cache.clear()
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if losses:
            loss = torch.stack([x.detach().float() for x in losses]).mean()
        dist.broadcast(loss, src=self.last_rank, group=self.group)
        if not return_aux:
            return loss
        aux = torch.zeros((), dtype=torch.float32, device=self.device)
        for mod in self.modules:
            for a in mod.aux_losses:
                aux = aux + a.float()
            mod.aux_losses.clear()
        aux = aux / self.n_microbatches
        dist.all_reduce(aux, group=self.group)
        return loss, aux

    def bytes_per_microbatch(self) -> dict[str, float]:
        """Bytes sent per microbatch and direction, summed over the pipeline ranks (collective)."""
        t = self.bytes_per_microbatch_tensor()
        return {"forward": t[0].item(), "backward": t[1].item()}

    def bytes_per_microbatch_tensor(self) -> Tensor:
        """:meth:`bytes_per_microbatch` as ``[forward, backward]`` on the device, without a host sync
        (the counts go up by a non-blocking copy from pinned memory; collective), for per-step logs."""
        mine = self.cache.bytes_per_microbatch()
        t = torch.tensor([mine["forward"], mine["backward"]], dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.pin_memory()
        t = t.to(self.device, non_blocking=True)
        dist.all_reduce(t, group=self.group)
        return t

    def max_crossings(self) -> int:
        """The most times one source crossed one link in one direction for one microbatch, over the
        pipeline ranks (collective)."""
        t = torch.tensor([self.cache.max_crossings()], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def build_pipeline(
    model: nn.Module,
    group: dist.ProcessGroup,
    schedule: ScheduleName = "1f1b",
    n_microbatches: int = 4,
    virtual_stages: int = 1,
    caching: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dp_mesh: DeviceMesh | None = None,
    fsdp_param_dtype: torch.dtype | None = None,
    loss_fn=lm_loss,
) -> Pipeline:
    """Split ``model`` (a full :class:`Decoder`, identical on every rank) over the ranks of ``group``
    (the "pp" dimension): ``virtual_stages`` stages per rank, stage ``k`` on pp rank ``k % pp`` (looped,
    as ``ScheduleInterleaved1F1B`` expects). ``dtype``: the dtype of the activations between stages.
    ``dp_mesh``: shard every stage with FSDP2 over it (PP x FSDP), computing in ``fsdp_param_dtype``.
    ``schedule``: ``gpipe``, ``1f1b`` (one stage per rank) or ``interleaved_1f1b``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    pp, rank = dist.get_world_size(group), dist.get_rank(group)
    if schedule != "interleaved_1f1b" and virtual_stages != 1:
        raise ValueError(
            f"{schedule!r} has one stage per rank; virtual_stages={virtual_stages} needs interleaved_1f1b"
        )
    num_stages = pp * virtual_stages
    per_stage = split_layers(model.config.num_layers, num_stages)
    stage_rank = [k % pp for k in range(num_stages)]
    layout = StageLayout.build([2 * len(ls) for ls in per_stage], block_size(model.config), stage_rank)
    cache = StageCache(layout, rank, enabled=caching)
    mine = [k for k in range(num_stages) if stage_rank[k] == rank]
    owned = [i for k in mine for i in per_stage[k]]
    device = torch.device(device)
    rank_model = keep_layers(model, owned, first=0 in mine, last=num_stages - 1 in mine, copy=True).to(device)
    modules = []
    for k in mine:
        first, last = k == 0, k == num_stages - 1
        stage = keep_layers(rank_model, per_stage[k], first=first, last=last, copy=False)
        mod = PipelineStageModule(stage, k, num_stages, cache)
        if dp_mesh is not None:  # the stage is the root unit: the schedule drives FSDP through it
            apply_fsdp(mod, dp_mesh, param_dtype=fsdp_param_dtype, layers=stage.layers)
        modules.append(mod)
    return Pipeline(rank_model, modules, cache, group, schedule, n_microbatches, device, dtype, loss_fn)


def block_size(config) -> int:
    """Sublayers per block of ``config``'s residual, as :class:`StageLayout` counts them: 0 for the
    standard residual (its payload is the hidden state), 1 for Full AttnRes."""
    if config.residual == "standard":
        return 0
    if config.residual == "full":
        return 1
    return config.num_sublayers // config.num_blocks


def payload_bytes(cache: StageCache, microbatch_size: int, seq_len: int, dim: int, dtype: torch.dtype) -> int:
    """The analytic bytes one microbatch sends per direction (summed over the pipeline's ranks)."""
    return cache.analytic_bytes(microbatch_size * seq_len * dim * torch.empty((), dtype=dtype).element_size())
