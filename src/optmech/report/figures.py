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


def _fixed_probe_medians(records: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per step, the median over the fixed probe samples (train-batch rows excluded) of each column."""
    fixed = records[records["probe_set"] != "train_batch"]
    return fixed.groupby("step")[columns].median()


def _panels(n: int, axes=None):
    """(figure, n axes side by side), or the figure of the given axes."""
    if axes is not None:
        return axes[0].figure, axes
    fig, grid = plt.subplots(1, n, figsize=(4.2 * n, 3.6), constrained_layout=True, squeeze=False)
    return fig, grid[0]


def plot_bounds(runs: dict[str, pd.DataFrame], axes=None):
    """Fig. 2: log₂ E_f between its Theorem 3 bounds against batch index, one panel per model.

    Args:
        runs: {label: per-sample records of a training run} (e.g. {"a": read_records(dir_a), ...}).

    Lines are medians over the fixed probe samples at each record; the bracket is shaded.
    """
    fig, axes = _panels(len(runs), axes)
    for ax, (label, records) in zip(axes, runs.items()):
        med = _fixed_probe_medians(records, ["log_fitting_error", "lower", "upper"])
        ax.fill_between(med.index, med["lower"], med["upper"], color="tab:gray", alpha=0.25, label="Theorem 3 bracket")
        ax.plot(med.index, med["upper"], color="tab:red", lw=1, label="upper = log₂‖g‖² + U")
        ax.plot(med.index, med["lower"], color="tab:green", lw=1, label="lower = log₂‖g‖² + L")
        ax.plot(med.index, med["log_fitting_error"], color="black", lw=1.2, label="log₂ E_f (fitting error)")
        ax.set_title(f"model {label}")
        ax.set_xlabel("batch index (training step)")
        ax.set_ylabel("bits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Fitting error and its bounds during training (median over the fixed probe samples)")
    return fig


def plot_indicators(runs: dict[str, pd.DataFrame], axes=None):
    """Fig. 4: log₂‖g‖², U, L and G against batch index, one panel per model (medians over probes)."""
    fig, axes = _panels(len(runs), axes)
    styles = {"log_gradient_norm": ("black", "log₂‖g‖² (gradient norm)"), "U": ("tab:red", "U"),
              "L": ("tab:green", "L"), "G": ("tab:blue", "G = U − L")}
    for ax, (label, records) in zip(axes, runs.items()):
        med = _fixed_probe_medians(records, list(styles))
        for column, (color, name) in styles.items():
            ax.plot(med.index, med[column], color=color, lw=1.1, label=name)
        ax.set_title(f"model {label}")
        ax.set_xlabel("batch index (training step)")
        ax.set_ylabel("bits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Gradient norm and structural error during training (median over the fixed probe samples)")
    return fig


def plot_local_pearson(runs: dict[str, pd.DataFrame], window: int = 50, ax=None):
    """Fig. 3: local Pearson r between log₂ E_f and each bound (window of ``window`` records).

    The series are the medians over the fixed probe samples; r is plotted at the window's last
    step, NaN (a gap) where a window has zero variance.
    """
    from ..metrics import local_pearson

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs.items()):
        med = _fixed_probe_medians(records, ["log_fitting_error", "lower", "upper"])
        color = colors[i % len(colors)]
        for bound, style in (("upper", "-"), ("lower", ":")):
            r = local_pearson(med["log_fitting_error"], med[bound], window=window)
            ax.plot(med.index, r, style, color=color, lw=1.1, label=f"{label}: r(log₂ E_f, {bound})")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("batch index at the window's end")
    ax.set_ylabel(f"local Pearson r ({window} records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Local correlation of the fitting error with its bounds")
    return fig
