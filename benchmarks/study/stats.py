"""Noise estimates for the study's claims (issue 25): power-law fits with bootstrap intervals over the
seeds, the compute-equivalence ratio with its interval (or the reason a fit cannot support one), and each
mode's best learning rate from a sweep, with a check that it is not at the sweep's edge.

Bootstrap: every draw resamples, within each size, that size's seed losses with replacement (a size run
with one seed contributes its one value to every draw, so its seed noise is not in the interval: the
results say how many seeds each size had), refits ``log L = log a + b log C`` on the draw's per-size means,
and the interval is the draws' percentile interval at ``level``. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVEL = 0.9
DRAWS = 2000


def _fit(log_c: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of ``log L`` on ``log C`` for each row of ``means`` ``[draws, sizes]``: (a, b)."""
    x = log_c - log_c.mean()
    y = np.log(means)
    b = (y - y.mean(axis=1, keepdims=True)) @ x / (x @ x)
    log_a = y.mean(axis=1) - b * log_c.mean()
    return np.exp(log_a), b


def _draws(points: Mapping[float, Sequence[float]], n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, sizes]``: per draw and size (in ``points``' order), the mean of the seeds resampled."""
    cols = []
    for losses in points.values():
        v = np.asarray(losses, dtype=float)
        cols.append(v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1))
    return np.stack(cols, axis=1)


def power_law_interval(points: Mapping[float, Sequence[float]], level: float = LEVEL, n: int = DRAWS,
                       seed: int = 0) -> dict[str, Any]:
    """``points``: compute -> the seeds' final losses at that size (two or more sizes). The fit of
    ``L = a C**b`` on the seed means, and the percentile interval of ``b`` at ``level`` over ``n``
    bootstrap draws."""
    if len(points) < 2:
        raise ValueError("a power-law fit needs two or more sizes")
    log_c = np.log(np.asarray(list(points), dtype=float))
    means = np.array([[np.mean(v) for v in points.values()]])
    a, b = _fit(log_c, means)
    _, bs = _fit(log_c, _draws(points, n, np.random.default_rng(seed)))
    lo, hi = np.quantile(bs, [(1 - level) / 2, (1 + level) / 2])
    return {"a": float(a[0]), "b": float(b[0]), "b_lo": float(lo), "b_hi": float(hi), "level": level,
            "draws": n, "seeds_per_size": [len(v) for v in points.values()]}


def equivalence_interval(variant: Sequence[float], compute: float, baseline: Mapping[float, Sequence[float]],
                         level: float = LEVEL, n: int = DRAWS, seed: int = 0) -> dict[str, Any]:
    """The compute-equivalence ratio ``r = (L_v / a_s) ** (1 / b_s) / C`` of a variant whose seeds reached
    ``variant`` losses at ``compute``, against the baseline's law fitted on ``baseline`` (compute -> seed
    losses), with its percentile interval: the variant's seeds and the baseline's resampled together.
    ``r`` is only defined while the baseline's law falls with compute (``b_s < 0``); when more than
    ``(1 - level) / 2`` of the draws have ``b_s >= 0`` the interval is unbounded, and ``reason`` says so."""
    rng = np.random.default_rng(seed)
    log_c = np.log(np.asarray(list(baseline), dtype=float))
    a, b = _fit(log_c, np.array([[np.mean(v) for v in baseline.values()]]))
    a_d, b_d = _fit(log_c, _draws(baseline, n, rng))
    lv = np.asarray(variant, dtype=float)
    lv_d = lv[rng.integers(0, len(lv), size=(n, len(lv)))].mean(axis=1)
    point = (float(np.mean(lv)) / a[0]) ** (1 / b[0]) / compute if b[0] < 0 else math.inf
    rising = float(np.mean(b_d >= 0))
    out: dict[str, Any] = {"ratio": point, "level": level, "draws": n, "baseline_b": float(b[0]),
                           "share_of_draws_with_b_at_least_0": rising}
    if rising > (1 - level) / 2:
        out.update(lo=None, hi=None, reason=(
            f"the baseline's fitted exponent is not below 0 in {100 * rising:.0f} % of the draws: its law "
            "does not reliably fall with compute, so no compute matches a loss (the ratio is unbounded)"))
        return out
    ok = b_d < 0
    r = np.exp((np.log(lv_d[ok]) - np.log(a_d[ok])) / b_d[ok] - math.log(compute))
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    out.update(lo=float(lo), hi=float(hi), reason=None)
    return out


def difference_interval(base: Sequence[float], other: Sequence[float], level: float = LEVEL, n: int = DRAWS,
                        seed: int = 0) -> dict[str, Any]:
    """``mean(other) - mean(base)`` of two sets of seed losses, with the percentile interval of that
    difference over ``n`` bootstrap draws that resample each set's seeds. With three seeds a side the
    percentile interval is narrower than a t interval would be; ``seeds`` says how many there were."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("a difference needs at least one loss on each side")
    d = (b[rng.integers(0, len(b), size=(n, len(b)))].mean(axis=1)
         - a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1))
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(b.mean() - a.mean()), "lo": float(lo), "hi": float(hi), "level": level,
            "seeds": [len(a), len(b)]}


def best_rate(losses: Mapping[float, Sequence[float] | Mapping[int, float]]) -> dict[str, Any]:
    """``losses``: learning rate -> the seeds' final losses, a list or ``{seed: loss}``. The rate with the
    lowest mean loss, the mean per rate (over all its seeds), and whether the best sits at the sweep's
    edge (its lowest or highest rate: the optimum may lie beyond, so extend the sweep).

    With ``{seed: loss}`` for every rate and seeds that differ between rates, the rates are compared on
    the seeds they all have (``compared_on``): a rate run at three seeds would otherwise be judged by its
    mean against another rate's single, perhaps lucky, seed (the study's m, session 22: 1.5e-3 at seeds
    0-2 against 3e-3 at seed 0 only)."""
    if not losses:
        raise ValueError("no learning rates")
    by = {float(lr): v for lr, v in sorted(losses.items())}
    means = {lr: float(np.mean(list(v.values()) if isinstance(v, Mapping) else v)) for lr, v in by.items()}
    common = None
    if all(isinstance(v, Mapping) for v in by.values()):
        shared = sorted(set.intersection(*(set(v) for v in by.values())))
        if shared and any(len(v) > len(shared) for v in by.values()):
            common = shared
    judged = means if common is None else {lr: float(np.mean([v[k] for k in common])) for lr, v in by.items()}
    best = min(judged, key=judged.get)
    edge = len(means) > 1 and best in (min(means), max(means))
    out = {"best": best, "means": means, "at_edge": edge, "points": len(means)}
    if common is not None:
        out["compared_on"] = common
    return out
