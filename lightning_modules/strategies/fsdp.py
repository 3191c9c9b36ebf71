"""FSDP2 through Lightning's ``ModelParallelStrategy``: one ``fully_shard`` unit per sublayer.

``ModelParallelStrategy`` brings the process group, the device mesh, sharded DCP checkpoints (a
folder: one file per rank plus Lightning's metadata; loadable at any other world size or layout,
since the parameter names are those of the full model) and the distributed sampler. The sharding
itself happens when ``LanguageModel.configure_model`` calls :meth:`FSDP2Strategy.parallelize`
(:func:`shard_data_parallel`, which Lightning's own ``ModelParallelStrategy`` gets with its defaults).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from attnres.parallel import apply_fsdp
from lightning_modules.strategies.common import DTypeName, log_peak_memory, to_dtype


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

    def parallelize(self, model: nn.Module) -> None:
        """Shard ``model`` with this strategy's settings (:func:`shard_data_parallel`); called by
        ``LanguageModel.configure_model``."""
        shard_data_parallel(
            model,
            self.device_mesh,
            param_dtype=to_dtype(self.param_dtype),
            reduce_dtype=to_dtype(self.reduce_dtype),
            reshard_after_forward=self.reshard_after_forward,
        )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        log_peak_memory(self)
        return out

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()


def shard_data_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """Shard ``model`` (a :class:`attnres.model.Decoder`) over the ``"data_parallel"`` dimension of a
    ``ModelParallelStrategy``'s ``mesh``: each sublayer (PreNorm + mixer) becomes a ``fully_shard`` unit
    (:func:`attnres.parallel.apply_fsdp`). Idempotent (``configure_model`` may run more than once)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return
    if any(getattr(layer, "nested", False) for layer in getattr(model, "layers", {}).values()):
        raise ValueError(
            "model.compile: nested does not combine with FSDP2: each sublayer's fully_shard hooks would run "
            "inside a nested compile region, which cannot hold them; use model.compile: true with FSDP"
        )
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: attnres has no tensor parallelism; "
            "use tensor_parallel_size=1 (or FSDP2Strategy) and put every rank into data_parallel_size"
        )
    apply_fsdp(
        model,
        mesh["data_parallel"],
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        reshard_after_forward=reshard_after_forward,
    )
