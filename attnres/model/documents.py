"""Document boundaries inside packed windows (``data.packing: documents``).

A packed window holds the tail of one document, whole documents and the head of another, joined by
the ``<|endoftext|>`` separator. With document masking no token mixer reads across a boundary: MLA
attends within the document only (a block-diagonal causal mask), KDA's state and short convolutions
start from zero at each document start. Depth attention (Full / Block AttnRes) is per token and
needs nothing.

The batch carries the boundaries as **segment ids** ``[B, T]`` (int): equal ids mark one document,
each document one contiguous run. Why this representation rather than ``cu_seqlens``:

* it has the static shape of ``input_ids``, so it batches, shards over data-parallel ranks and
  traces under ``torch.compile`` like the tokens (``cu_seqlens`` has a data-dependent length);
* each consumer derives what it needs in one vectorised expression: MLA the mask
  ``seg_i == seg_j and j <= i``, the short conv ``seg_t == seg_{t-j}``, our chunked KDA the same
  pairwise test inside a chunk, fla's varlen KDA ``cu_seqlens`` of the flattened batch.

:class:`DocumentMask` derives these once per forward, so every layer shares them (fla caches its
chunk indices per ``cu_seqlens`` tensor: one host sync per forward, not one per layer).

Boundary convention (:func:`segment_ids_from_separators`): a document starts *at* its separator, i.e.
the separator acts as the next document's beginning-of-sequence token. The last token of a document
predicts the separator from its own document; the separator predicts the next document's first token
from the separator alone. So no training target depends on another document and no label is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DocumentMask", "segment_ids_from_separators", "segment_starts"]


def segment_ids_from_separators(input_ids: Tensor, sep_id: int) -> Tensor:
    """Segment ids ``[..., T]`` (int64) of windows ``input_ids [..., T]`` whose documents are joined by
    ``sep_id``: a new segment starts at every separator (and the window's first token starts one)."""
    return (input_ids == sep_id).long().cumsum(-1)


def segment_starts(segment_ids: Tensor) -> Tensor:
    """``[B, T]`` bool: True where a document starts (position 0 and every change of segment id)."""
    first = torch.ones_like(segment_ids[:, :1], dtype=torch.bool)
    return torch.cat([first, segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)


@dataclass
class DocumentMask:
    """The document boundaries of a batch, in the forms the token mixers consume.

    segment_ids: ``[B, T]`` int (one contiguous run per document).
    attn_mask: ``[B, 1, T, T]`` bool, True where query ``i`` may attend key ``j`` (same document,
    ``j <= i``): MLA's block-diagonal causal mask (None when the model has no MLA layer).
    cu_seqlens: ``[N + 1]`` int64, the document boundaries of the batch flattened to ``[1, B * T]``
    (each row starts a document), on the batch's device, with a CPU copy ``cu_seqlens_cpu``: fla's
    varlen KDA (None when no layer runs fla).
    """

    segment_ids: Tensor
    attn_mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    cu_seqlens_cpu: Tensor | None = None

    @classmethod
    def build(cls, segment_ids: Tensor, attention: bool = True, varlen: bool = False) -> DocumentMask:
        """From ``segment_ids [B, T]``; ``attention``: build MLA's mask; ``varlen``: build ``cu_seqlens``
        (a host sync: its length depends on the data)."""
        if segment_ids.ndim != 2 or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(
                f"segment_ids must be an integer tensor [B, T] like input_ids, got {segment_ids.dtype} "
                f"{list(segment_ids.shape)}"
            )
        mask = None
        if attention:
            T = segment_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
            mask = mask.unsqueeze(1)
        cu = cu_cpu = None
        if varlen:
            starts = segment_starts(segment_ids).flatten()
            total = torch.tensor([starts.numel()], device=starts.device)
            cu = torch.cat([starts.nonzero().flatten(), total]).long()
            cu_cpu = cu.cpu()
        return cls(segment_ids, mask, cu, cu_cpu)
