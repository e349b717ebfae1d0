"""The calibrated claims checker on synthetic records with known answers: an effect that holds, one that
fails, a null, a run that did not learn, a degenerate structure — and the null calibration catching a
test that passes too often by chance."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from optmech.experiments.calibration import EffectTest, Unit, empirical_claim, permute_labels, spearman
from optmech.experiments.claims_training import onsets, training_claims
from optmech.experiments.gates import at_edge, learned, learning_onset
from optmech.experiments.reproduce_config import ClaimSettings, ReproduceConfig
from optmech.metrics import local_pearson, local_pearson_rows
from optmech.records import Reproduction, probe_arrays

EVERY = 4  # steps per record


def synthetic_run(*, records=120, onset=None, G=(3.0, 3.0), converge=20, n_images=6, seed=0):
    """Per-sample rows of a run: log₂E_f flat at −0.15 until ``onset`` (a record; None: never), then falling
    0.1 bit per record; G from G[0] to G[1] at record ``converge``; bounds E + G·w and E − G·(1 − w)."""
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(n_images):
        t = np.arange(records)
        E = np.full(records, -0.15)
        if onset is not None:
            E = np.where(t >= onset, -0.15 - 0.1 * (t - onset), E)
        E = E + rng.normal(0, 0.03, records)
        g = np.where(t < converge, G[0], G[1]) + rng.normal(0, 0.02 * max(G[1], 1e-4), records)
        g = np.abs(g)
        w = np.clip(0.5 + 0.15 * rng.standard_normal(records), 0.05, 0.95)
        U = np.full(records, -0.5)
        L = U - g
        gn = E + g * w - U
        rows.append(pd.DataFrame({"step": t * EVERY, "probe_set": "heldout", "sample_id": image, "log_fitting_error": E,
                                  "lower": gn + L, "upper": gn + U, "U": U, "L": L, "G": g, "log_gradient_norm": gn,
                                  "bound_holds": True, "rank_deficient": False}))
    return pd.concat(rows, ignore_index=True)


def _meta(records, accuracy=0.9):
    return {"summary": {"heldout_accuracy": accuracy, "chance_accuracy": 0.1, "diverged_at_step": None},
            "steps": {"total": records * EVERY}, "data": {}, "config": {}, "evals": pd.DataFrame()}


def reproduction(config: ReproduceConfig, runs: dict) -> Reproduction:
    """runs: {(model, depth, seed, init): (records, accuracy)}."""
    return Reproduction(run_dir=None, meta={"config": config.model_dump(mode="json")},
                        train={k: r for k, (r, _) in runs.items()},
                        train_meta={k: _meta(r["step"].nunique(), acc) for k, (r, acc) in runs.items()},
                        sweep=pd.DataFrame(), theory={})


def _config(**kw):
    claims = dict(window=10, smooth=5, edge_iters=60, null_draws=200, coincide_iters=40)
    claims.update(kw.pop("claims", {}))
    base = dict(name="syn", seeds=[1], bounds_models=["a"], bounds_depth=1, depth_models=[], depths=[], train_inits=["he_normal"],
                claims=claims)
    base.update(kw)
    return ReproduceConfig(**base)


def _claim(claims, cid):
    return next(c for c in claims if c.id == cid)


@pytest.mark.parametrize("case, run, accuracy, verdict, why", [
    ("holds", dict(onset=30, G=(3.0, 1.0)), 0.9, "holds", "holds in 0.0 %"),
    ("fails", dict(onset=30, G=(2.0, 2.0)), 0.9, "fails", "0 of 1"),
    ("did not learn", dict(onset=None, G=(3.0, 1.0)), 0.11, "not measurable", "did not learn"),
    ("degenerate", dict(onset=30, G=(1e-4, 1e-4)), 0.9, "not measurable", "degenerate"),
])
def test_g_narrowing_known_answers(case, run, accuracy, verdict, why):
    config = _config()
    rep = reproduction(config, {("a", 1, 1, "he_normal"): (synthetic_run(**run), accuracy)})
    claim = _claim(training_claims(rep, config), "C2.2")
    assert claim.verdict == verdict, claim.reason
    assert why in claim.reason
    assert claim.effect["name"] and claim.effect["threshold"] == "≥ 0.25"
    if verdict != "not measurable":  # the effect size is reported beside the verdict, the null's rate too
        assert claim.effect["null_false_pass_rate"] is not None and claim.effect["null_draws"] == 200
        expected = 2.0 if case == "holds" else 0.0
        assert abs(claim.effect["value"] - expected) < 0.1


def _depth_runs(onsets_a, onsets_b=None, accuracy_a=None, depths=None):
    depths = depths or list(range(len(onsets_a)))
    runs = {}
    for i, k in enumerate(depths):
        runs[("a", k, 1, "he_normal")] = (synthetic_run(onset=onsets_a[i], G=(3.0, 1.0), converge=onsets_a[i] or 20, seed=k),
                                          (accuracy_a or {}).get(k, 0.9))
        if onsets_b is not None:
            runs[("b", k, 1, "he_normal")] = (synthetic_run(onset=onsets_b[i], G=(3.0, 1.0), converge=onsets_b[i] or 20, seed=50 + k), 0.9)
    return depths, runs


def test_onset_trend_holds_fails_and_is_uncalibrated_on_three_depths():
    depths, runs = _depth_runs([10, 20, 30, 40, 50, 60])
    config = _config(depth_models=["a"], depths=depths)
    c61 = _claim(training_claims(reproduction(config, runs), config), "C6.1")
    assert c61.verdict == "holds", c61.reason
    assert c61.effect["value"] == pytest.approx(1.0) and c61.effect["null_false_pass_rate"] <= 0.05

    depths, runs = _depth_runs([60, 50, 40, 30, 20, 10])
    c61 = _claim(training_claims(reproduction(config, runs), config), "C6.1")
    assert c61.verdict == "fails" and c61.effect["value"] == pytest.approx(-1.0)

    depths, runs = _depth_runs([10, 30, 50])  # a perfect trend, but 1 in 6 orders gives it by chance
    config3 = _config(depth_models=["a"], depths=depths)
    c61 = _claim(training_claims(reproduction(config3, runs), config3), "C6.1")
    assert c61.verdict == "inconclusive" and "not calibrated" in c61.reason
    assert abs(c61.effect["null_false_pass_rate"] - 1 / 6) < 0.07


def test_depths_whose_run_did_not_learn_are_excluded_not_counted():
    depths, runs = _depth_runs([10, 20, 30, None, None, None], accuracy_a={3: 0.1, 4: 0.1, 5: 0.1})
    config = _config(depth_models=["a"], depths=depths)
    c61 = _claim(training_claims(reproduction(config, runs), config), "C6.1")
    unit = c61.units["a s1"]
    assert sorted(int(k) for k in unit["excluded"]) == [3, 4, 5]
    assert all("did not learn" in why for why in unit["excluded"].values())
    assert c61.verdict == "inconclusive"  # three learned depths: the trend passes but the null reproduces it 1 in 6
    depths, runs = _depth_runs([10, 20, None, None, None, None], accuracy_a={2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1})
    c61 = _claim(training_claims(reproduction(config, runs), config), "C6.1")
    assert c61.verdict == "not measurable" and "fewer than 3 measurable depths" in c61.reason


def test_skip_speeds_up_convergence_at_every_depth():
    depths, runs = _depth_runs([30, 35, 40, 45, 50, 55], [10, 12, 14, 16, 18, 20])
    config = _config(depth_models=["a", "b"], depths=depths)
    c72 = _claim(training_claims(reproduction(config, runs), config), "C7.2")
    assert c72.verdict == "holds", c72.reason
    assert c72.effect["null_false_pass_rate"] <= 0.05  # 2^-6 under random a/b swaps
    depths, runs = _depth_runs([30, 35, 40, 45, 50, 55], [32, 33, 41, 44, 52, 54])  # no difference beyond noise
    c72 = _claim(training_claims(reproduction(config, runs), config), "C7.2")
    assert c72.verdict == "fails"


def test_the_null_calibration_catches_a_lax_test():
    """ρ ≥ 0.2 over 6 depths passes a third of all depth orders: the measured false-pass rate says so and
    the claim is not allowed to hold."""
    settings = ClaimSettings(null_draws=400)
    units = {"u": Unit({"k": np.arange(6), "values": np.arange(6.0)})}
    lax = EffectTest(lambda d: spearman(d["k"], d["values"]), "ρ", permute_labels, "depth labels permuted", minimum=0.2)
    claim = empirical_claim("T", "test", "a trend", "ρ ≥ 0.2", units, lax, settings)
    exact = np.mean([spearman(np.arange(6), p) >= 0.2 for p in itertools.permutations(range(6))])
    assert claim.verdict == "inconclusive" and abs(claim.effect["null_false_pass_rate"] - exact) < 0.07 and exact > 0.25
    strict = EffectTest(lambda d: spearman(d["k"], d["values"]), "ρ", permute_labels, "depth labels permuted", minimum=0.95)
    claim = empirical_claim("T", "test", "a trend", "ρ ≥ 0.95", units, strict, settings)
    assert claim.verdict == "holds" and claim.effect["null_false_pass_rate"] <= 0.05


def test_learning_gate_reads_accuracy_and_divergence():
    s = ClaimSettings(learn_margin=0.2)
    assert learned({"summary": {"heldout_accuracy": 0.31, "chance_accuracy": 0.1}}, s)[0]
    ok, why = learned({"summary": {"heldout_accuracy": 0.29, "chance_accuracy": 0.1}}, s)
    assert not ok and "0.290 < 0.30" in why
    ok, why = learned({"summary": {"heldout_accuracy": 0.9, "chance_accuracy": 0.1, "diverged_at_step": 12}}, s)
    assert not ok and "diverged at step 12" in why


def _evals_meta(accuracies, final_step=900, **summary):
    steps = np.linspace(0, final_step, len(accuracies)).astype(int)
    evals = pd.DataFrame({"step": steps, "heldout_accuracy": accuracies})
    return {"summary": {"heldout_accuracy": accuracies[-1], "chance_accuracy": 0.1, "steps": final_step, **summary}, "evals": evals}


@pytest.mark.parametrize("accuracies, edge", [
    ([0.1, 0.5, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], None),                        # learned at step 100 of 900
    ([0.1, 0.1, 0.1, 0.1, 0.29, 0.31, 0.5, 0.7, 0.8, 0.8], "learned late: held-out accuracy first ≥ 0.30 at step 500 of 900"),
    ([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.66], "first ≥ 0.30 at step 900 of 900"),  # only the last evaluation
    ([0.1, 0.12, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], None),                        # never near the bar
    ([0.1, 0.1, 0.22, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.12], "did not learn, but reached 0.220 at step 200"),
])
def test_runs_at_the_edge_of_learning_are_named(accuracies, edge):
    s = ClaimSettings(learn_margin=0.2, late_learning_fraction=0.4)
    got = at_edge(_evals_meta(accuracies), s)
    assert (got is None) if edge is None else (got is not None and edge in got)


def test_the_learning_onset_and_a_diverged_run():
    s = ClaimSettings(learn_margin=0.2)
    assert learning_onset(_evals_meta([0.1, 0.1, 0.35, 0.9]), s) == 600
    assert learning_onset(_evals_meta([0.1, 0.1]), s) is None and learning_onset({"summary": {}}, s) is None
    assert at_edge(_evals_meta([0.1, 0.25, 0.1], diverged_at_step=300), s) is None  # diverged: said as such, not an edge


def test_per_image_statistics_pair_each_image_with_its_own_bounds():
    rec = synthetic_run(onset=30, n_images=3, seed=3)
    d = probe_arrays(rec)
    assert d["log_fitting_error"].shape == (3, 120)
    image = rec[rec["sample_id"] == 1]
    r = local_pearson_rows(d["log_fitting_error"], d["upper"], 10)[1]
    np.testing.assert_allclose(r, local_pearson(image["log_fitting_error"].to_numpy(), image["upper"].to_numpy(), window=10),
                               atol=1e-12, equal_nan=True)
    grown = local_pearson_rows(d["log_fitting_error"], d["upper"], 10, growing_from=2)[1]  # the authors' growing windows
    np.testing.assert_allclose(grown, local_pearson(image["log_fitting_error"].to_numpy(), image["upper"].to_numpy(), window=10,
                                                    growing_from=2), atol=1e-12, equal_nan=True)
    s = ClaimSettings(smooth=5)
    on = onsets(d["log_fitting_error"], d["steps"], s, never=math.inf)
    assert np.all((on >= 30 * EVERY) & (on <= 40 * EVERY))


def test_gic_null_draws_match_direct_sampling_of_ball_rows():
    """C5.3's null draws G of K rows uniform in a ball of R^m through Bartlett's decomposition; the same
    distribution as sampling the rows (theory.sample_unit_ball) and taking the Gram."""
    import torch

    from optmech.experiments.claims_training import _gic_G_null
    from optmech.theory import sample_unit_ball

    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    fast = [_gic_G_null({"K": 10, "m": 60}, rng)["values"][0] for _ in range(3000)]
    direct = []
    for _ in range(3000):
        X = sample_unit_ball(10, 60, generator=gen).double()
        lam = torch.linalg.eigvalsh(X @ X.T).numpy()
        direct.append(math.log2(lam[-1] / lam[0]))
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(fast, q) - np.quantile(direct, q)) < 0.06 * np.quantile(direct, q)


def test_the_verdicts_without_the_runs_that_learned_late(monkeypatch):
    """A claim resting on a run that learned only late holds with it and is not measurable without it: the claims
    checker says which verdicts move, and a preset may exclude such runs from the start (``exclude_edge_runs``)."""
    from optmech.experiments import claims_theory
    from optmech.experiments.claims import edge_sensitivity, evaluate_claims, run_table

    monkeypatch.setattr(claims_theory, "theory_claims", lambda rep, config: [])  # (the synthetic records hold no theory)

    key = ("a", 1, 1, "he_normal")
    for late, moves in ((True, True), (False, False)):
        config = _config()
        rep = reproduction(config, {key: (synthetic_run(onset=30, G=(3.0, 1.0)), 0.9)})
        curve = [0.1] * 6 + [0.5, 0.8, 0.9, 0.9] if late else [0.1, 0.5] + [0.9] * 8
        rep.train_meta[key]["evals"] = pd.DataFrame({"step": np.linspace(0, 480, 10).astype(int), "heldout_accuracy": curve})
        claims = evaluate_claims(rep)
        assert _claim(claims, "C2.2").verdict == "holds"
        runs = run_table(rep)
        assert (runs["a k1 s1 he_normal"]["edge"] is not None) == late
        sensitivity = edge_sensitivity(rep, claims, runs)
        if not moves:
            assert sensitivity is None
            continue
        assert sensitivity["runs"] == ["a k1 s1 he_normal"]
        moved = sensitivity["moved"]["C2.2"]
        assert moved["from"] == "holds" and moved["to"] == "not measurable" and "at the edge of learning" in moved["reason"]
        strict = _config(claims={"exclude_edge_runs": True})  # pre-registered: the same verdict, nothing left to compare
        rep.meta["config"] = strict.model_dump(mode="json")
        assert _claim(evaluate_claims(rep), "C2.2").verdict == "not measurable"
        assert edge_sensitivity(rep, evaluate_claims(rep), run_table(rep)) is None
