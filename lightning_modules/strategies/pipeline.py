"""Pipeline parallelism (optionally x FSDP2) as a Lightning strategy: ``--trainer.strategy`` or
``configs/trainer/pipeline.yaml``.

The strategy builds a 2-D mesh ``["pp", "dp"]``, splits ``LanguageModel.model`` into stages in its
``setup`` (:func:`attnres.parallel.build_pipeline`: the rank keeps the layers of its stages, parameter
names unchanged) and runs each batch through a ``torch.distributed.pipelining`` schedule in place of
``training_step`` / ``validation_step``: the schedule does forward and backward at once, so
``backward`` only puts back the gradients the schedule made. The loss lives on the last stage and is
broadcast to every rank (and averaged over ``dp``); the MoE balance loss is summed over the stages; the
module logs both (``LanguageModel.log_train_step``), as in one process. Each rank's optimizer steps its
own stages' parameters; gradient clipping (``trainer.gradient_clip_val``) uses the norm over all stages;
checkpoints are sharded DCP folders (from ``ModelParallelStrategy``) whose keys are the full model's, so
they load at any other layout (PP, FSDP, one process).

Lightning's backward hooks (``on_before_backward`` with the broadcast loss, ``on_after_backward``) and
``on_before_optimizer_step`` run as in any strategy, so :class:`~lightning_modules.callbacks.NaNGuard`
works here: its decisions are all-reduced over every rank (:meth:`reduce_boolean_decision`). fp16 mixed
precision (a GradScaler) is refused: the schedule runs the backward passes on the unscaled loss.

Under Block/Full AttnRes, bytes sent per microbatch and direction are logged as
``pp/bytes_fwd_per_microbatch`` and ``pp/bytes_bwd_per_microbatch`` (with ``caching``, a boundary
sends only the block summaries the receiving rank lacks; the paper's cross-stage caching).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _sync_ddp_if_available
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from attnres.parallel import SCHEDULES, Pipeline, ScheduleName, build_pipeline, init_mesh
from lightning_modules.strategies.common import DTypeName, log_peak_memory, to_dtype


def clip_grad_norm_across_stages(
    parameters: Iterable[torch.nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup | None,
    norm_type: float = 2.0,
) -> Tensor:
    """``clip_grad_norm_`` where each rank of ``group`` (the pipeline ranks) holds the parameters of
    different stages: the norm is taken over all of them. FSDP2-sharded gradients (DTensors) count
    with their full value. Returns the total norm (before clipping)."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        local = torch.nn.utils.get_total_norm(grads, norm_type)
        local = local.full_tensor() if isinstance(local, DTensor) else local
    else:  # on the parameters' device, so that an NCCL all-reduce accepts it
        local = torch.zeros((), device=parameters[0].device if parameters else "cpu")
    local = local.float()
    if math.isinf(norm_type):
        total = local.clone()
        if group is not None:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    else:
        total = local.pow(norm_type)
        if group is not None:
            dist.all_reduce(total, group=group)
        total = total.pow(1.0 / norm_type)
    coef = min(1.0, float(max_norm) / (total.item() + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


class PipelineParallelStrategy(ModelParallelStrategy):
    """Pipeline parallelism over ``pipeline_parallel_size`` ranks, x FSDP2 over ``data_parallel_size``.

    Args:
        pipeline_parallel_size: ranks per pipeline (``"auto"``: world size / ``data_parallel_size``).
        data_parallel_size: pipeline replicas; each shards its stages with FSDP2 (``"auto"``: world
            size / ``pipeline_parallel_size``; 1: no FSDP).
        schedule: ``gpipe``, ``1f1b`` or ``interleaved_1f1b`` (with ``virtual_stages`` stages per rank).
        n_microbatches: microbatches per batch (the per-rank batch size must split evenly). Use this
            instead of ``trainer.accumulate_grad_batches``.
        virtual_stages: stages per rank (``interleaved_1f1b`` only); ``pp * virtual_stages`` must not
            exceed the number of decoder layers.
        caching: cross-stage caching of the AttnRes block summaries (the paper's cross-stage caching).
        activation_dtype: dtype of what crosses a stage boundary: the model's compute dtype (None: from
            ``param_dtype`` when set, else from ``trainer.precision``: bf16 for ``bf16-true``, fp16 for
            ``16-true``, else fp32).
        param_dtype: FSDP2 mixed precision when ``data_parallel_size > 1`` (None: fp32).
        log_bytes: log the bytes sent per microbatch and direction every training step.
        save_distributed_checkpoint: sharded DCP checkpoints (a folder).
    """

    def __init__(
        self,
        pipeline_parallel_size: Literal["auto"] | int = "auto",
        data_parallel_size: Literal["auto"] | int = 1,
        schedule: ScheduleName = "1f1b",
        n_microbatches: int = 4,
        virtual_stages: int = 1,
        caching: bool = True,
        activation_dtype: DTypeName | None = None,
        param_dtype: DTypeName | None = None,
        log_bytes: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=1,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
        if pipeline_parallel_size == "auto" and data_parallel_size == "auto":
            raise ValueError("set pipeline_parallel_size or data_parallel_size (at most one can be 'auto')")
        self.pipeline_parallel_size = pipeline_parallel_size
        self.data_parallel_size = data_parallel_size
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.virtual_stages = virtual_stages
        self.caching = caching
        self.activation_dtype = activation_dtype
        self.param_dtype = param_dtype
        self.log_bytes = log_bytes
        self.pipeline: Pipeline | None = None
        self._grads: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------ environment

    def setup_environment(self) -> None:
        self._setup_distributed()
        world = self.world_size
        pp, dp = self.pipeline_parallel_size, self.data_parallel_size
        pp = world // dp if pp == "auto" else pp
        dp = world // pp if dp == "auto" else dp
        if pp * dp != world:
            raise ValueError(f"pipeline_parallel_size={pp} x data_parallel_size={dp} != world size {world}")
        self.pipeline_parallel_size, self.data_parallel_size = pp, dp
        self._device_mesh = init_mesh(pp, dp, self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the ranks of one pipeline read the same batches (ids on the first stage, labels on the last)
        dp = self.device_mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """``all`` (or ``any``) of ``decision`` over every rank: the ranks of one pipeline hold different
        stages (e.g. a NaN gradient on one stage must skip the step on all). Lightning's version goes
        through :meth:`reduce`, which spans the data-parallel group only."""
        t = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if all else dist.ReduceOp.MAX)
        return bool(t.item())

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """Reduce over the data-parallel group: the ranks of one pipeline hold different layers (MoE
        load counts are per layer), and what they log is already the same on all of them."""
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(
                tensor, group or self.device_mesh["dp"].get_group(), reduce_op=reduce_op
            )
        return tensor

    # ------------------------------------------------------------------ model

    def parallelize(self, model: torch.nn.Module) -> None:
        """Nothing: ``LanguageModel.configure_model`` calls this before :meth:`setup`, which splits the
        model into this rank's stages (and shards each with FSDP2 when ``data_parallel_size > 1``)."""

    def setup(self, trainer: Any) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "PipelineParallelStrategy: trainer.accumulate_grad_batches must be 1; raise "
                "strategy.n_microbatches (and data.batch_size) instead"
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "PipelineParallelStrategy does not support fp16 mixed precision (a GradScaler): the "
                "schedule runs the backward passes on the unscaled loss; use trainer.precision "
                "bf16-mixed, bf16-true or 32-true"
            )
        module = self.lightning_module
        if self.pipeline is None or module.model is not self.pipeline.model:
            mesh = self.device_mesh
            dp = mesh["dp"].size()
            self.pipeline = build_pipeline(
                module.model,
                mesh["pp"].get_group(),
                self.schedule,
                self.n_microbatches,
                virtual_stages=self.virtual_stages,
                caching=self.caching,
                device=self.root_device,
                dtype=self._activation_dtype(trainer),
                dp_mesh=mesh["dp"] if dp > 1 else None,
                fsdp_param_dtype=to_dtype(self.param_dtype),
            )
            module.model = self.pipeline.model  # this rank's layers; names as in the full model
        super().setup(trainer)
        # Clipping must take the norm over every stage. Lightning runs it inside the precision plugin
        # (Precision.clip_grad_by_norm, reached from LightningModule.configure_gradient_clipping); its
        # Strategy has no clipping hook, and the plugin is built from trainer.precision, not by us. The
        # supported alternatives would move pipeline knowledge into the LightningModule or make every
        # config name a custom plugin, so the plugin instance's method is replaced here.
        plugin, group = self.precision_plugin, self.device_mesh["pp"].get_group()

        def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
            clip_grad_norm_across_stages(list(plugin.main_params(optimizer)), clip_val, group)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # the norm over all stages, not this rank's

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded DCP checkpoint saved under any layout into this rank's stages (and optimizer):
        only the keys this rank holds are read. (Lightning's own loader wants DTensor parameters, which
        a pipeline without FSDP does not have.)"""
        from lightning.fabric.strategies.model_parallel import (
            _distributed_checkpoint_load,
            _is_sharded_checkpoint,
        )
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is not a sharded (DCP) checkpoint folder; PipelineParallelStrategy loads those "
                "(save_distributed_checkpoint=True, the default of both attnres strategies)"
            )
        module = self.model
        state = {"state_dict": get_model_state_dict(module)}
        _distributed_checkpoint_load(state, path)
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            _distributed_checkpoint_load(optim_state, path)
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def _activation_dtype(self, trainer: Any) -> torch.dtype:
        if self.activation_dtype is not None:
            return to_dtype(self.activation_dtype)
        if self.param_dtype is not None and self.data_parallel_size > 1:
            return to_dtype(self.param_dtype)
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(
            str(trainer.precision), torch.float32
        )

    # ------------------------------------------------------------------ steps

    def _run(self, batch: dict[str, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """The batch through the pipeline: ``(loss, MoE aux loss)``, each the mean over microbatches (and
        over the data-parallel replicas), the same on every rank."""
        assert self.pipeline is not None
        if "segment_ids" in batch:  # the stages would silently mix the documents
            raise ValueError("data.packing='documents' is not supported by the pipeline strategy (its stages "
                             "take tokens only); use data.packing: concat, or DDP / FSDP2")
        plugin = self.precision_plugin
        with plugin.train_step_context() if train else plugin.val_step_context():
            loss, aux = self.pipeline.step(batch["input_ids"], batch["labels"], train=train, return_aux=True)
        if self.data_parallel_size > 1:
            loss = self.reduce(loss, reduce_op="mean")
            aux = self.reduce(aux, reduce_op="mean")
        return loss, aux

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        batch = args[0] if args else kwargs["batch"]
        module = self.lightning_module
        for p in module.parameters():  # Lightning's zero_grad comes after training_step: too late here
            p.grad = None
        loss, aux = self._run(batch, train=True)
        # Lightning zeroes the gradients between training_step and backward (its closure runs
        # step -> zero_grad -> backward), but the schedule has already run the backward passes:
        # keep this step's gradients aside until `backward` puts them back. No strategy hook can skip
        # that zero_grad (it is the LightningModule's optimizer_zero_grad), and the schedule cannot
        # move into `backward`: training_step must return the loss that on_before_backward checks.
        self._grads = [(p, p.grad) for p in module.parameters() if p.grad is not None]
        for p, _ in self._grads:
            p.grad = None
        bs = batch["input_ids"].shape[0]
        module.log_train_step(loss, aux, bs)
        if self.log_bytes:
            sent = self.pipeline.bytes_per_microbatch_tensor()  # on the device: no host sync a step
            module.log("pp/bytes_fwd_per_microbatch", sent[0], batch_size=bs)
            module.log("pp/bytes_bwd_per_microbatch", sent[1], batch_size=bs)
            self.pipeline.cache.reset_counts()
        log_peak_memory(self)
        return loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # the schedule ran the backward of every microbatch inside training_step: restore its gradients,
        # between the hooks a backward runs (NaNGuard's loss check is in on_before_backward)
        grads, self._grads = self._grads, []
        module = self.lightning_module
        self.precision_plugin.pre_backward(closure_loss, module)
        for p, g in grads:
            p.grad = g if p.grad is None else p.grad + g
        return self.precision_plugin.post_backward(closure_loss, module)

    def validation_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._eval(args[0] if args else kwargs["batch"], "val")

    def test_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._eval(args[0] if args else kwargs["batch"], "test")

    def _eval(self, batch: dict[str, Tensor], prefix: str) -> Tensor:
        loss, _ = self._run(batch, train=False)
        self.pipeline.cache.reset_counts()
        self.lightning_module.log(
            f"{prefix}/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0]
        )
        return loss

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "PipelineParallelStrategy does not predict: the logits live on the last stage only; load the "
            "(layout-independent) checkpoint in one process or under FSDP2Strategy to predict"
        )
