"""Lightning strategies that apply attnres's parallelism (:mod:`attnres.parallel`) from outside the model.

* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` (FSDP2, DCP sharded checkpoints) with
  one ``fully_shard`` unit per sublayer (two per decoder layer) and FSDP2 mixed precision
  (``configs/trainer/fsdp.yaml``).
* :class:`PipelineParallelStrategy`: pipeline stages run by ``torch.distributed.pipelining`` (GPipe,
  1F1B, Interleaved1F1B), optionally x FSDP2 on a ``["pp", "dp"]`` mesh, with cross-stage caching of
  the AttnRes block summaries (``configs/trainer/pipeline.yaml``).

``LanguageModel.configure_model`` calls the strategy's ``parallelize(model)``: FSDP2 shards there, the
pipeline splits in its ``setup`` instead. :mod:`~lightning_modules.strategies.common` holds what both share.
"""

from lightning_modules.strategies.common import DTypeName, log_peak_memory, to_dtype
from lightning_modules.strategies.fsdp import FSDP2Strategy, shard_data_parallel
from lightning_modules.strategies.pipeline import PipelineParallelStrategy, clip_grad_norm_across_stages

__all__ = [
    "DTypeName",
    "FSDP2Strategy",
    "PipelineParallelStrategy",
    "clip_grad_norm_across_stages",
    "log_peak_memory",
    "shard_data_parallel",
    "to_dtype",
]
