"""One plotting function per paper figure (matplotlib, Agg; ``ax=None`` style; records in, figure out)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..records import fixed_probe_medians, probe_arrays, published_pairing  # noqa: E402

MODEL_STYLE = {"a": ("tab:blue", "-"), "b": ("tab:blue", "--"), "c": ("tab:orange", "-"), "d": ("tab:orange", "--")}


def plot_depth_sweep(frame: pd.DataFrame, axes=None, *, title: str | None = None):
    """Fig. 5: U, L, G and the gradient norm log₂‖g‖² (bits) at initialisation, one line per model,
    against depth k (top row) and against the parameter count |θ| (bottom row).

    Lines are medians over seeds and probe samples; shaded bands the inter-quartile range.
    Rank-deficient samples (U = +inf) are left out and counted in the legend. The gradient-norm
    column is the paper's eq. (24) argument: skip connections amplify the gradient.

    Args:
        frame: rows of :func:`optmech.experiments.depth_sweep.depth_sweep`.
        axes: a 2×4 array of matplotlib axes, or None to create a figure.

    Returns:
        The matplotlib Figure.
    """
    columns = ("U", "L", "G", "log_gradient_norm")
    if axes is None:
        fig, axes = plt.subplots(2, 4, figsize=(16, 7.4), constrained_layout=True, squeeze=False)
    else:
        fig = axes[0][0].figure
    titles = {"U": "U = −log₂ λmin", "L": "L = −log₂ λmax", "G": "G = U − L = log₂(λmax/λmin)",
              "log_gradient_norm": "gradient norm log₂‖g‖² (eq. 24)"}
    for row, x in enumerate(("depth", "n_params")):
        for ax, column in zip(axes[row], columns):
            for letter, rows in frame.groupby("model"):
                finite = rows[np.isfinite(rows[column])]
                stats = finite.groupby("depth")[column].quantile([0.25, 0.5, 0.75]).unstack()
                xs = stats.index.to_numpy() if x == "depth" else rows.groupby("depth")["n_params"].first().reindex(stats.index).to_numpy()
                color, style = MODEL_STYLE.get(letter, ("gray", "-"))
                family = rows["family"].iloc[0]
                skip = "skip" if bool(rows["skip"].iloc[0]) else "plain"
                dropped = int((~np.isfinite(rows[column])).sum())
                label = f"{letter} ({family}, {skip})" + (f", {dropped} inf dropped" if dropped else "")
                ax.plot(xs, stats[0.5], style, color=color, marker="o", ms=3, label=label)
                ax.fill_between(xs, stats[0.25], stats[0.75], color=color, alpha=0.15)
            if column != "log_gradient_norm":
                ax.axhline(0.0, color="black", lw=0.6)
            if x == "n_params":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: no overlaps
            _label(ax, titles[column], "depth k (repeated blocks)" if x == "depth" else "|θ| (parameters, log scale)",
                   "log₂‖g‖² (bits)" if column == "log_gradient_norm" else f"{column} (bits)")
    axes[0][0].legend(fontsize=8)
    init = ", ".join(sorted(frame["init"].unique())) if "init" in frame else ""
    _suptitle(fig, title or f"Structural error at initialisation against depth (median, IQR over seeds × probes; init {init})")
    return fig


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch at 10 pt)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 11))
    fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=10)


def save_figure(fig, path: str | Path) -> list[Path]:
    """Write ``path`` as PNG and SVG (same stem); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.savefig(out[0], dpi=130)
    fig.savefig(out[1])
    plt.close(fig)
    return out


def _label(ax, title: str, xlabel: str, ylabel: str | None = "bits", **title_kw) -> None:
    """Title, axis labels and the light grid every panel uses."""
    ax.set_title(title, **title_kw)
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _bracket(ax, steps, lower, upper, label: str = "Theorem 3 bracket", alpha: float = 0.25) -> None:
    """The Theorem 3 bracket [lower, upper] as a grey band."""
    ax.fill_between(steps, lower, upper, color="tab:gray", alpha=alpha, label=label)


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
        med = fixed_probe_medians(records, ["log_fitting_error", "lower", "upper"])
        _bracket(ax, med.index, med["lower"], med["upper"])
        ax.plot(med.index, med["upper"], color="tab:red", lw=1, label="upper = log₂‖g‖² + U")
        ax.plot(med.index, med["lower"], color="tab:green", lw=1, label="lower = log₂‖g‖² + L")
        ax.plot(med.index, med["log_fitting_error"], color="black", lw=1.2, label="log₂ E_f (fitting error)")
        _label(ax, f"model {label}", "batch index (training step)")
    axes[0].legend(fontsize=7, loc="lower left")
    _suptitle(fig, "Fitting error and its bounds during training (median over the fixed probe samples)")
    return fig


def plot_indicators(runs: dict[str, pd.DataFrame], axes=None):
    """Fig. 4: log₂‖g‖², U, L and G against batch index, one panel per model (medians over probes)."""
    fig, axes = _panels(len(runs), axes)
    styles = {"log_gradient_norm": ("black", "log₂‖g‖² (gradient norm)"), "U": ("tab:red", "U"),
              "L": ("tab:green", "L"), "G": ("tab:blue", "G = U − L")}
    for ax, (label, records) in zip(axes, runs.items()):
        med = fixed_probe_medians(records, list(styles))
        for column, (color, name) in styles.items():
            ax.plot(med.index, med[column], color=color, lw=1.1, label=name)
        _label(ax, f"model {label}", "batch index (training step)")
    axes[0].legend(fontsize=7)
    _suptitle(fig, "Gradient norm and structural error during training (median over the fixed probe samples)")
    return fig


def per_image_local_r(records: pd.DataFrame, window: int, growing_from: int | None = None) -> dict[str, pd.DataFrame]:
    """Local Pearson r of log₂E_f with each bound computed per probe image (E_f and bounds of the same
    image), summarised per window end: {"upper"|"lower": DataFrame(index step, columns q25, median, q75)}."""
    from ..metrics import local_pearson_rows

    d = probe_arrays(records, ("log_fitting_error", "upper", "lower"))
    out = {}
    for bound in ("upper", "lower"):
        r = local_pearson_rows(d["log_fitting_error"], d[bound], window, growing_from=growing_from)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # windows that are NaN for every image
            q = np.nanquantile(r, [0.25, 0.5, 0.75], axis=0)
        out[bound] = pd.DataFrame({"q25": q[0], "median": q[1], "q75": q[2]}, index=d["steps"])
    return out


def plot_local_pearson(runs: dict[str, pd.DataFrame], window: int = 50, ax=None, *, growing_from: int | None = None):
    """Fig. 3: local Pearson r between log₂ E_f and each bound (window of ``window`` records).

    r is computed per probe image — the fitting error and the bounds of the same image — and drawn
    as the median over images with the inter-quartile band, at the window's last step (gaps where a
    window has zero variance). ``growing_from`` draws the authors' variant (windows grow from that
    record until full; see :func:`optmech.metrics.local_pearson`).
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(9.5, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        r = per_image_local_r(records, window, growing_from)
        for bound, style in (("upper", "-"), ("lower", ":")):
            ax.plot(r[bound].index, r[bound]["median"], style, color=color, lw=1.1, label=f"{label}: r(log₂ E_f, {bound})")
            if bound == "upper":
                ax.fill_between(r[bound].index, r[bound]["q25"], r[bound]["q75"], color=color, alpha=0.12)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("batch index at the window's end")
    ax.set_ylabel(f"local Pearson r ({window} records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Local r of the fitting error with its bounds, per probe image\n(median over images; band: IQR for the upper bound)",
                 fontsize=10)
    return fig


def plot_depth_training(runs: dict[int, pd.DataFrame], model: str, axes=None, *, title: str | None = None):
    """Figs 6 and 7: model ``model`` trained at each depth k; per k a column with, on top, log₂ E_f and
    its Theorem 3 bounds as lines and, below, U, L and G, against batch index.

    Args:
        runs: {k: per-sample records of the training run at depth k}.
        model: the paper's letter, for titles.

    Lines are medians over the fixed probe samples at each record. The y axes are shared along each
    row, so a flat curve is flat on the scale of every depth (1e-3-bit noise stays flat), and each
    panel states the range its curves span.
    """
    ks = sorted(runs)
    if axes is None:
        fig, grid = plt.subplots(2, len(ks), figsize=(max(7.0, 3.0 * len(ks)), 6.2), constrained_layout=True, squeeze=False,
                                 sharey="row")
    else:
        fig, grid = axes.flat[0].figure, axes
    for j, k in enumerate(ks):
        med = fixed_probe_medians(runs[k], ["log_fitting_error", "lower", "upper", "U", "L", "G"])
        top, bottom = grid[0][j], grid[1][j]
        top.plot(med.index, med["upper"], color="tab:red", lw=0.9, label="upper")
        top.plot(med.index, med["lower"], color="tab:green", lw=0.9, label="lower")
        top.plot(med.index, med["log_fitting_error"], color="black", lw=1.1, label="log₂ E_f")
        top.set_title(f"model {model}, k = {k}")
        for column, color in (("U", "tab:red"), ("L", "tab:green"), ("G", "tab:blue")):
            bottom.plot(med.index, med[column], color=color, lw=1.1, label=column)
        span = float(med["G"].max() - med["G"].min())
        bottom.text(0.02, 0.02, f"G spans {span:.2g} bits", transform=bottom.transAxes, fontsize=7)
        bottom.set_xlabel("batch index")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    grid[0][0].set_ylabel("log₂ E_f and bounds (bits)")
    grid[1][0].set_ylabel("U, L, G (bits)")
    grid[0][0].legend(fontsize=7, loc="lower left")
    grid[1][0].legend(fontsize=7)
    _suptitle(fig, title or f"Model {model} with increasing blocks k: fitting error, its bounds and the structural error "
              "during training (median over the fixed probes; y axes shared per row)")
    return fig


def plot_depth_pearson(runs: dict[int, pd.DataFrame], model: str, window: int = 50, axes=None, *, growing_from: int | None = None,
                       title: str | None = None):
    """Figs 8 and 9: local Pearson r of log₂ E_f with each bound, one panel per depth k.

    r over ``window`` records per probe image (E_f and bounds of the same image), drawn as the median
    over images with the inter-quartile band, at the window's last batch index.
    """
    ks = sorted(runs)
    if axes is None:
        fig, grid = plt.subplots(1, len(ks), figsize=(max(7.0, 3.0 * len(ks)), 3.3), constrained_layout=True, squeeze=False)
    else:
        fig, grid = axes.flat[0].figure, axes
    for j, k in enumerate(ks):
        ax = grid[0][j]
        r = per_image_local_r(runs[k], window, growing_from)
        for bound, color in (("upper", "tab:red"), ("lower", "tab:green")):
            ax.plot(r[bound].index, r[bound]["median"], color=color, lw=1.1, label=f"r(log₂ E_f, {bound})")
            ax.fill_between(r[bound].index, r[bound]["q25"], r[bound]["q75"], color=color, alpha=0.12)
        ax.axhline(0.9, color="black", lw=0.6, ls=":")
        ax.set_ylim(-1.05, 1.05)
        _label(ax, f"model {model}, k = {k}", "batch index (window end)", ylabel=None)
    grid[0][0].set_ylabel(f"local Pearson r ({window} records)")
    grid[0][0].legend(fontsize=7, loc="lower left")
    _suptitle(fig, title or f"Model {model}: local correlation of the fitting error with its bounds per probe image, by depth "
              "(median and IQR over images; dotted: r = 0.9)")
    return fig


def plot_learning(runs: dict[str, pd.DataFrame], axes=None, *, chance: float = 0.1, title: str | None = None):
    """Held-out accuracy and loss along training, one line per run.

    Args:
        runs: {label: a run's evals (columns step, heldout_accuracy, heldout_loss; evals.parquet)}.
        chance: the chance accuracy, drawn as a dotted line.
    """
    fig, axes = _panels(2, axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ev) in enumerate(runs.items()):
        if not len(ev):
            continue
        color, style = colors[i % len(colors)], "--" if "pytorch" in label else "-"
        axes[0].plot(ev["step"], ev["heldout_accuracy"], style, color=color, marker="o", ms=2.5, lw=1, label=label)
        axes[1].plot(ev["step"], ev["heldout_loss"], style, color=color, marker="o", ms=2.5, lw=1, label=label)
    axes[0].axhline(chance, color="black", ls=":", lw=0.8, label="chance")
    axes[0].set_ylim(0, 1)
    _label(axes[0], "held-out accuracy", "batch index (training step)", "accuracy")
    _label(axes[1], "held-out loss", "batch index (training step)", "mean loss (nats)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    _suptitle(fig, title or "Learning curves: held-out accuracy and loss during training")
    return fig


def plot_lemma2(table: pd.DataFrame, ax=None):
    """Lemma 2 by Monte Carlo: frequency of both events against m, one line per n, 95 % Wilson bars,
    and the 1 − 2/n reference (dashed)."""
    from ..theory import wilson_interval

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (n, rows) in enumerate(table.groupby("n")):
        stats = []
        for m, g in rows.groupby("m"):
            hits = int((g["norms"] & g["inner"]).sum())
            lo, hi = wilson_interval(hits, len(g))
            stats.append((m, hits / len(g), lo, hi))
        m, f, lo, hi = map(np.array, zip(*stats))
        color = colors[i % len(colors)]
        yerr = [np.clip(f - lo, 0, None), np.clip(hi - f, 0, None)]  # Wilson bounds at f = 1 may round below f
        ax.errorbar(m, f, yerr=yerr, color=color, marker="o", ms=4, capsize=3, label=f"n = {n}")
        ax.axhline(1 - 2 / n, color=color, ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("dimension m")
    ax.set_ylabel("frequency of both events")
    ax.set_title("Lemma 2: both events hold (95 % intervals; dashed: 1 − 2/n)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_theorem4(table: pd.DataFrame, axes=None):
    """Theorem 4 by Monte Carlo (K rows uniform in the unit ball of R^m): measured U and G (nats,
    median and 5–95 % range over trials) against the printed bounds T4a and T4b, the corrected Z and
    the Gershgorin bounds, as functions of m."""
    fig, axes = _panels(2, axes)
    by_m = table.groupby("m")
    m = np.array(sorted(table["m"].unique()))
    for ax, col, bounds in (
        (axes[0], "U", (("t4a_bound", "T4a as printed", "tab:red"), ("gershgorin_U_bound", "Gershgorin (corrected)", "tab:green"))),
        (axes[1], "G", (("t4b_printed_bound", "T4b, Z as printed", "tab:red"), ("t4b_corrected_bound", "T4b, Z corrected", "tab:orange"),
                         ("gershgorin_G_bound", "Gershgorin (corrected)", "tab:green"))),
    ):
        q = by_m[col].quantile([0.05, 0.5, 0.95]).unstack()
        ax.fill_between(m, q[0.05], q[0.95], color="black", alpha=0.15, label="measured, 5–95 %")
        ax.plot(m, q[0.5], color="black", marker="o", ms=3, label=f"measured {col}, median")
        for column, name, color in bounds:
            ax.plot(m, by_m[column].first().reindex(m), color=color, ls="--", marker="x", ms=4, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("|θ| = m")
        ax.set_ylabel(f"{col} (nats)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    K = int(table["K"].iloc[0])
    axes[0].set_title(f"U = −ln λmin against its bounds (K = {K})")
    axes[1].set_title("G = ln(λmax/λmin) against its bounds")
    _suptitle(fig, "Theorem 4 under an exact GIC (uniform rows in the unit ball); a bound holds where the black band lies below it")
    return fig


def plot_theorem2(table: pd.DataFrame, ax=None):
    """Theorem 2: ρ(t) = (‖softmax f_{tθ}(x)‖² − 1/K)/(t²‖θ‖²) against t (log–log), one line per model."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    for letter, rows in table.groupby("model"):
        color, style = MODEL_STYLE.get(letter, ("gray", "-"))
        rows = rows.sort_values("t")
        ax.plot(rows["t"], rows["rho"], style, color=color, marker="o", ms=3, label=f"model {letter}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("scale t (parameters tθ)")
    ax.set_ylabel("ρ(t)")
    ax.set_title("Theorem 2: ρ(t) as t → 0 (the claim: it stays bounded)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_published_pairing(runs: dict[str, pd.DataFrame], pairs: dict[str, list[int]], axes=None):
    """The authors' pairing (READING.md §1.5): log₂ E_f of held-out image #0 against the bounds of
    the first later image with its label, as their code plots them, beside the same-sample bracket.

    Args:
        runs: {label: per-sample records}; pairs: {label: [id of image #0, id of its partner]}.
    """
    fig, axes = _panels(len(runs), axes)
    for ax, (label, records) in zip(axes, runs.items()):
        val_id, test_id = pairs[label]
        pairing = published_pairing(records, (val_id, test_id))
        _bracket(ax, pairing.index, pairing["lower"], pairing["upper"], label="same-sample bracket (Theorem 3)", alpha=0.3)
        ax.plot(pairing.index, pairing["published_upper"], color="tab:red", lw=0.9, label=f"upper, image {test_id} (as published)")
        ax.plot(pairing.index, pairing["published_lower"], color="tab:green", lw=0.9, label=f"lower, image {test_id} (as published)")
        ax.plot(pairing.index, pairing["log_fitting_error"], color="black", lw=1.1, label=f"log₂ E_f, image {val_id}")
        outside = int((~pairing["bracketed"]).sum())
        _label(ax, f"model {label}: {outside}/{len(pairing)} records outside", "batch index", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    _suptitle(fig, "As published: fitting error of one image against the bounds of another (authors' main_convergence.py)")
    return fig
