"""Depth-attention diagnostics for plots and ``return_stats``, off the training path: recorded only
when a forward pass begins with ``record=True`` (which also keeps every input unfused)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnres import reference

if TYPE_CHECKING:
    from attnres.residual.block import _AttnRes
    from attnres.residual.state import ResidualState


def record(residual: _AttnRes, state: ResidualState, i: int, sources: list[Tensor]) -> None:
    """Append to ``state.records`` the mean depth weights ``[n]`` of sublayer ``i`` (``num_sublayers``:
    the read-out) over ``sources`` (n x ``[B, T, d]``) and the sources' mean RMS ``[n]``."""
    name = "out" if i == residual.num_sublayers else str(i)
    with torch.no_grad():
        q = residual.queries[name]().detach()
        w = reference.depth_weights([s.detach() for s in sources], q, residual.eps)  # [n, B, T]
        norms = torch.stack([reference.rms(s.detach(), 0.0).mean() for s in sources])
    state.records.append({"sublayer": i, "weights": w.flatten(1).mean(1).cpu(), "source_norms": norms.cpu()})


def depth_weight_matrix(residual: _AttnRes, records: list[dict]) -> Tensor:
    """Mean depth-attention weights as a ``[num sources, num sublayers + 1]`` matrix (NaN where a
    sublayer does not attend to a source): columns are sublayers (the last is the read-out).
    In Block mode rows are ``b_0 .. b_N`` and a final row for the partial summary."""
    block = residual.mode == "block"
    n_rows = residual.num_sublayers + 1 if residual.mode == "full" else residual.num_blocks + 2
    m = torch.full((n_rows, len(records)), float("nan"))
    for c, r in enumerate(records):
        w = r["weights"]
        i = r["sublayer"]
        if block and i < residual.num_sublayers and i % residual.block_size != 0:  # it saw the partial
            m[: len(w) - 1, c] = w[:-1]
            m[-1, c] = w[-1]
        else:
            m[: len(w), c] = w
    return m
