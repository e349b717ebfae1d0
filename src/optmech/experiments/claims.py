"""The claims checker: every claim of READING.md §2 and §5 as an entry with a verdict.

    claims = evaluate_claims(read_reproduction("runs/quick"))
    write_claims(claims, "runs/quick/claims.json")

Each :class:`Claim` carries the paper's statement, our operationalisation with its thresholds
(from the preset's ``[claims]`` table, fixed before the run), the measured values per unit (a
model, seed, depth or grid point), a verdict and its reason. Claims come in kinds, counted apart:

- ``empirical``: what the paper reads off its experiments. An effect size against a stated minimum,
  units gated on learning and on a non-degenerate structure, calibrated on a null from the same
  records (:mod:`optmech.experiments.calibration`); ``holds`` needs a null false-pass rate ≤ 5 %.
- ``identity``: exact statements (Theorem 3, ‖g‖² = eᵀAe, F1, Lemma 1, …) checked numerically on
  every row; they hold by mathematics, so they confirm the software, not the paper's reading of data.
- ``theory``: Monte Carlo and exact checks of the paper's theorems on random matrices.
- ``derived``: conjunctions of other claims (Sec. 5.3.2's bullets, the initialisation contrast).
- ``descriptive``: values reported without a test.

Identities and exact checks hold when no unit fails; Monte Carlo claims hold when every unit passes,
fail when more than half fail, and are inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..records import Reproduction, write_json_atomic
from .reproduce_config import ReproduceConfig

__all__ = ["Claim", "evaluate_claims", "write_claims", "VERDICTS", "KINDS", "VERDICT_RULE", "combine", "count_verdicts",
           "summary_line", "run_table", "edge_sensitivity"]

VERDICTS = ("holds", "fails", "inconclusive", "not measurable")
KINDS = ("empirical", "identity", "theory", "derived", "descriptive")

#: How a verdict follows from the units of a claim (printed in claims.json and the report).
VERDICT_RULE = (
    "Empirical claims: a unit whose run did not learn (final held-out accuracy below chance + the preset's margin) or "
    "whose structural matrix is degenerate (A_x ≈ I: median G below the preset's threshold) is not measurable and "
    "counts for nothing. The measurable units' effect sizes are compared with the claim's minimum effect: the claim "
    "holds when every measurable unit passes and the same test, run on null draws from the same records, holds in at "
    "most 5 % of them; it fails when more than half of the measurable units fail; it is inconclusive otherwise "
    "(including a pass that the null reproduces too often) and not measurable when no unit is. Identities and exact "
    "checks hold when no unit fails. Monte Carlo checks hold when every unit passes and fail when more than half fail."
)


@dataclasses.dataclass
class Claim:
    """One checked claim. ``units`` maps a unit's name to {"pass": bool | None, ...measured values};
    a unit without "pass" is context (for example a sensitivity arm) and does not enter the verdict."""

    id: str
    source: str  # where the claim is stated: "Fig. 2", "Sec. 5.3.2", "Theorem 3", ...
    statement: str  # the paper's claim, in its words where possible
    operationalisation: str  # how we test it, thresholds included
    kind: str  # one of KINDS
    units: dict
    verdict: str
    note: str = ""
    reason: str = ""  # the verdict's reason, in a sentence
    effect: dict | None = None  # empirical claims: effect size, threshold, null and its false-pass rate
    caveats: tuple = ()  # ids of optmech.report caveats that qualify this claim

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def combine(passes: list, *, exact: bool = False) -> str:
    """Verdict of a claim from its units' pass flags (None = not measurable); see the module docstring."""
    known = [bool(p) for p in passes if p is not None]
    if not known:
        return "inconclusive"
    if exact:
        return "holds" if all(known) else "fails"
    if all(known) and len(known) == len(passes):
        return "holds"
    if sum(not p for p in known) > len(passes) / 2:
        return "fails"
    return "inconclusive"


def unit_passes(units: dict) -> list:
    """The pass flags of the units that are tested (units without a "pass" key are context only)."""
    return [u["pass"] for u in units.values() if isinstance(u, dict) and "pass" in u]


def clean(value):
    """JSON-friendly numbers: NaN/inf become None or strings, numpy scalars plain floats."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(f"{value:.6g}")
    return value


def make_claim(id: str, source: str, statement: str, operationalisation: str, kind: str, units: dict, note: str = "",
               verdict: str | None = None, *, exact: bool = False, reason: str | None = None, effect: dict | None = None,
               caveats: tuple = ()) -> Claim:
    """A Claim whose verdict follows from its units (unless given); ``exact``: any failing unit fails it."""
    if kind not in KINDS:
        raise AssertionError(f"claim kind {kind!r} not in {KINDS}")
    passes = unit_passes(units)
    if verdict is None:
        verdict = combine(passes, exact=exact)
    if reason is None:
        known = [p for p in passes if p is not None]
        reason = (f"{sum(bool(p) for p in known)} of {len(passes)} units pass" + (f", {len(passes) - len(known)} not measurable"
                  if len(known) < len(passes) else "") + "." if passes else "")
    return Claim(id=id, source=source, statement=statement, operationalisation=operationalisation, kind=kind,
                 units=clean(units), verdict=verdict, note=note, reason=reason, effect=clean(effect) if effect else None,
                 caveats=tuple(caveats))


def evaluate_claims(rep: Reproduction, *, exclude_edge_runs: bool | None = None) -> list[Claim]:
    """Every claim, from the records of a reproduction (no model is rebuilt). ``exclude_edge_runs``: override the
    preset's ``ClaimSettings.exclude_edge_runs`` (a learned run at the edge of learning counts as not measurable)."""
    from .claims_theory import theory_claims
    from .claims_training import training_claims

    config = ReproduceConfig(**rep.meta["config"])
    if exclude_edge_runs is not None:
        config = config.model_copy(update={"claims": config.claims.model_copy(update={"exclude_edge_runs": exclude_edge_runs})})
    return training_claims(rep, config) + theory_claims(rep, config)


def edge_sensitivity(rep: Reproduction, claims: list[Claim], runs: dict) -> dict | None:
    """What the verdicts become when the learned runs at the edge of learning count as not measurable.

    ``claims`` as evaluated with the preset's settings, ``runs`` their :func:`run_table`. None when the preset
    excludes those runs already or no learned run is at the edge; else {"runs": [the learned runs at the edge],
    "moved": {claim id: {"from": verdict, "to": verdict, "reason": the new verdict's reason}}}. A run at the edge
    that did not learn counts for nothing either way (what it would add had it learned is not in the records).
    """
    config = ReproduceConfig(**rep.meta["config"])
    late = [key for key, r in runs.items() if r.get("edge") and r.get("learned")]
    if config.claims.exclude_edge_runs or not late:
        return None
    strict = {c.id: c for c in evaluate_claims(rep, exclude_edge_runs=True)}
    moved = {c.id: {"from": c.verdict, "to": strict[c.id].verdict, "reason": strict[c.id].reason}
             for c in claims if c.id in strict and strict[c.id].verdict != c.verdict}
    return {"runs": late, "moved": moved}


def run_table(rep: Reproduction) -> dict:
    """Every training run's outcome: {"a k01 s1 he_normal": {final held-out accuracy and loss, chance, learned, the
    step its held-out accuracy first reached the learned bar, why it sits at the edge of learning or None, ...}}
    (:mod:`.gates`)."""
    from .gates import at_edge, learned, learning_onset

    config = ReproduceConfig(**rep.meta["config"])
    out = {}
    for (m, k, s, init), meta in sorted(rep.train_meta.items()):
        summary = meta.get("summary", {})
        ok, why = learned(meta, config.claims)
        out[f"{m} k{k} s{s} {init}"] = {
            "model": m, "depth": k, "seed": s, "init": init, "steps": summary.get("steps"),
            "heldout_accuracy": summary.get("heldout_accuracy"), "heldout_loss": summary.get("heldout_loss"),
            "chance_accuracy": summary.get("chance_accuracy"), "learned": ok, "diverged_at_step": summary.get("diverged_at_step"),
            "why": why, "learned_at_step": learning_onset(meta, config.claims), "edge": at_edge(meta, config.claims),
        }
    return out


def count_verdicts(claims) -> dict:
    """{kind: {verdict: n}} for the kinds present (claims as Claim objects or their JSON dicts)."""
    get = lambda c, k: c[k] if isinstance(c, dict) else getattr(c, k)  # noqa: E731
    kinds = [k for k in KINDS if any(get(c, "kind") == k for c in claims)]
    return {k: {v: sum(get(c, "kind") == k and get(c, "verdict") == v for c in claims) for v in VERDICTS} for k in kinds}


def summary_line(counts: dict) -> str:
    """'empirical: 3 hold, 2 fail, …; identity: …' from :func:`count_verdicts`."""
    words = {"holds": "hold", "fails": "fail", "inconclusive": "inconclusive", "not measurable": "not measurable"}
    return "; ".join(f"{kind}: " + ", ".join(f"{n} {words[v]}" for v, n in per.items() if n) for kind, per in counts.items())


def write_claims(claims: list[Claim], path: str | Path, runs: dict | None = None, without_edge: dict | None = None) -> None:
    """claims.json: {"counts": {kind: {verdict: n}}, "rule", "runs": every training run's final held-out
    accuracy and loss, "without_edge_runs": :func:`edge_sensitivity` (None when not evaluated), "claims": [...]},
    written atomically."""
    write_json_atomic(path, {"counts": count_verdicts(claims), "summary": summary_line(count_verdicts(claims)),
                             "rule": VERDICT_RULE, "runs": clean(runs or {}), "without_edge_runs": clean(without_edge),
                             "claims": [c.to_json() for c in claims]})
