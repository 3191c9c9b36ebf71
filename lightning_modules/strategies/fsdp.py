"""FSDP2 through Lightning's ``ModelParallelStrategy``: one ``fully_shard`` unit per sublayer.

``ModelParallelStrategy`` brings the process group, the device mesh, sharded DCP checkpoints (a
folder: one file per rank plus Lightning's metadata; loadable at any other world size or layout,
since the parameter names are those of the full model) and the distributed sampler. The sharding
itself happens in ``LanguageModel.configure_model`` -> :func:`configure_model_parallelism`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from attnres.parallel import apply_fsdp

DTypeName = Literal["float32", "bfloat16", "float16"]


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (one ``fully_shard`` unit per sublayer, see ``apply_fsdp``) over ``data_parallel_size`` ranks.

    Args:
        data_parallel_size: ranks that shard the model (``"auto"``: the world size).
        param_dtype: FSDP2 mixed precision: the dtype parameters are gathered and computed in
            (``bfloat16`` on GPUs; None: the parameters' own, fp32). Keep ``trainer.precision: 32-true``:
            the master weights and the optimizer state stay fp32.
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free the gathered parameters after each layer's forward (ZeRO-3;
            False keeps them until backward: ZeRO-2, more memory, less communication).
        save_distributed_checkpoint: sharded DCP checkpoints (a folder); False gathers one file on rank 0.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        param_dtype: DTypeName | None = None,
        reduce_dtype: DTypeName | None = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        log_peak_memory(self)
        return out

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()


def log_peak_memory(strategy: Any) -> None:
    """Log ``train/peak_mem_gib``: the most CUDA memory this rank has allocated so far (CUDA only)."""
    if strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(strategy.root_device) / 2**30
        strategy.lightning_module.log(
            "train/peak_mem_gib", peak, on_step=True, on_epoch=False, reduce_fx="max"
        )


def configure_model_parallelism(module: Any) -> None:
    """Apply the strategy's parallelism to ``module.model`` (a :class:`attnres.model.Decoder`); called
    from ``LanguageModel.configure_model``. Under a ``ModelParallelStrategy`` (and :class:`FSDP2Strategy`)
    each sublayer (PreNorm + mixer) becomes a ``fully_shard`` unit over the data-parallel mesh; a
    pipeline strategy splits the model itself (in its ``setup``); otherwise nothing happens. Idempotent."""
    from torch.distributed.fsdp import FSDPModule

    from lightning_modules.strategies.pipeline import PipelineParallelStrategy

    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy) or isinstance(strategy, PipelineParallelStrategy):
        return
    if isinstance(module.model, FSDPModule):
        return
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: attnres has no tensor parallelism; "
            "use tensor_parallel_size=1 (or FSDP2Strategy) and put every rank into data_parallel_size"
        )
    fsdp = strategy if isinstance(strategy, FSDP2Strategy) else None
    apply_fsdp(
        module.model,
        mesh["data_parallel"],
        param_dtype=_dtype(fsdp.param_dtype) if fsdp else None,
        reduce_dtype=_dtype(fsdp.reduce_dtype) if fsdp else torch.float32,
        reshard_after_forward=fsdp.reshard_after_forward if fsdp else True,
    )
