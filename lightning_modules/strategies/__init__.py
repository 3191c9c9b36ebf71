"""Lightning strategies that apply attnres's parallelism (:mod:`attnres.parallel`) from outside the model.

* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` (FSDP2, DCP sharded checkpoints) with
  one ``fully_shard`` unit per sublayer (two per decoder layer) and FSDP2 mixed precision
  (``configs/trainer/fsdp.yaml``).
* :class:`PipelineParallelStrategy`: pipeline stages run by ``torch.distributed.pipelining`` (GPipe,
  1F1B, Interleaved1F1B), optionally x FSDP2 on a ``["pp", "dp"]`` mesh, with cross-stage caching of
  the AttnRes block summaries (``configs/trainer/pipeline.yaml``).

:func:`configure_model_parallelism` is what ``LanguageModel.configure_model`` calls.
"""

from lightning_modules.strategies.fsdp import FSDP2Strategy, configure_model_parallelism
from lightning_modules.strategies.pipeline import PipelineParallelStrategy, clip_grad_norm_across_stages

__all__ = [
    "FSDP2Strategy",
    "PipelineParallelStrategy",
    "clip_grad_norm_across_stages",
    "configure_model_parallelism",
]
