"""Theory functions: the ball sampler, Lemma 2, Theorem 4 (printed vs corrected), Theorem 2, Proposition 1."""

import math

import pytest
import torch

from optmech.models import build
from optmech.theory import (
    gershgorin_bounds,
    lemma2_thresholds,
    proposition1_sides,
    sample_unit_ball,
    theorem2_ratio,
    theorem4_bounds,
    theorem4_trial,
    wilson_interval,
    z_value,
)


def test_ball_sampler_radius_distribution():
    """‖x‖/ε has CDF r^m on [0, 1]: check the quantiles and that every point is inside the ball."""
    g = torch.Generator().manual_seed(0)
    m, eps = 5, 2.5
    x = sample_unit_ball(20000, m, radius=eps, generator=g)
    r = (x.norm(dim=1) / eps).sort().values
    assert float(r.max()) <= 1.0
    for q in (0.1, 0.5, 0.9):
        assert abs(float(r[int(q * len(r))]) - q ** (1 / m)) < 0.01
    # directions are isotropic: the mean is near 0
    assert float((x / x.norm(dim=1, keepdim=True)).mean(0).abs().max()) < 0.03


def test_lemma2_frequencies_are_high_in_high_dimension():
    g = torch.Generator().manual_seed(1)
    hits = [theorem4_trial(10, 1000, generator=g) for _ in range(40)]
    assert sum(h["lemma2_inner"] for h in hits) >= 36
    assert 0 < lemma2_thresholds(10, 1000)[0] < 1


def test_z_reference_values_and_monotonicity():
    """READING §1.9 item 8: log2(Z+1) with K = 10 (inner ln, outer log2)."""
    for m, expected in [(1000, 1.754), (10_000, 0.803), (15_880, 0.669), (93_066, 0.315), (116_106, 0.285)]:
        assert abs(math.log2(z_value(10, m) + 1) - expected) < 2e-3, m
    assert abs(math.log2(z_value(10, 10_000, corrected=False) + 1) - 0.8014) < 2e-3
    zs = [z_value(10, m) for m in (100, 1000, 10_000, 100_000)]
    assert zs == sorted(zs, reverse=True)  # decreasing in m
    assert z_value(5, 10_000) < z_value(10, 10_000) < z_value(20, 10_000)  # increasing in K
    assert abs(theorem4_bounds(10, 93_066, base=2)["U"] - 1.4e-4) < 2e-5  # printed T4a at ε = 1, in bits


def test_theorem4_printed_U_bound_fails_and_gershgorin_holds():
    g = torch.Generator().manual_seed(2)
    trials = [theorem4_trial(10, 10_000, generator=g) for _ in range(20)]
    assert not any(t["t4a_holds"] for t in trials)  # READING: T4a failed in 100 % of trials
    assert all(t["t4b_printed_holds"] and t["t4b_corrected_holds"] for t in trials)
    assert all(t["gershgorin_U_holds"] for t in trials if t["gershgorin_U_holds"] is not None)
    assert math.isnan(gershgorin_bounds(10, 500)["U"])  # vacuous below m ≈ 1120


def test_wilson_interval():
    lo, hi = wilson_interval(95, 100)
    assert lo < 0.95 < hi and 0.88 < lo < 0.90
    assert wilson_interval(0, 10)[0] == 0.0


def test_theorem2_ratio_is_bounded_and_nonnegative():
    model = build("snet", depth=1, input_shape=(1, 8, 8), seed=0, dtype=torch.float64)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    rho = theorem2_ratio(model, x, torch.logspace(-4, 0, 9, dtype=torch.float64))
    assert (rho >= 0).all() and torch.isfinite(rho).all()
    assert float(rho[:3].max()) < 10 * float(rho[3:].max() + 1e-12)


def test_proposition1_identity():
    g = torch.Generator().manual_seed(3)
    groups = torch.arange(6).repeat_interleave(5)  # 6 distinct inputs, 5 labels each
    labels = torch.randint(0, 4, (30,), generator=g)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)[groups]
    lhs, rhs = proposition1_sides(groups, labels, logits)
    assert lhs == pytest.approx(rhs, rel=1e-12)
