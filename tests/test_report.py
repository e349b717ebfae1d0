"""Figures 6–9, the as-published pairing and the theory figures, each from a small synthetic table;
the claims checker's building blocks on series whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from optmech.experiments.claims import combine
from optmech.experiments.claims_training import convergences, onsets, sustained_high
from optmech.experiments.reproduce_config import ClaimSettings
from optmech.report.figures import (
    plot_depth_pearson,
    plot_depth_training,
    plot_lemma2,
    plot_published_pairing,
    plot_theorem2,
    plot_theorem4,
    save_figure,
)


def _run(n_steps=80, drop_at=40, seed=0, G0=2.0):
    """Records of a run whose fitting error falls from ``drop_at`` on and whose G settles there."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        for sample in range(3):
            fit = -0.05 * max(0, step - drop_at) + rng.normal(scale=0.02)
            G = G0 if step < drop_at else 0.5
            U = -0.2
            L = U - G
            g = fit - 0.5 * (U + L)
            rows.append(dict(step=step, probe_set="heldout", sample_id=sample, log_fitting_error=fit, lower=g + L, upper=g + U,
                             log_gradient_norm=g, U=U, L=L, G=G))
    return pd.DataFrame(rows)


def test_depth_training_and_pearson_figures(tmp_path):
    runs = {k: _run(drop_at=20 + 10 * k, seed=k) for k in range(3)}
    fig = plot_depth_training(runs, "a")
    axes = fig.axes
    assert len(axes) == 6 and axes[0].get_title() == "model a, k = 0" and axes[3].get_xlabel() == "batch index"
    assert {line.get_label() for line in axes[3].get_lines()} == {"U", "L", "G"}
    fig8 = plot_depth_pearson(runs, "a", window=10)
    r = fig8.axes[0].get_lines()[0].get_ydata()
    assert np.isnan(r[:9]).all() and np.nanmax(r) > 0.9
    for name, f in (("fig6", fig), ("fig8", fig8)):
        assert all(p.stat().st_size > 1000 for p in save_figure(f, tmp_path / name))


def test_published_pairing_counts_records_outside():
    run = _run()
    run.loc[run["sample_id"] == 1, ["lower", "upper"]] += 10.0  # the partner image's bounds sit far above
    fig = plot_published_pairing({"a": run}, {"a": [0, 1]})
    assert fig.axes[0].get_title() == "model a: 80/80 records outside"
    fig = plot_published_pairing({"a": _run()}, {"a": [0, 0]})
    assert fig.axes[0].get_title() == "model a: 0/80 records outside"


def test_theory_figures(tmp_path):
    lemma2 = pd.DataFrame([dict(n=n, m=m, trial=t, norms=t % 10 != 0, inner=True) for n in (10, 30) for m in (100, 1000) for t in range(20)])
    fig = plot_lemma2(lemma2)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].get_legend().get_texts()) == 2
    t4 = pd.DataFrame([dict(K=10, m=m, trial=t, U=0.1 + 0.01 * t, G=0.3, t4a_bound=0.001, gershgorin_U_bound=np.nan if m < 2000 else 0.5,
                            t4b_printed_bound=1.0, t4b_corrected_bound=1.1, gershgorin_G_bound=np.nan if m < 2000 else 0.9)
                       for m in (100, 10000) for t in range(10)])
    fig4 = plot_theorem4(t4)
    assert [ax.get_ylabel() for ax in fig4.axes[:2]] == ["U (nats)", "G (nats)"]
    t2 = pd.DataFrame([dict(model=m, t=t, rho=0.01 * (1 + t)) for m in "ab" for t in (1.0, 0.1, 0.01)])
    fig2 = plot_theorem2(t2)
    assert {line.get_label() for line in fig2.axes[0].get_lines()} == {"model a", "model b"}
    for name, f in (("lemma2", fig), ("t4", fig4), ("t2", fig2)):
        assert all(p.stat().st_size > 1000 for p in save_figure(f, tmp_path / name))


def _series(run):
    return run.groupby("step")[["log_fitting_error", "lower", "upper", "U", "L", "G", "log_gradient_norm"]].median()


def _rows(ser):
    """One image's series as the (1, n_records) arrays the per-image statistics take."""
    return {c: ser[c].to_numpy()[None, :] for c in ser.columns} | {"steps": ser.index.to_numpy(dtype=float)}


def test_onset_and_structural_convergence_on_known_series():
    s = ClaimSettings(smooth=5, onset_drop_bits=0.5, converge_tol_bits=0.25)
    d = _rows(_series(_run(drop_at=40)))
    # the fall of 0.05 bit per step passes 0.5 bit ten steps after 40; the 5-record median lags by 2
    assert 50 <= onsets(d["log_fitting_error"], d["steps"], s, never=-1)[0] <= 53
    assert 40.0 <= convergences(d["G"], d["steps"], s)[0] <= 43.0  # the 5-record median lags by up to 2
    flat = _rows(_series(_run(drop_at=1000)))
    assert onsets(flat["log_fitting_error"], flat["steps"], s, never=-1)[0] == -1  # never falls: no onset
    assert np.isnan(convergences(flat["G"], flat["steps"], s)[0])  # G never moved: no convergence to locate


def test_first_sustained_high_correlation():
    s = ClaimSettings(window=10, r_high=0.9)
    d = _rows(_series(_run(drop_at=30)))
    t = sustained_high(d["log_fitting_error"], d["upper"], d["lower"], d["steps"], s, never=-1)[0]
    assert 30 <= t <= 45
    flat = _series(_run(drop_at=1000))  # pure noise: E_f and its bounds move together exactly (same offsets)
    flat["upper"] = np.random.default_rng(0).normal(size=len(flat))
    f = _rows(flat)
    assert sustained_high(f["log_fitting_error"], f["upper"], f["lower"], f["steps"], s, never=-1)[0] == -1


@pytest.mark.parametrize("passes, exact, verdict", [
    ([True, True], False, "holds"), ([True, False, False], False, "fails"), ([True, False], False, "inconclusive"),
    ([True, None], False, "inconclusive"), ([], False, "inconclusive"), ([True, False], True, "fails"), ([True, None], True, "holds"),
])
def test_verdict_rule(passes, exact, verdict):
    assert combine(passes, exact=exact) == verdict


def test_the_report_names_runs_at_the_edge_of_learning():
    from optmech.report.html import _answer, _runs_table

    run = dict(init="he_normal", steps=938, heldout_loss=0.5, learned=True, why="learned (held-out accuracy 0.804)")
    runs = {"a k3 s1 he_normal": {**run, "heldout_accuracy": 0.804, "edge": "learned late: held-out accuracy first ≥ 0.30 at "
                                  "step 846 of 938"},
            "a k1 s1 he_normal": {**run, "heldout_accuracy": 0.95, "edge": None}}
    answer = _answer([], runs, "", ["he_normal"])
    assert "At the edge of learning: a k3 s1 (learned late: held-out accuracy first ≥ 0.30 at step 846 of 938)" in answer
    assert "a k1 s1 (" not in answer and "floating-point kernels" in answer
    assert "at the edge of learning (learned late" in _runs_table(runs)
    both = {**runs, "a k0 s1 pytorch": {**run, "init": "pytorch", "heldout_accuracy": 0.9, "edge": "learned late: …"}}
    assert _answer([], both, "", ["he_normal", "pytorch"]).count("floating-point kernels") == 1  # said once
    runs["a k3 s1 he_normal"]["edge"] = None
    assert "edge of learning" not in _answer([], runs, "", ["he_normal"]) + _runs_table(runs)


def test_the_report_says_which_verdicts_rest_on_the_runs_that_learned_late():
    from optmech.report.html import _answer

    run = dict(init="he_normal", steps=938, heldout_loss=0.5, learned=True, heldout_accuracy=0.8, why="learned", edge="learned late: …")
    runs = {"a k3 s1 he_normal": run}
    moved = {"runs": ["a k3 s1 he_normal"], "moved": {"C6.1": {"from": "holds", "to": "inconclusive", "reason": "2 of 3 units pass."}}}
    answer = _answer([], runs, "", ["he_normal"], moved)
    assert "Without the runs that learned late</b> (a k3 s1 he_normal), counted as not measurable, 1 verdict moves" in answer
    assert "<b>C6.1</b></a>: holds → <b>inconclusive</b>" in answer and "2 of 3 units pass." in answer
    still = _answer([], runs, "", ["he_normal"], {"runs": ["a k3 s1 he_normal"], "moved": {}})
    assert "(a k3 s1 he_normal), counted as not measurable: no verdict moves" in still
    assert "Without the runs" not in _answer([], runs, "", ["he_normal"], None)  # not evaluated (or excluded by the preset)
