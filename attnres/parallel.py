"""Parallelism applied from outside the model (torchtitan style): pipeline stages and FSDP2.

Plain PyTorch (no Lightning). The decoder (:class:`attnres.model.Decoder`) knows nothing of this:

* :func:`split_decoder` keeps the layers a rank (or stage) owns by deleting the others from a deep
  copy, with the matching ``residual.queries`` entries; the embedding stays on the first stage, the final
  norm, the LM head and the read-out query on the last. Layers are a ``ModuleDict`` keyed by index, so
  parameter names (and DCP checkpoints) are those of the full model whatever the layout.
* :class:`PipelineStageModule` is one stage: ``forward(payload) -> payload``. Its payload is the token ids
  on the first stage, the logits out of the last; in between the residual stream: the hidden state
  ``[B, T, d]`` (standard residual) or, for AttnRes, the sources the receiving rank lacks plus the
  partial summary, packed into one 1-D buffer (one message per boundary; SPEC §3). The sources a
  rank already holds for a microbatch come from its :class:`~attnres.stage_cache.StageCache`.
* :func:`build_pipeline` runs the stages with ``torch.distributed.pipelining`` (GPipe, 1F1B,
  Interleaved1F1B with virtual stages); :func:`apply_fsdp` shards each sublayer with FSDP2
  (``fully_shard``); :func:`init_mesh` builds the 2-D ``["pp", "dp"]`` DeviceMesh.

Shapes stay static under caching: what stage ``k`` sends is fixed per stage (the summaries completed
since the receiver's last visit, plus the partial), so each stage declares its input and output once.
A stage learns which microbatch it runs from the schedule (:class:`CachingPipelineStage` reads the
chunk id the schedule passes to ``forward_one_chunk``).
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from attnres.model.decoder import run_sublayer
from attnres.residual import ResidualState
from attnres.stage_cache import StageCache, StageLayout, pack, unpack

__all__ = [
    "SCHEDULES",
    "CachingPipelineStage",
    "Pipeline",
    "PipelineStageModule",
    "apply_fsdp",
    "build_pipeline",
    "close_process_groups",
    "init_mesh",
    "lm_loss",
    "split_decoder",
    "split_layers",
]

ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b"]
SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


# ----------------------------------------------------------------------------- process groups


def close_process_groups() -> None:
    """Destroy every process group of this process and free them now, while the interpreter is alive.

    Call it last in every process that made a group, after the objects that hold one (models under
    FSDP, meshes, pipelines, trainers) are out of scope. ``destroy_process_group`` only unregisters
    the groups; a gloo group lives on while a Python object still references it, and its worker
    threads each drop their last finished collective *after* ``wait()`` has returned. Left to
    interpreter shutdown, such a thread must take the GIL to free the collective's tensors, the
    finalizing interpreter makes it exit instead, and the forced unwind through gloo's noexcept loop
    aborts the process ("terminate called without an active exception", SIGABRT; seen in about 1 of
    5 FSDP runs on a busy 2-core machine, the backtrace in ``AsyncAllgatherWork::~AsyncAllgatherWork``
    under ``PyThread_exit_thread``). Collecting the groups here runs their destructors, which join
    those threads (torch releases the GIL while destroying a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


# ----------------------------------------------------------------------------- meshes and FSDP2


def init_mesh(pp: int, dp: int, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D mesh ``["pp", "dp"]`` over ``pp * dp`` ranks (rank = pp_rank * dp + dp_rank: the
    data-parallel replicas of one stage are neighbours, so FSDP's collectives stay inside a node)."""
    if pp * dp != dist.get_world_size():
        raise ValueError(f"pp={pp} x dp={dp} = {pp * dp} ranks, but the world has {dist.get_world_size()}")
    return init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` (a :class:`Decoder`, a pruned one, or a :class:`PipelineStageModule`) with FSDP2:
    one ``fully_shard`` unit per sublayer (its PreNorm and its token or channel mixer, grouped), and one
    for the rest (embedding, depth queries, final norm, head) at the root. Per sublayer rather than per
    decoder layer because the decoder calls the two sublayers of a layer separately: a per-layer unit
    would be gathered twice per forward (and per backward). ``mesh``: the 1-D data-parallel mesh
    (``mesh["dp"]`` of the 2-D mesh). ``param_dtype``: mixed-precision compute dtype (e.g. bf16; None:
    the parameters' own), gradients reduced in ``reduce_dtype``. In place; returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"apply_fsdp needs decoder layers in .layers, got a {type(model).__name__}")
    for layer in layers.values():
        groups = [("attn_norm", "attn"), ("mlp_norm", "mlp")]
        if all(hasattr(layer, n) for g in groups for n in g):
            for g in groups:
                fully_shard([getattr(layer, n) for n in g], **kw)
        else:  # another layer type: one unit, gathered around whatever the decoder calls
            fully_shard(layer, **kw)
            for name in ("token_mixer", "channel_mixer"):
                if hasattr(layer, name):
                    register_fsdp_forward_method(layer, name)
    fully_shard(model, **kw)
    return model


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


def split_decoder(model: nn.Module, layers: Sequence[int], first: bool, last: bool) -> nn.Module:
    """A deep copy of the decoder that keeps only ``layers`` (and their depth queries), the embedding
    if ``first``, the final norm, LM head and read-out query if ``last``. The deleted attributes are set
    to None; parameter names of what remains are those of the full model."""
    if getattr(model.config, "tie_embeddings", False) and not (first and last):
        raise ValueError(
            "tie_embeddings=True shares the embedding and the LM head, which a pipeline split "
            "puts on different stages: use tie_embeddings=False for pipeline parallelism"
        )
    keep = {str(i) for i in layers}
    unknown = keep - set(model.layers.keys())
    if unknown:
        raise ValueError(f"layers {sorted(unknown, key=int)} are not in the model ({list(model.layers)})")
    part = copy.deepcopy(model)
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    res = part.residual
    if hasattr(res, "queries"):
        owned = {str(2 * i + j) for i in layers for j in (0, 1)} | ({"out"} if last else set())
        for key in list(res.queries.keys()):
            if key not in owned:
                del res.queries[key]
    if not first:
        part.embed = None
    if not last:
        part.norm = None
        part.lm_head = None
    return part


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
    """Stage ``stage_index`` of ``num_stages``: the layers ``layers`` of the (pruned) decoder ``model``.

    Registers only its own pieces (shared with ``model``, names as in the full decoder): ``layers``,
    ``residual`` (a shallow copy holding only this stage's queries), ``embed`` on the first stage,
    ``norm`` and ``lm_head`` on the last. ``forward``: first stage ``input_ids [b, T] ->`` payload;
    middle ``payload -> payload``; last ``payload -> logits [b, T, V]``. The payload is the hidden state
    ``[b, T, d]`` for the standard residual, else a 1-D buffer of ``cache.payload_sources(k)`` tensors
    ``[b, T, d]``: the sources the next rank lacks (ids ``cache.send_ids(k)``), then the partial summary.
    """

    def __init__(
        self, model: nn.Module, stage_index: int, num_stages: int, layers: Sequence[int], cache: StageCache
    ) -> None:
        super().__init__()
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.config = model.config
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        res = copy.copy(model.residual)  # same settings, own ModuleDict of queries
        res._modules = dict(res._modules)
        if hasattr(model.residual, "queries"):
            owned = [str(2 * i + j) for i in layers for j in (0, 1)] + (["out"] if self.is_last else [])
            res.queries = nn.ModuleDict({q: model.residual.queries[q] for q in owned})
        self.residual = res
        if self.is_first:
            self.embed = model.embed
        if self.is_last:
            self.norm, self.lm_head = model.norm, model.lm_head
        self.cache = cache
        self.microbatch = 0  # set by CachingPipelineStage before each forward
        self.source_shape: list[int] = []  # [b, T, d] of one payload tensor, set by Pipeline.step
        self.payload_dtype: torch.dtype | None = None  # declared by io_shapes

    def forward(self, x: Tensor) -> Tensor:
        k, mb, cache, res = self.stage_index, self.microbatch, self.cache, self.residual
        if self.is_first:
            state = res.begin(self.embed(x))
        else:
            n_recv = len(cache.recv_ids(k))
            partial = self.num_stages > 1 and cache.layout.partial_after[k - 1]
            n = cache.payload_sources(k - 1)
            parts = _Receive.apply(x, [self.source_shape] * n, cache, mb, k)
            if cache.layout.hidden:
                state = ResidualState(hidden=parts[0])
            else:
                sources = cache.get(mb, cache.cached_ids(k)) + list(parts[:n_recv])
                state = ResidualState(sources=sources, partial=parts[-1] if partial else None)
        aux = None
        for layer in self.layers.values():
            (ia, mixer, attn_norm), (im, mlp, mlp_norm) = layer.sublayers()
            run_sublayer(self.residual, state, ia, mixer, attn_norm)
            a = run_sublayer(self.residual, state, im, mlp, mlp_norm)
            if a is not None and a.requires_grad:
                aux = a if aux is None else aux + a
        if self.is_last:
            out = self.lm_head(self.norm(res.readout(state)))
        elif cache.layout.hidden:
            out = _SendAndKeep.apply(cache, mb, [], 1, state.hidden)
        else:
            send = [state.sources[i] for i in cache.send_ids(k)]
            if cache.layout.partial_after[k]:
                send.append(state.partial)
            keep_ids = cache.keep_ids(k)
            keep = [state.sources[i] for i in keep_ids]
            cache.put(mb, keep_ids, keep)
            out = _SendAndKeep.apply(cache, mb, keep_ids, len(send), *send, *keep)
        if not self.is_last:
            if self.payload_dtype is not None and out.dtype != self.payload_dtype:
                raise TypeError(
                    f"stage {k} produced {out.dtype} activations but the pipeline declared "
                    f"{self.payload_dtype}: build it with dtype={out.dtype} (strategy: activation_dtype)"
                )
            cache.count(mb, "forward", k, out.numel() * out.element_size())
        if aux is not None and torch.is_grad_enabled():
            out = _AddAuxGrad.apply(out, aux)
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


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over ``labels != -100`` (the decoder's loss)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


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

    def step(self, input_ids: Tensor, labels: Tensor, train: bool = True) -> Tensor:
        """Run one batch ``input_ids, labels [B, T]`` (the same on every rank of the pipeline: the first
        stage reads the ids, the last the labels) through the schedule. ``train``: forward and backward
        (gradients accumulate in ``.grad``, scaled to the mean over microbatches), else forward only.
        Returns the mean loss over the microbatches, on every rank of the pipeline group."""
        sched = self.schedule(*labels.shape)
        for mod in self.modules:
            mod.source_shape = [labels.shape[0] // self.n_microbatches, labels.shape[1], mod.config.dim]
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
        return loss

    def bytes_per_microbatch(self) -> dict[str, float]:
        """Bytes sent per microbatch and direction, summed over the pipeline ranks (collective)."""
        mine = self.cache.bytes_per_microbatch()
        t = torch.tensor([mine["forward"], mine["backward"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return {"forward": t[0].item(), "backward": t[1].item()}

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
    layout = StageLayout.build([2 * len(ls) for ls in per_stage], model.residual.block_size, stage_rank)
    cache = StageCache(layout, rank, enabled=caching)
    mine = [k for k in range(num_stages) if stage_rank[k] == rank]
    owned = [i for k in mine for i in per_stage[k]]
    device = torch.device(device)
    rank_model = split_decoder(model, owned, first=0 in mine, last=num_stages - 1 in mine).to(device)
    modules = []
    for k in mine:
        mod = PipelineStageModule(rank_model, k, num_stages, per_stage[k], cache)
        if dp_mesh is not None:
            apply_fsdp(mod, dp_mesh, param_dtype=fsdp_param_dtype)
        modules.append(mod)
    return Pipeline(rank_model, modules, cache, group, schedule, n_microbatches, device, dtype, loss_fn)


def payload_bytes(cache: StageCache, microbatch_size: int, seq_len: int, dim: int, dtype: torch.dtype) -> int:
    """The analytic bytes one microbatch sends per direction (summed over the pipeline's ranks)."""
    return cache.analytic_bytes(microbatch_size * seq_len * dim * torch.empty((), dtype=dtype).element_size())
