"""One plotting function per paper figure (matplotlib, Agg; ``ax=None`` style; records in, figure out)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MODEL_STYLE = {"a": ("tab:blue", "-"), "b": ("tab:blue", "--"), "c": ("tab:orange", "-"), "d": ("tab:orange", "--")}


def plot_depth_sweep(frame: pd.DataFrame, axes=None, *, title: str | None = None):
    """Fig. 5: U, L and G (bits) at initialisation against depth k, one line per model.

    Lines are medians over seeds and probe samples; shaded bands the inter-quartile range.
    Rank-deficient samples (U = +inf) are left out and counted in the legend.

    Args:
        frame: rows of :func:`optmech.experiments.depth_sweep.depth_sweep`.
        axes: three matplotlib axes, or None to create a figure.

    Returns:
        The matplotlib Figure.
    """
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    else:
        fig = axes[0].figure
    for ax, column in zip(axes, ("U", "L", "G")):
        for letter, rows in frame.groupby("model"):
            finite = rows[np.isfinite(rows[column])]
            stats = finite.groupby("depth")[column].quantile([0.25, 0.5, 0.75]).unstack()
            color, style = MODEL_STYLE.get(letter, ("gray", "-"))
            family = rows["family"].iloc[0]
            skip = "skip" if bool(rows["skip"].iloc[0]) else "plain"
            dropped = int((~np.isfinite(rows[column])).sum())
            label = f"{letter} ({family}, {skip})" + (f", {dropped} inf dropped" if dropped else "")
            ax.plot(stats.index, stats[0.5], style, color=color, marker="o", ms=3, label=label)
            ax.fill_between(stats.index, stats[0.25], stats[0.75], color=color, alpha=0.15)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("depth k (repeated blocks)")
        ax.set_ylabel(f"{column} (bits)")
        ax.set_title({"U": "U = −log₂ λmin", "L": "L = −log₂ λmax", "G": "G = U − L = log₂(λmax/λmin)"}[column])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    init = ", ".join(sorted(frame["init"].unique())) if "init" in frame else ""
    fig.suptitle(title or f"Structural error at initialisation against depth (median, IQR over seeds × probes; init {init})")
    return fig


def save_figure(fig, path: str | Path) -> list[Path]:
    """Write ``path`` as PNG and SVG (same stem); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=130)
    fig.savefig(out[1])
    plt.close(fig)
    return out
