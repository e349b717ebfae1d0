"""The paper's theory as pure functions, with the corrections of READING.md §1.7–§1.9.

Logarithms: Lemma 2, Theorem 4 and Z come from Blum–Hopcroft–Kannan Thm 2.8, which uses the
natural logarithm; every function here works in nats unless it takes ``base``. To compare with U
or G recorded in bits, compute the inner terms in nats and pass ``base=2`` for the outer log.

- Lemma 2 (BHK 2.8): n i.i.d. points uniform in the unit ball of R^m satisfy, with probability
  1 − O(1/n), ‖x_i‖ ≥ 1 − 2 ln n / m and |⟨x_i, x_j⟩| ≤ √(6 ln n)/√(m − 1).
- Theorem 4 (as printed): under the GIC, with probability ≥ 1 − O(1/K),
  (T4a) U ≤ −log(1 − 2 ln K/m)² − log ε²;  (T4b) G ≤ log(Z + 1),
  Z = [2K√(6 ln K)/√(m−1)]·(1 − 2 ln K/m)^{+2}. Dividing eq. (30) by eq. (27) gives the exponent
  −2 (``z_value(corrected=True)``). T4a's proof bounds λmin from the wrong side; the rigorous
  Gershgorin version is :func:`gershgorin_bounds`.
- Theorem 2: ρ(t) = (‖softmax f_{tθ}(x)‖² − 1/K)/(t²‖θ‖²) stays bounded as t → 0.
- Proposition 1: mean cross-entropy = H(Y|X) + mean KL(q̃_{Y|x} ‖ p(x)) (empirical, in nats).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "sample_unit_ball",
    "lemma2_thresholds",
    "lemma2_holds",
    "z_value",
    "theorem4_bounds",
    "gershgorin_bounds",
    "theorem4_trial",
    "wilson_interval",
    "theorem2_ratio",
    "proposition1_sides",
]


def sample_unit_ball(n: int, m: int, *, radius: float = 1.0, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n points uniform in the ball of radius ε in R^m: x = ε·U^{1/m}·N/‖N‖. Returns (n, m)."""
    if n < 1 or m < 1 or radius <= 0:
        raise ValueError(f"sample_unit_ball: expected n ≥ 1, m ≥ 1, radius > 0, got n={n}, m={m}, radius={radius}.")
    direction = torch.randn(n, m, generator=generator, dtype=dtype)
    direction = direction / direction.norm(dim=1, keepdim=True)
    u = torch.rand(n, 1, generator=generator, dtype=dtype)
    return radius * u ** (1.0 / m) * direction


def lemma2_thresholds(n: int, m: int) -> tuple[float, float]:
    """(norm threshold 1 − 2 ln n/m, inner-product threshold √(6 ln n)/√(m−1)) for the unit ball (nats)."""
    if n < 2 or m < 2:
        raise ValueError(f"lemma2_thresholds: expected n ≥ 2 and m ≥ 2, got n={n}, m={m}.")
    return 1.0 - 2.0 * math.log(n) / m, math.sqrt(6.0 * math.log(n)) / math.sqrt(m - 1)


def lemma2_holds(x: torch.Tensor, radius: float = 1.0) -> tuple[bool, bool]:
    """Whether the sample x (n, m) from the ball of radius ε meets Lemma 2's two conditions (scaled by ε, ε²)."""
    n, m = x.shape
    norm_thr, inner_thr = lemma2_thresholds(n, m)
    norms_ok = bool((x.norm(dim=1) >= norm_thr * radius).all())
    gram = x @ x.T
    off = gram[~torch.eye(n, dtype=torch.bool)]
    return norms_ok, bool((off.abs() <= inner_thr * radius**2).all())


def z_value(K: int, m: int, *, corrected: bool = True) -> float:
    """Z(|θ| = m, |Y| = K) of Theorem 4 (nats inside). ``corrected`` uses the exponent −2 derived from (30)/(27)."""
    a = 2.0 * math.log(K) / m
    s = 2.0 * K * math.sqrt(6.0 * math.log(K)) / math.sqrt(m - 1)
    return s * (1.0 - a) ** (-2.0 if corrected else 2.0)


def theorem4_bounds(K: int, m: int, *, radius: float = 1.0, corrected: bool = True, base: float = math.e) -> dict[str, float]:
    """Theorem 4's right-hand sides: {"U": −log(1 − 2 ln K/m)² − log ε² (T4a, as printed), "G": log(Z + 1) (T4b)}.

    ``base`` is the outer logarithm's base (2 to compare with quantities recorded in bits).
    """
    a = 2.0 * math.log(K) / m
    log = lambda v: math.log(v) / math.log(base)  # noqa: E731
    return {"U": -log((1.0 - a) ** 2) - log(radius**2), "G": log(z_value(K, m, corrected=corrected) + 1.0)}


def gershgorin_bounds(K: int, m: int, *, radius: float = 1.0, base: float = math.e) -> dict[str, float]:
    """Rigorous replacement of T4a/T4b (READING §1.9 item 4), valid when Lemma 2's events hold.

    With a = 2 ln K/m and s = √(6 ln K/(m−1)): λmin ≥ ε²[(1−a)² − (K−1)s], so
    U ≤ −log ε² − log[(1−a)² − (K−1)s] and G ≤ log(1 + 2Ks/[(1−a)² − (K−1)s]).
    Returns NaN for both when the bracket is not positive (the bound is vacuous; K = 10 needs m ≳ 1120).
    """
    a = 2.0 * math.log(K) / m
    s = math.sqrt(6.0 * math.log(K) / (m - 1))
    bracket = (1.0 - a) ** 2 - (K - 1) * s
    if bracket <= 0:
        return {"U": math.nan, "G": math.nan}
    log = lambda v: math.log(v) / math.log(base)  # noqa: E731
    return {"U": -log(radius**2) - log(bracket), "G": log(1.0 + 2.0 * K * s / bracket)}


def theorem4_trial(K: int, m: int, *, radius: float = 1.0, generator: torch.Generator | None = None) -> dict[str, float | bool]:
    """One Monte Carlo trial of Theorem 4 under an exact GIC: K rows uniform in the ε-ball of R^m.

    Returns U = −ln λmin, G = ln(λmax/λmin) of A = XXᵀ, Lemma 2's two events and each bound's verdict.
    """
    x = sample_unit_ball(K, m, radius=radius, generator=generator)
    lam = torch.linalg.eigvalsh(x @ x.T)
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    U, G = -math.log(lam_min), math.log(lam_max / lam_min)
    printed, corrected, gersh = theorem4_bounds(K, m, radius=radius, corrected=False), theorem4_bounds(K, m, radius=radius), gershgorin_bounds(K, m, radius=radius)
    norms_ok, inner_ok = lemma2_holds(x, radius)
    return {
        "U": U, "G": G, "lemma2_norms": norms_ok, "lemma2_inner": inner_ok,
        "t4a_holds": U <= printed["U"], "t4b_printed_holds": G <= printed["G"], "t4b_corrected_holds": G <= corrected["G"],
        "gershgorin_U_holds": (U <= gersh["U"]) if not math.isnan(gersh["U"]) else None,
        "gershgorin_G_holds": (G <= gersh["G"]) if not math.isnan(gersh["G"]) else None,
    }


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial frequency."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denom = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def theorem2_ratio(model: nn.Module, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """ρ(t) = (‖softmax f_{tθ}(x)‖² − 1/K)/(t²‖θ‖²) for each t, averaged over the batch x. Returns (len(ts),).

    Every trainable parameter (biases included) is scaled by t, so t → 0 approaches θ = 0 where the
    logits vanish and p is uniform (the premise of Theorem 2).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    norm2 = sum(float((p.double() ** 2).sum()) for p in params.values())
    out = []
    with torch.no_grad():
        for t in ts.tolist():
            logits = functional_call(model, {n: t * p for n, p in params.items()}, (x,))
            p = torch.softmax(logits.double(), -1)
            out.append(float(((p**2).sum(-1) - 1.0 / p.shape[-1]).mean()) / (t**2 * norm2))
    return torch.tensor(out, dtype=torch.float64)


def proposition1_sides(group_ids: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Both sides of Proposition 1 on a dataset whose inputs repeat (nats).

    Args:
        group_ids: (N,) integer id of each sample's input x (equal ids = the same x).
        labels: (N,) class of each sample.
        logits: (N, C) the model's logits for each sample (equal for equal ids).

    Returns:
        (mean cross-entropy over samples, H(Y|X) + mean over samples of KL(q̃_{Y|x} ‖ p(x))),
        with q̃_{Y|x} the empirical label frequencies of each input.
    """
    C = logits.shape[1]
    logp = torch.log_softmax(logits.double(), -1)
    lhs = float(-logp[torch.arange(len(labels)), labels].mean())
    rhs = 0.0
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        q = torch.bincount(labels[idx], minlength=C).double() / len(idx)
        entropy = float(-torch.special.xlogy(q, q).sum())
        kl = float((torch.special.xlogy(q, q) - q * logp[idx[0]]).sum())
        rhs += len(idx) * (entropy + kl)
    return lhs, rhs / len(labels)
