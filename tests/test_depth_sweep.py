"""Fig. 5 slice: the depth sweep at initialisation (resumable) and its figure."""

import numpy as np
import pandas as pd
import pytest

from optmech.experiments.depth_sweep import DepthSweepConfig, depth_sweep, read_depth_sweep
from optmech.report.figures import plot_depth_sweep, save_figure


def test_depth_sweep_rows_resume_and_bounds(tmp_path):
    cfg = DepthSweepConfig(models=["a", "d"], depths=[0, 2], seeds=[0, 1], n_probe=3, dataset="digits")
    frame = depth_sweep(cfg, tmp_path)
    assert len(frame) == 2 * 2 * 2 * 3 and frame["bound_holds"].all()
    assert set(frame.columns) >= {"model", "family", "skip", "depth", "seed", "n_params", "U", "L", "G"}
    parts = sorted((tmp_path / "depth_sweep").glob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    (parts[0]).unlink()  # as if interrupted before this part was written
    again = depth_sweep(cfg, tmp_path)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != parts[0])  # finished parts kept
    pd.testing.assert_frame_equal(
        again.sort_values(["model", "depth", "seed", "sample_id"]).reset_index(drop=True),
        frame.sort_values(["model", "depth", "seed", "sample_id"]).reset_index(drop=True),
    )
    # the plain ResNet class under PyTorch's default init: A_x ≈ I (READING F3), G small
    a2 = frame[(frame.model == "a") & (frame.depth == 2)]
    assert float(a2["G"].median()) < 0.1


def test_plot_depth_sweep_on_synthetic_records(tmp_path):
    rows = []
    for model, family, skip in (("a", "resnet", False), ("b", "resnet", True)):
        for depth in range(4):
            for seed in range(3):
                U = -1.0 / (depth + 1) - seed * 0.01
                rows.append(dict(model=model, family=family, skip=skip, depth=depth, seed=seed, init="pytorch",
                                 U=U if depth != 3 or model != "b" else np.inf, L=U - 1, G=1.0, n_params=1000 * (depth + 1),
                                 log_gradient_norm=-depth if model == "a" else 2.0))
    fig = plot_depth_sweep(pd.DataFrame(rows))
    assert [ax.get_ylabel() for ax in fig.axes] == ["U (bits)", "L (bits)", "G (bits)", "log₂‖g‖² (bits)"] * 2
    assert fig.axes[4].get_xscale() == "log" and "|θ|" in fig.axes[4].get_xlabel()  # the bottom row: against |θ|
    np.testing.assert_allclose(fig.axes[4].get_lines()[0].get_xdata(), [1000, 2000, 3000, 4000])
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), [0, -1, -2, -3])  # a's gradient norm by depth
    assert "3 inf dropped" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    paths = save_figure(fig, tmp_path / "fig5")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_depth_sweep_errors(tmp_path):
    with pytest.raises(ValueError, match="paper letters"):
        DepthSweepConfig(models=["z"])
    with pytest.raises(FileNotFoundError, match="depth-sweep Parquet parts"):
        read_depth_sweep(tmp_path)


def _synthetic_run(n_steps=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        for sample in range(4):
            fit = -0.02 * step + rng.normal(scale=0.1)
            U, L = -1.0 + rng.normal(scale=0.05), -3.0
            g = fit - 0.5 * (U + L)
            rows.append(dict(step=step, probe_set="heldout", sample_id=sample, log_fitting_error=fit, lower=g + L,
                             upper=g + U, log_gradient_norm=g, U=U, L=L, G=U - L))
        rows.append(dict(step=step, probe_set="train_batch", sample_id=99, log_fitting_error=50.0, lower=50.0,
                         upper=50.0, log_gradient_norm=50.0, U=50.0, L=50.0, G=0.0))
    return pd.DataFrame(rows)


def test_training_figures_from_synthetic_records(tmp_path):
    from optmech.report import plot_bounds, plot_indicators, plot_local_pearson

    runs = {"a": _synthetic_run(), "b": _synthetic_run(seed=1)}
    fig2 = plot_bounds(runs)
    ax = fig2.axes[0]
    assert ax.get_title() == "model a" and ax.get_xlabel().startswith("batch index")
    black = [line for line in ax.get_lines() if "fitting error" in line.get_label()][0]
    assert black.get_ydata().max() < 1.0  # train-batch rows (value 50) are not in the fixed-probe medians
    fig4 = plot_indicators(runs)
    assert {line.get_label() for line in fig4.axes[1].get_lines()} >= {"U", "L", "G = U − L"}
    fig3 = plot_local_pearson(runs, window=20)
    r = fig3.axes[0].get_lines()[0].get_ydata()
    assert np.isnan(r[:19]).all() and np.nanmin(r) > 0.5  # E_f moves with its bounds when U, L are steady
    for name, fig in (("fig2", fig2), ("fig3", fig3), ("fig4", fig4)):
        assert all(p.stat().st_size > 1000 for p in save_figure(fig, tmp_path / name))
