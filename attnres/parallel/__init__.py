"""Parallelism applied from outside the model (torchtitan style): FSDP2 and pipeline stages.

Plain PyTorch (no Lightning); the decoder (:class:`attnres.model.Decoder`) knows nothing of this.

* :mod:`~attnres.parallel.fsdp`: :func:`apply_fsdp`, one ``fully_shard`` unit per sublayer;
* :mod:`~attnres.parallel.pipeline`: :func:`keep_layers` (the one pruning function), the stage adapter
  and :func:`build_pipeline` over ``torch.distributed.pipelining``;
* :mod:`~attnres.parallel.stage_cache`: which residual sources cross which stage boundary, and the
  rank's per-microbatch cache of them;
* :mod:`~attnres.parallel.mesh`: :func:`init_mesh` (the 2-D ``["pp", "dp"]`` mesh) and
  :func:`close_process_groups`.
"""

from attnres.parallel.fsdp import apply_fsdp
from attnres.parallel.mesh import close_process_groups, init_mesh
from attnres.parallel.pipeline import (
    SCHEDULES,
    CachingPipelineStage,
    Pipeline,
    PipelineStageModule,
    ScheduleName,
    build_pipeline,
    keep_layers,
    payload_bytes,
    split_layers,
)
from attnres.parallel.stage_cache import StageCache, StageLayout

__all__ = [
    "SCHEDULES",
    "CachingPipelineStage",
    "Pipeline",
    "PipelineStageModule",
    "ScheduleName",
    "StageCache",
    "StageLayout",
    "apply_fsdp",
    "build_pipeline",
    "close_process_groups",
    "init_mesh",
    "keep_layers",
    "payload_bytes",
    "split_layers",
]
