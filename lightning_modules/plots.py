"""Figures of the residual path (matplotlib, Agg backend): what AttnRes learns across depth.

* ``depth_heatmap``: the mean depth-attention weight of every source (rows) for every sublayer
  input and the read-out (columns); empty where a sublayer does not see a source.
* ``magnitudes``: RMS of each sublayer's output and of the hidden state vs depth (the paper's
  "bounded magnitudes" plot; the standard residual's hidden state grows with depth).
* ``grad_norms``: gradient norm of each sublayer vs depth (AttnRes makes it more uniform).
* ``loss_curves``: train/val loss of several runs (``attnres compare``).

Each function takes plain numbers, writes a PNG and returns the figure's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def source_labels(mode: str, num_rows: int) -> list[str]:
    """Row names of a depth-weight matrix: Full: v_0..v_L; Block: b_0..b_N and the partial sum p."""
    if mode == "block":
        return [f"b{i}" for i in range(num_rows - 1)] + ["partial"]
    return [f"v{i}" for i in range(num_rows)]


def depth_heatmap_figure(matrix: np.ndarray, mode: str, title: str = "") -> Figure:
    m = np.asarray(matrix, dtype=float)
    rows, cols = m.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 16), min(1.5 + 0.4 * rows, 12)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(
        np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(cols), [str(i) for i in range(cols - 1)] + ["out"], fontsize=7)
    ax.set_yticks(range(rows), source_labels(mode, rows), fontsize=7)
    ax.set_xlabel("sublayer (input of) → read-out")
    ax.set_ylabel("source")
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(m[r, c]):
                    ax.text(
                        c,
                        r,
                        f"{m[r, c]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if m[r, c] < 0.6 else "black",
                    )
    fig.colorbar(im, ax=ax, label="mean depth-attention weight")
    ax.set_title(title or f"depth attention ({mode} AttnRes)")
    return fig


def depth_heatmap(matrix: np.ndarray, mode: str, path: str | Path, title: str = "") -> Path:
    """``matrix [sources, sublayers + 1]`` (NaN: not attended) as a heatmap PNG."""
    return _save(depth_heatmap_figure(matrix, mode, title), path)


def magnitudes_figure(output_rms: Sequence[float], hidden_rms: Sequence[float], title: str = "") -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(1, len(output_rms) + 1), output_rms, "o-", ms=3, label="sublayer output RMS")
    ax.plot(range(len(hidden_rms)), hidden_rms, "s-", ms=3, label="hidden state RMS (input of sublayer i)")
    ax.set_xlabel("depth: sublayer i (output v_i at i, its input at i - 1; L = read-out)")
    ax.set_ylabel("RMS")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "magnitude vs depth")
    return fig


def magnitudes(
    output_rms: Sequence[float], hidden_rms: Sequence[float], path: str | Path, title: str = ""
) -> Path:
    """Output RMS of sublayers 1..L and hidden-state RMS at depths 0..L, log scale."""
    return _save(magnitudes_figure(output_rms, hidden_rms, title), path)


def grad_norms_figure(norms: dict[str, float], title: str = "") -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(norms)
    parts = sorted({n.split(".", 1)[1] for n in names})
    for part in parts:
        xs = [i for i, n in enumerate(names) if n.split(".", 1)[1] == part]
        ax.plot(xs, [norms[names[i]] for i in xs], "o-", ms=3, label=part)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_xlabel("sublayer (layer.part), in depth order")
    ax.set_ylabel("gradient L2 norm")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "gradient norm vs depth")
    return fig


def grad_norms(norms: dict[str, float], path: str | Path, title: str = "") -> Path:
    """Gradient norms keyed ``"<layer>.<part>"`` in depth order (see ``metrics.grad_norms_by_depth``)."""
    return _save(grad_norms_figure(norms, title), path)


def loss_curves(
    runs: dict[str, dict[str, tuple[list[int], list[float]]]], path: str | Path, title: str = ""
) -> Path:
    """``runs[name] = {"train": (steps, losses), "val": (steps, losses)}`` -> one PNG, two panels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, split in zip(axes, ("train", "val")):
        for name, curves in runs.items():
            steps, losses = curves.get(split, ([], []))
            if steps:
                ax.plot(steps, losses, "-" if split == "train" else "o-", ms=3, lw=1, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{split} loss")
    fig.suptitle(title or "standard vs Block vs Full AttnRes")
    return _save(fig, path)
