"""The Kimi-Linear-style decoder (KDA / MLA token mixers, MoE channel mixers) with a pluggable residual
path. Plain PyTorch: parallelism and training live elsewhere.

    from attnres.model import Decoder, get_config
    model = Decoder(get_config("tiny", residual="full"))
    out = model(input_ids, labels=labels)          # out.loss, out.aux_loss, out.logits
    out = model(input_ids, labels=labels, segment_ids=segment_ids)  # packed documents, mixed apart
"""

from __future__ import annotations

from attnres.model.config import PRESETS, Config, _human, get_config, valid_num_blocks
from attnres.model.decoder import Decoder, DecoderCache, ModelOutput

__all__ = [
    "PRESETS",
    "Config",
    "Decoder",
    "DecoderCache",
    "ModelOutput",
    "describe",
    "get_config",
    "valid_num_blocks",
]


def describe(name_or_config: str | Config) -> str:
    """Total and active (per token) parameters, training FLOPs per token and the layer plan of a preset
    or config (computed from the config: nothing is built)."""
    c = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    total, active = c.num_params(), c.num_params(active=True)
    lines = [
        f"model {c.name}: {c.num_layers} layers, dim {c.dim}, vocab {c.vocab_size}, residual {c.residual}"
        + (f" ({c.num_blocks} blocks)" if c.residual == "block" else ""),
        f"parameters: total {_human(total)} ({total:,}), active per token {_human(active)} ({active:,})",
        f"training FLOPs per token at seq {c.max_seq_len}: {c.flops_per_token():.3e}",
        c.layer_plan(),
    ]
    return "\n".join(lines)
