"""FSDP2 (``fully_shard``) applied to a decoder from outside, one unit per sublayer."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["apply_fsdp"]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    layers: nn.ModuleDict | None = None,
) -> nn.Module:
    """Shard ``model`` (a :class:`Decoder`, a pruned one, or a pipeline stage holding one) with FSDP2:
    one ``fully_shard`` unit per sublayer (its PreNorm and its token or channel mixer, grouped), and one
    for the rest (embedding, depth queries, final norm, head) at the root. Per sublayer rather than per
    decoder layer because the decoder calls the two sublayers of a layer separately: a per-layer unit
    would be gathered twice per forward (and per backward). ``mesh``: the 1-D data-parallel mesh
    (``mesh["dp"]`` of the 2-D mesh). ``param_dtype``: mixed-precision compute dtype (e.g. bf16; None:
    the parameters' own), gradients reduced in ``reduce_dtype``. ``layers``: the decoder layers to
    shard per sublayer (default ``model.layers``; a pipeline stage passes its decoder's, so that the
    stage itself is the root unit the schedule drives). In place; returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    layers = getattr(model, "layers", None) if layers is None else layers
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
