"""Cross-stage caching of residual sources under pipeline parallelism: the layout and the cache.

Under pipeline parallelism with Block (or Full) AttnRes every stage needs every block summary
produced before it, so the payload of a stage boundary is the summaries so far plus the partial
summary. Interleaved (virtual-stage) schedules bring a microbatch back to a rank several times;
a rank keeps, per microbatch, the summaries it has received or produced, and a boundary sends only
what the receiving rank lacks: the summaries completed since that rank's last visit (with one stage
per rank this is everything, so plain 1F1B sends the same with or without the cache).

This module holds

* :class:`StageLayout`: where the summaries are produced (per stage: the sources completed after it,
  whether a partial summary crosses its output boundary, the rank it runs on);
* :class:`StageCache`: one rank's per-microbatch cache: which summary ids a stage takes from the cache,
  receives, sends and keeps; the kept tensors (autograd leaves whose ``.grad`` accumulates over the later
  stages that read them); and the byte counts per microbatch and direction, with the invariant check
  "each summary crosses each link at most once per microbatch and direction".

The tensors of one boundary travel as one buffer (:func:`attnres.ops.pack` / :func:`attnres.ops.unpack`;
:mod:`attnres.parallel.pipeline` does that).

Gradients: a later stage reads a cached summary through a leaf, so its gradient accumulates locally
in ``leaf.grad``; the stage that put it there adds that gradient in its own backward (which the
schedule runs after every later stage's backward of the same microbatch), so it travels back across
the earlier boundaries once, as part of that stage's input gradient.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Direction", "StageCache", "StageLayout"]

Direction = str  # "forward" (activations, stage k -> k+1) or "backward" (gradients, k+1 -> k)
DIRECTIONS: tuple[str, ...] = ("forward", "backward")


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class StageLayout:
    """Where the residual sources are produced along a pipeline of ``K`` stages.

    ``sources_after[k]``: sources completed after stage ``k`` (the embedding ``b_0`` and the block
    summaries ``b_1 ..``; Full AttnRes: every sublayer output). ``partial_after[k]``: a partial summary
    crosses the boundary after stage ``k`` (the boundary is inside a block). ``stage_rank[k]``: the
    rank stage ``k`` runs on. ``hidden``: the standard residual, whose payload is the hidden state.
    """

    sources_after: tuple[int, ...]
    partial_after: tuple[bool, ...]
    stage_rank: tuple[int, ...]
    hidden: bool = False

    @classmethod
    def build(
        cls, sublayers_per_stage: Sequence[int], block_size: int, stage_rank: Sequence[int]
    ) -> StageLayout:
        """From the sublayers each stage owns (in stage order), the block size in sublayers
        (0: standard residual, 1: Full AttnRes) and the rank of each stage."""
        if len(sublayers_per_stage) != len(stage_rank):
            raise ValueError(f"{len(sublayers_per_stage)} stages but {len(stage_rank)} stage ranks")
        if any(n < 1 for n in sublayers_per_stage):
            raise ValueError(f"every stage must own at least one sublayer, got {list(sublayers_per_stage)}")
        done, sources, partial = 0, [], []
        for n in sublayers_per_stage:
            done += n
            sources.append(0 if block_size == 0 else 1 + done // block_size)
            partial.append(block_size > 0 and done % block_size != 0)
        return cls(tuple(sources), tuple(partial), tuple(stage_rank), hidden=block_size == 0)

    @property
    def num_stages(self) -> int:
        return len(self.sources_after)

    def sources_before(self, k: int) -> int:
        """Sources completed before stage ``k`` (its input needs all of them)."""
        return 0 if k == 0 else self.sources_after[k - 1]

    def link(self, k: int, direction: Direction) -> tuple[int, int]:
        """The (sending rank, receiving rank) of the boundary after stage ``k``."""
        a, b = self.stage_rank[k], self.stage_rank[k + 1]
        return (a, b) if direction == "forward" else (b, a)


# ----------------------------------------------------------------------------- the cache


class StageCache:
    """One rank's per-microbatch cache of residual sources, and the byte counter of its sends.

    ``enabled=False`` is the baseline: every boundary sends all sources so far (plus the partial).
    Ids are source indices (0: the embedding, j: the j-th block summary).
    """

    def __init__(self, layout: StageLayout, rank: int, enabled: bool = True) -> None:
        self.layout = layout
        self.rank = rank
        self.enabled = enabled and not layout.hidden
        self._held: dict[int, dict[int, Tensor]] = defaultdict(dict)  # microbatch -> id -> leaf
        self.bytes: Counter[tuple[int, str]] = Counter()  # (microbatch, direction) -> bytes sent
        self.crossings: Counter[tuple[int, str, tuple[int, int], int]] = Counter()  # (mb, dir, link, id)

    # ------------------------------------------------------------------ the plan (static per stage)

    def _prev_visit(self, k: int) -> int | None:
        r = self.layout.stage_rank[k]
        return next((j for j in range(k - 1, -1, -1) if self.layout.stage_rank[j] == r), None)

    def _next_visit(self, k: int) -> int | None:
        r = self.layout.stage_rank[k]
        return next((j for j in range(k + 1, self.layout.num_stages) if self.layout.stage_rank[j] == r), None)

    def held_before(self, k: int) -> int:
        """Sources the rank of stage ``k`` holds in its cache when stage ``k`` starts (ids 0 .. n-1)."""
        prev = self._prev_visit(k)
        return self.layout.sources_after[prev] if self.enabled and prev is not None else 0

    def cached_ids(self, k: int) -> list[int]:
        """Ids stage ``k`` reads from this rank's cache."""
        return list(range(self.held_before(k)))

    def recv_ids(self, k: int) -> list[int]:
        """Ids stage ``k`` receives from stage ``k-1`` (what its rank lacks)."""
        return [] if k == 0 else list(range(self.held_before(k), self.layout.sources_before(k)))

    def send_ids(self, k: int) -> list[int]:
        """Ids stage ``k`` sends to stage ``k+1``."""
        return self.recv_ids(k + 1)

    def keep_ids(self, k: int) -> list[int]:
        """Ids stage ``k`` puts in the cache for a later stage on its rank (received or produced)."""
        if not self.enabled or self._next_visit(k) is None:
            return []
        return self.recv_ids(k) + list(range(self.layout.sources_before(k), self.layout.sources_after[k]))

    def payload_sources(self, k: int) -> int:
        """Tensors ``[B, T, d]`` in the payload after stage ``k``: the summaries sent, the partial,
        or the hidden state of the standard residual."""
        if self.layout.hidden:
            return 1
        return len(self.send_ids(k)) + int(self.layout.partial_after[k])

    def analytic_bytes(self, source_bytes: int) -> int:
        """Bytes one microbatch sends in one direction over all boundaries, summed over the ranks,
        when one source ``[B, T, d]`` takes ``source_bytes`` bytes."""
        return sum(self.payload_sources(k) for k in range(self.layout.num_stages - 1)) * source_bytes

    # ------------------------------------------------------------------ the tensors

    def put(self, microbatch: int, ids: Sequence[int], tensors: Sequence[Tensor]) -> None:
        """Keep ``tensors`` (sources ``ids``) for later stages of ``microbatch`` on this rank, as leaves
        of their own so that the later stages' gradients accumulate here."""
        held = self._held[microbatch]
        for i, t in zip(ids, tensors, strict=True):
            if i in held:
                raise RuntimeError(f"source {i} of microbatch {microbatch} is already cached")
            held[i] = t.detach().requires_grad_(t.requires_grad)

    def get(self, microbatch: int, ids: Sequence[int]) -> list[Tensor]:
        held = self._held.get(microbatch, {})
        missing = [i for i in ids if i not in held]
        if missing:
            raise RuntimeError(f"sources {missing} of microbatch {microbatch} are not cached here")
        return [held[i] for i in ids]

    def pop_grads(self, microbatch: int, ids: Sequence[int]) -> list[Tensor | None]:
        """The accumulated gradients of the cached sources ``ids`` (None where no later stage used one),
        removing them from the cache: the stage that put them is running its backward."""
        held = self._held.get(microbatch, {})
        grads = [held.pop(i).grad if i in held else None for i in ids]
        if not held:
            self._held.pop(microbatch, None)
        return grads

    def clear(self) -> None:
        """Drop every cached tensor (start of a step, or after a forward-only pass)."""
        self._held.clear()

    def num_cached(self) -> int:
        return sum(len(h) for h in self._held.values())

    # ------------------------------------------------------------------ counting

    def count(self, microbatch: int, direction: Direction, k: int, nbytes: int) -> None:
        """Record the send over the boundary after stage ``k`` (forward: k -> k+1; backward: the
        gradient k+1 -> k) of ``nbytes`` bytes carrying the sources ``send_ids(k)``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.bytes[(microbatch, direction)] += nbytes
        link = self.layout.link(k, direction)
        for i in self.send_ids(k):
            self.crossings[(microbatch, direction, link, i)] += 1

    def max_crossings(self) -> int:
        """The most times one source crossed one link in one direction for one microbatch (the
        invariant: 1 with the cache)."""
        return max(self.crossings.values(), default=0)

    def reset_counts(self) -> None:
        self.bytes.clear()
        self.crossings.clear()

    def bytes_per_microbatch(self) -> dict[str, float]:
        """Mean bytes this rank sent per microbatch, per direction."""
        mbs = {mb for mb, _ in self.bytes}
        total = {d: sum(v for (_, dd), v in self.bytes.items() if dd == d) for d in DIRECTIONS}
        return {d: v / max(len(mbs), 1) for d, v in total.items()}
