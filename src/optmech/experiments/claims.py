"""The claims checker: every claim of READING.md §2 and §5 as an entry with a verdict.

    claims = evaluate_claims(read_reproduction("runs/quick"))
    write_claims(claims, "runs/quick/claims.json")

Each :class:`Claim` carries the paper's statement, our operationalisation with its thresholds
(from the preset's ``[claims]`` table, fixed before the run), the measured values per unit (a
model, seed, depth or grid point) and a verdict:

- exact and deterministic claims: ``holds`` when no unit fails, ``fails`` otherwise;
- trends and Monte Carlo claims over several units: ``holds`` when every unit passes, ``fails``
  when more than half fail, ``inconclusive`` when the units disagree otherwise or nothing could be
  measured (for example no onset of the fitting error's fall within the run).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..records import Reproduction, write_json_atomic
from .reproduce_config import ReproduceConfig

__all__ = ["Claim", "evaluate_claims", "write_claims", "VERDICTS", "VERDICT_RULE", "combine"]

VERDICTS = ("holds", "fails", "inconclusive")

#: How a verdict follows from the units of a claim (printed in claims.json and the report).
VERDICT_RULE = (
    "Exact claims hold when no unit fails. Trends and Monte Carlo claims hold when every unit passes, fail when "
    "more than half of the units fail, and are inconclusive otherwise or when nothing could be measured."
)


@dataclasses.dataclass
class Claim:
    """One checked claim. ``units`` maps a unit's name to {"pass": bool | None, ...measured values};
    a unit without "pass" is context (for example a sensitivity arm) and does not enter the verdict."""

    id: str
    source: str  # where the claim is stated: "Fig. 2", "Sec. 5.3.2", "Theorem 3", ...
    statement: str  # the paper's claim, in its words where possible
    operationalisation: str  # how we test it, thresholds included
    kind: str  # "exact", "probabilistic" or "trend"
    units: dict
    verdict: str
    note: str = ""

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
               verdict: str | None = None) -> Claim:
    """A Claim whose verdict follows from its units (unless given)."""
    if verdict is None:
        verdict = combine(unit_passes(units), exact=(kind == "exact"))
    return Claim(id=id, source=source, statement=statement, operationalisation=operationalisation, kind=kind,
                 units=clean(units), verdict=verdict, note=note)


def evaluate_claims(rep: Reproduction) -> list[Claim]:
    """Every claim, from the records of a reproduction (no model is rebuilt)."""
    from .claims_theory import theory_claims
    from .claims_training import training_claims

    config = ReproduceConfig(**rep.meta["config"])
    return training_claims(rep, config) + theory_claims(rep, config)


def write_claims(claims: list[Claim], path: str | Path) -> None:
    """claims.json: {"claims": [...], "counts": {verdict: n}}, written atomically."""
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    write_json_atomic(path, {"counts": counts, "rule": VERDICT_RULE, "claims": [c.to_json() for c in claims]})
