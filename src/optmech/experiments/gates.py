"""The gates that keep a unit out of an empirical claim's evidence (issue: "never count an untrained run
or a degenerate matrix as evidence").

- **learned**: the run's final held-out accuracy (every held-out image, after the last step) is at
  least chance (1/C) plus the preset's ``learn_margin``, and the run did not diverge.
- **degenerate**: the median over probe images and records of G = log₂(λmax/λmin) is below
  ``degenerate_G_bits``: A_x ≈ c·I, where the Theorem 3 bracket is closed by the vanishing signal
  (READING.md F3), not by a well-conditioned structure.

And a caveat, **at the edge of learning** (:func:`at_edge`): a run that learned, but whose held-out accuracy
first reached chance + ``learn_margin`` only after ``late_learning_fraction`` of its steps, or a run that did not
learn although some evaluation along training came halfway to that bar. Whether such a run learns can change with
the floating-point kernels a CPU selects (same code, same seed), and so can the verdicts of the claims it enters;
the report names them. It is a gate only with ``exclude_edge_runs`` (a learned run at the edge is then not
measurable); otherwise the claims checker also evaluates every claim so and reports which verdicts move
(:func:`.claims.edge_sensitivity`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["learned", "degenerate", "learned_gate", "learning_onset", "at_edge"]


def _bar(meta: dict, settings) -> float:
    """The held-out accuracy a run must reach to have learned: chance (1/C; 0.1 when unrecorded) + ``learn_margin``."""
    return (meta.get("summary", {}).get("chance_accuracy") or 0.1) + settings.learn_margin


def learned(meta: dict, settings) -> tuple[bool, str]:
    """(did the run learn, the sentence that says so) from its run.json and the ClaimSettings."""
    summary = meta.get("summary", {})
    acc = summary.get("heldout_accuracy")
    need = _bar(meta, settings)
    if summary.get("diverged_at_step") is not None:
        because = f" ({summary['diverged_because']})" if summary.get("diverged_because") else ""
        return False, f"diverged at step {summary['diverged_at_step']}{because}"
    if acc is None or not math.isfinite(acc):
        return False, "no final held-out accuracy"
    if acc < need:
        return False, f"did not learn (accuracy {acc:.3f} < {need:.2f})"
    return True, f"learned (held-out accuracy {acc:.3f})"


def degenerate(G, settings) -> bool:
    """Whether the median of the G values (bits) is below ``settings.degenerate_G_bits``."""
    values = np.asarray(G, dtype=float)
    values = values[np.isfinite(values)]
    return bool(len(values) and np.median(values) < settings.degenerate_G_bits)


def learned_gate(meta: dict, G, settings, *, need_learning: bool = True, need_structure: bool = True) -> str | None:
    """The reason a run is not measurable (did not learn, at the edge of learning with ``exclude_edge_runs``,
    degenerate A_x), or None."""
    if need_learning:
        ok, why = learned(meta, settings)
        if not ok:
            return why
        edge = at_edge(meta, settings) if settings.exclude_edge_runs else None
        if edge:
            return f"at the edge of learning ({edge})"
    if need_structure and degenerate(G, settings):
        med = float(np.nanmedian(np.asarray(G, dtype=float)))
        return f"degenerate (A_x ≈ I: median G {med:.2g} bits)"
    return None


def learning_onset(meta: dict, settings) -> int | None:
    """The first evaluation step at which the held-out accuracy reached chance + ``learn_margin`` (the run's
    ``evals``), or None."""
    evals = meta.get("evals")
    if evals is None or len(evals) == 0:
        return None
    above = evals[evals["heldout_accuracy"] >= _bar(meta, settings)]
    return int(above["step"].iloc[0]) if len(above) else None


def at_edge(meta: dict, settings) -> str | None:
    """Why a run sits at the edge of learning (see the module's docstring), or None."""
    summary, evals = meta.get("summary", {}), meta.get("evals")
    if summary.get("diverged_at_step") is not None or evals is None or len(evals) == 0:
        return None
    steps, bar = summary.get("steps") or int(evals["step"].iloc[-1]), _bar(meta, settings)
    if learned(meta, settings)[0]:
        onset = learning_onset(meta, settings)
        if onset is not None and steps and onset > settings.late_learning_fraction * steps:
            return f"learned late: held-out accuracy first ≥ {bar:.2f} at step {onset} of {steps}"
        return None
    chance, accuracy = summary.get("chance_accuracy") or 0.1, evals["heldout_accuracy"]
    if not accuracy.notna().any():
        return None
    best = accuracy.idxmax()
    peak = float(accuracy.loc[best])
    if peak >= chance + settings.learn_margin / 2:
        return f"did not learn, but reached {peak:.3f} at step {int(evals['step'].loc[best])}"
    return None
