"""The theory experiments of a reproduction (READING.md §1.7–§1.9 and §5), each a table.

Every function is deterministic given its seed and returns a tidy DataFrame that the claims
checker reads; :data:`THEORY_EXPERIMENTS` names them. Monte Carlo frequencies are per trial rows
so that intervals can be computed later; logarithms follow :mod:`optmech.theory` (nats inside).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from .. import theory
from ..losses import available_losses, get_loss
from ..models import build, build_paper
from ..structure import structural_matrix
from .reproduce_config import TheorySettings

__all__ = ["THEORY_EXPERIMENTS", "run_theory_experiment"]


def lemma2_mc(s: TheorySettings) -> pd.DataFrame:
    """Lemma 2 (BHK 2.8) by Monte Carlo: per (n, m, trial), whether each of its two events held."""
    gen = torch.Generator().manual_seed(s.seed)
    rows = []
    for n in s.lemma2_ns:
        for m in s.lemma2_ms:
            for trial in range(s.lemma2_trials):
                norms_ok, inner_ok = theory.lemma2_holds(theory.sample_unit_ball(n, m, generator=gen))
                rows.append({"n": n, "m": m, "trial": trial, "norms": norms_ok, "inner": inner_ok})
    return pd.DataFrame(rows)


def theorem4_mc(s: TheorySettings) -> pd.DataFrame:
    """Theorem 4 under an exact GIC (K rows uniform in the unit ball of R^m): per trial U, G (nats),
    the printed bounds, the corrected Z and the Gershgorin bounds, and each verdict."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    rows = []
    K = s.theorem4_K
    for m in s.theorem4_ms:
        printed = theory.theorem4_bounds(K, m, corrected=False)
        corrected = theory.theorem4_bounds(K, m, corrected=True)
        gersh = theory.gershgorin_bounds(K, m)
        for trial in range(s.theorem4_trials):
            r = theory.theorem4_trial(K, m, generator=gen)
            rows.append({"K": K, "m": m, "trial": trial, **r, "t4a_bound": printed["U"], "t4b_printed_bound": printed["G"],
                         "t4b_corrected_bound": corrected["G"], "gershgorin_U_bound": gersh["U"], "gershgorin_G_bound": gersh["G"]})
    frame = pd.DataFrame(rows)
    for col in ("gershgorin_U_holds", "gershgorin_G_holds"):
        frame[col] = frame[col].astype("boolean")  # None where the bound is vacuous
    return frame


def z_grid(s: TheorySettings) -> pd.DataFrame:
    """Z(m, K) printed and corrected (exponent −2), and log₂(Z + 1), on a grid."""
    rows = []
    for K in s.z_Ks:
        for m in s.z_ms:
            if m < 2:
                continue
            zp, zc = theory.z_value(K, m, corrected=False), theory.z_value(K, m, corrected=True)
            rows.append({"K": K, "m": m, "z_printed": zp, "z_corrected": zc,
                         "log2_z1_printed": math.log2(zp + 1), "log2_z1_corrected": math.log2(zc + 1)})
    return pd.DataFrame(rows)


def _probe_inputs(n: int, input_shape=(1, 28, 28), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *input_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def theorem2_ratio(s: TheorySettings) -> pd.DataFrame:
    """Theorem 2: ρ(t) = (‖softmax f_{tθ}(x)‖² − 1/K)/(t²‖θ‖²) as t → 0 for models a–d (k = 1)."""
    x = _probe_inputs(4, seed=s.seed)
    ts = torch.tensor(s.theorem2_ts, dtype=torch.float64)
    rows = []
    for letter in "abcd":
        model = build_paper(letter, depth=1, seed=s.seed, dtype=torch.float64)
        for t, rho in zip(ts.tolist(), theory.theorem2_ratio(model, x, ts).tolist()):
            rows.append({"model": letter, "t": t, "rho": rho})
    return pd.DataFrame(rows)


def proposition1(s: TheorySettings) -> pd.DataFrame:
    """Proposition 1 on synthetic data with repeated inputs carrying several labels (B_Ω = H(Y|X) > 0)."""
    rows = []
    for trial in range(5):
        gen = torch.Generator().manual_seed(s.seed + 100 + trial)
        n_inputs, C = 12, 5
        inputs = torch.randn(n_inputs, 7, generator=gen, dtype=torch.float64)
        group_ids = torch.randint(0, n_inputs, (200,), generator=gen)
        labels = torch.randint(0, C, (200,), generator=gen)
        model = build("mlp", depth=1, input_shape=(7,), n_classes=C, seed=trial, dtype=torch.float64)
        with torch.no_grad():
            logits = model(inputs[group_ids])
        lhs, rhs = theory.proposition1_sides(group_ids, labels, logits)
        rows.append({"trial": trial, "mean_ce": lhs, "entropy_plus_kl": rhs, "rel_err": abs(lhs - rhs) / abs(lhs)})
    return pd.DataFrame(rows)


def fenchel_young(s: TheorySettings) -> pd.DataFrame:
    """Lemma 1 and eq. (6) for every registered loss: d ≥ 0, d(q = predict f) = 0, ∇_f d = p − q,
    and d(1_y, f) = cross-entropy for softmax. Worst violation per loss over random logits/targets."""
    gen = torch.Generator().manual_seed(s.seed + 2)
    rows = []
    for name in available_losses():
        loss = get_loss(name, **({"alpha": 1.7} if name == "entmax" else {}))
        f = (3 * torch.randn(256, 10, generator=gen, dtype=torch.float64)).requires_grad_(True)
        y = torch.randint(0, 10, (256,), generator=gen)
        q = loss.targets(y, 10, torch.float64)
        d = loss(f, q, reduction="none")
        (grad,) = torch.autograd.grad(d.sum(), f)
        p = loss.predict(f.detach())
        at_p = loss(f.detach(), p, reduction="none")
        ce = torch.nn.functional.cross_entropy(f.detach(), y, reduction="none")
        ce_gap = float((d.detach() - ce).abs().max()) if name == "softmax" else 0.0
        rows.append({"loss": name, "min_d": float(d.detach().min()), "max_d_at_prediction": float(at_p.abs().max()),
                     "max_grad_err": float((grad - (p - q)).abs().max()), "max_ce_gap": ce_gap})
    return pd.DataFrame(rows)


def output_bias(s: TheorySettings) -> pd.DataFrame:
    """READING.md F1: with a final biased Linear z = W h + b, λmin(A_x) ≥ 1 + ‖h‖². Per sample, models a–d, k ∈ {0, 1, 3}."""
    x = _probe_inputs(6, seed=s.seed + 3)
    rows = []
    for letter in "abcd":
        for depth in (0, 1, 3):
            model = build_paper(letter, depth=depth, seed=s.seed, dtype=torch.float64)
            last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            seen = {}
            handle = last.register_forward_hook(lambda mod, inp, out, seen=seen: seen.__setitem__("h", inp[0].detach()))
            A = structural_matrix(model, x, method="auto").A
            with torch.no_grad():
                model(x)
            handle.remove()
            lam_min = torch.linalg.eigvalsh(A.double())[:, 0]
            bound = 1.0 + (seen["h"].double() ** 2).sum(-1)
            for i in range(len(x)):
                rows.append({"model": letter, "depth": depth, "sample": i, "lambda_min": float(lam_min[i]),
                             "one_plus_h2": float(bound[i])})
    return pd.DataFrame(rows)


def gershgorin_lemma3(s: TheorySettings) -> pd.DataFrame:
    """Lemma 3 (Gershgorin): every eigenvalue of a random symmetric matrix lies in a disc."""
    gen = torch.Generator().manual_seed(s.seed + 4)
    rows = []
    for trial in range(s.gershgorin_trials):
        n = 2 + trial % 12
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        a = a + a.T
        lam = torch.linalg.eigvalsh(a)
        centre, radius = a.diagonal(), a.abs().sum(1) - a.diagonal().abs()
        dist = ((lam[:, None] - centre[None]).abs() - radius[None]).min(1).values  # ≤ 0 inside some disc
        rows.append({"trial": trial, "n": n, "max_outside": float(dist.max())})
    return pd.DataFrame(rows)


#: name -> (function, what it checks)
THEORY_EXPERIMENTS = {
    "lemma2": (lemma2_mc, "Lemma 2 by Monte Carlo"),
    "theorem4": (theorem4_mc, "Theorem 4 (T4a, T4b) and the Gershgorin correction by Monte Carlo"),
    "z_grid": (z_grid, "Z(|θ|, |Y|) printed and corrected"),
    "theorem2": (theorem2_ratio, "Theorem 2: ρ(t) as t → 0"),
    "proposition1": (proposition1, "Proposition 1 on data with repeated inputs"),
    "fenchel_young": (fenchel_young, "Lemma 1 and eq. (6) for every loss"),
    "output_bias": (output_bias, "F1: λmin ≥ 1 + ‖h‖² with a final biased Linear"),
    "gershgorin": (gershgorin_lemma3, "Lemma 3 (Gershgorin) on random symmetric matrices"),
}


def run_theory_experiment(name: str, settings: TheorySettings) -> pd.DataFrame:
    if name not in THEORY_EXPERIMENTS:
        raise ValueError(f"unknown theory experiment {name!r}; expected one of {list(THEORY_EXPERIMENTS)}")
    return THEORY_EXPERIMENTS[name][0](settings)
