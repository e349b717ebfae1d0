"""Empirical claims as calibrated tests: an effect size, its minimum, gates, and a null from the same records.

    test = EffectTest(effect=lambda d: d["late"] - d["early"], minimum=0.1, null=shuffle_time, ...)
    claim = empirical_claim("C3.2", "Fig. 3", statement, operationalisation, units, test, settings)

Each unit of a claim (a run, a seed, a model) is either *gated* — its run did not learn, or its
structural matrix is degenerate (A_x ≈ I, READING.md F3) — and then "not measurable", never evidence
either way; or it yields an effect size e in the claim's stated units and passes when e ≥ minimum
(or e ≤ maximum). The claim's candidate verdict: "holds" when every measurable unit passes, "fails"
when more than half of them fail, "inconclusive" otherwise, "not measurable" when no unit is.

The test is then calibrated on a null built from the same records (shuffled time order, permuted
depth labels, swapped model labels, random matrices under the GIC): ``null_draws`` draws of the whole
claim, each combined with the same rule. The false-pass rate is the fraction of null draws whose
verdict is "holds"; a claim holds only when its rate is at most ``max_false_pass`` (5 %), and is
"inconclusive" otherwise, with the rate named in its reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .claims import Claim, make_claim

__all__ = ["Unit", "EffectTest", "empirical_claim", "candidate_verdict", "false_pass_rate", "shuffle_time", "spearman",
           "permute_labels", "swap_pairs"]


@dataclasses.dataclass
class Unit:
    """One unit of an empirical claim: ``data`` for the test, ``gate`` the reason it cannot be measured
    (None when it can), ``context`` values reported beside the effect."""

    data: Any
    gate: str | None = None
    context: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EffectTest:
    """How a unit's data becomes an effect size, what size passes, and how the null is drawn.

    Attributes:
        effect: data -> effect size (float; NaN when this unit's data define none, see ``undefined``).
        effect_name: what the effect is, with its unit ("bits", "iterations", "Spearman ρ").
        null: (data, numpy Generator) -> data drawn under the null.
        null_name: the null in words ("time order shuffled per image").
        minimum: a unit passes when effect ≥ minimum ...
        maximum: ... or when effect ≤ maximum (exactly one of the two is set).
        undefined: the reason given for a unit whose effect is NaN.
    """

    effect: Callable[[Any], float]
    effect_name: str
    null: Callable[[Any, np.random.Generator], Any] | None
    null_name: str
    minimum: float | None = None
    maximum: float | None = None
    undefined: str = "the effect is undefined on these records"

    def passes(self, value: float) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        return bool(value >= self.minimum) if self.minimum is not None else bool(value <= self.maximum)

    @property
    def threshold(self) -> str:
        return f"≥ {self.minimum:g}" if self.minimum is not None else f"≤ {self.maximum:g}"


def candidate_verdict(passes: list[bool | None]) -> str:
    """The verdict before calibration, from the measurable units' pass flags (None = not measurable)."""
    known = [p for p in passes if p is not None]
    if not known:
        return "not measurable"
    if all(known):
        return "holds"
    if sum(not p for p in known) > len(known) / 2:
        return "fails"
    return "inconclusive"


def false_pass_rate(units: dict[str, Unit], test: EffectTest, draws: int, seed: int) -> tuple[float | None, list[float]]:
    """Fraction of ``draws`` null draws of the whole claim whose verdict is "holds", and the null's
    median-over-units effects (for the report). None when the claim has no null."""
    measurable = [u.data for u in units.values() if u.gate is None]
    if test.null is None or not measurable or draws < 1:
        return None, []
    rng = np.random.default_rng(seed)
    holds, effects = 0, []
    for _ in range(draws):
        values = [test.effect(test.null(data, rng)) for data in measurable]
        passes = [test.passes(v) for v in values]
        holds += candidate_verdict(passes) == "holds"
        finite = [v for v in values if math.isfinite(v)]
        effects.append(float(np.median(finite)) if finite else math.nan)
    return holds / draws, effects


def empirical_claim(id: str, source: str, statement: str, operationalisation: str, units: dict[str, Unit], test: EffectTest,
                    settings, *, note: str = "", caveats: tuple[str, ...] = ()) -> Claim:
    """A calibrated empirical claim (see the module docstring); ``settings`` is the preset's ClaimSettings."""
    out, passes, effects = {}, [], []
    for name, unit in units.items():
        if unit.gate is not None:
            out[name] = {**unit.context, "pass": None, "not_measurable": unit.gate}
            passes.append(None)
            continue
        value = test.effect(unit.data)
        ok = test.passes(value)
        entry = {**unit.context, "effect": value, "pass": ok}
        if ok is None:
            entry["not_measurable"] = test.undefined
        else:
            effects.append(value)
        out[name] = entry
        passes.append(ok)
    verdict = candidate_verdict(passes)
    rate, null_effects = false_pass_rate(units, test, settings.null_draws, settings.null_seed)
    finite_null = [e for e in null_effects if math.isfinite(e)]
    effect = {
        "name": test.effect_name,
        "value": float(np.median(effects)) if effects else None,
        "threshold": test.threshold,
        "null": test.null_name,
        "null_draws": settings.null_draws if rate is not None else 0,
        "null_false_pass_rate": rate,
        "null_effect_q95": float(np.quantile(finite_null, 0.95)) if finite_null else None,
        "null_effect_q05": float(np.quantile(finite_null, 0.05)) if finite_null else None,
        "max_false_pass": settings.max_false_pass,
    }
    n_known = sum(p is not None for p in passes)
    n_pass = sum(bool(p) for p in passes if p is not None)
    gates = list(dict.fromkeys(u["not_measurable"] for u in out.values() if u.get("not_measurable")))
    if verdict == "not measurable":
        reason = "No unit could be measured: " + "; ".join(gates) + "."
    else:
        size = f"effect {effect['value']:.3g} (median over units; {test.effect_name}; needs {test.threshold})"
        reason = f"{n_pass} of {n_known} measurable units pass, {size}."
        if rate is not None:
            reason += f" Under the null ({test.null_name}) the test holds in {100 * rate:.1f} % of {settings.null_draws} draws."
        if verdict == "holds" and (rate is None or rate > settings.max_false_pass):
            verdict = "inconclusive"
            reason += (f" The test is not calibrated (null false-pass rate above {100 * settings.max_false_pass:.0f} %): "
                       "it cannot tell this effect from the null." if rate is not None else " No null: the test is not calibrated.")
        gated = [n for n, u in out.items() if u.get("not_measurable")]
        if gated:
            reason += f" Not measurable: {', '.join(gated)}."
    return make_claim(id, source, statement, operationalisation, "empirical", out, note=note, verdict=verdict,
                      effect=effect, reason=reason, caveats=caveats)


# --- nulls and statistics shared by the claims ----------------------------------------------------


def shuffle_time(arrays: dict, rng: np.random.Generator, columns=None) -> dict:
    """The null "time order shuffled": every (n_images, n_records) array in ``arrays`` (or only
    ``columns``) has each image's records permuted, the same permutation for every column of an image
    (so each record's values stay together) unless only some columns are shuffled."""
    out = dict(arrays)
    keys = [k for k, v in arrays.items() if isinstance(v, np.ndarray) and v.ndim == 2] if columns is None else list(columns)
    n, t = arrays[keys[0]].shape
    order = np.argsort(rng.random((n, t)), axis=1)
    for k in keys:
        out[k] = np.take_along_axis(arrays[k], order, axis=1)
    return out


def spearman(x, y) -> float:
    """Spearman rank correlation (NaN when either side is constant or fewer than 3 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # ties share their mean rank
        tie = v == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def permute_labels(data: dict, rng: np.random.Generator) -> dict:
    """The null "depth labels permuted": ``data["values"]`` keeps its values, ``data["k"]`` is shuffled."""
    return {**data, "k": rng.permutation(np.asarray(data["k"]))}


def swap_pairs(data: dict, rng: np.random.Generator) -> dict:
    """The null "model labels swapped at random": each pair (data["x"][i], data["y"][i]) is swapped with
    probability 1/2 (no difference between the two models)."""
    x, y = np.asarray(data["x"], dtype=float), np.asarray(data["y"], dtype=float)
    flip = rng.random(len(x)) < 0.5
    return {**data, "x": np.where(flip, y, x), "y": np.where(flip, x, y)}
