"""The errors every layer may raise about values that went non-finite (a leaf: imports nothing of optmech)."""

from __future__ import annotations

import math

__all__ = ["NonFiniteLogitsError", "NonFiniteStructureError", "bad_samples", "check_finite_structure"]


class NonFiniteLogitsError(ValueError):
    """The logits hold NaN or inf (a diverged model, or bad inputs)."""


class NonFiniteStructureError(ValueError):
    """A structural matrix holds NaN or inf though the logits are finite: J_x J_xᵀ overflowed the model's dtype."""


def check_finite_structure(A, logits=None) -> None:
    """Raise when A (batch, C, C) holds NaN or inf, naming the samples: NonFiniteLogitsError when the logits do
    (``logits()``, if given, returns them), else NonFiniteStructureError (J_x J_xᵀ overflowed A's dtype).

    One reduction first (finite unless some entry is NaN/inf or the sum overflowed), the per-sample check only then.
    """
    if math.isfinite(A.sum().item()):
        return
    finite = A.isfinite().flatten(1).all(1)
    if bool(finite.all()):
        return
    if logits is not None:
        finite_logits = logits().isfinite().all(1)
        if not bool(finite_logits.all()):
            raise NonFiniteLogitsError(
                f"model output: expected finite logits, got NaN or inf in samples {bad_samples(finite_logits)}, so their "
                "structural matrices are undefined. Look for a diverged model (NaN weights) or inputs it cannot handle."
            )
        where = f"in samples {bad_samples(finite)} with finite logits"
    else:
        where = f"in samples {bad_samples(finite)}"
    raise NonFiniteStructureError(
        f"A: expected finite structural matrices, got NaN or inf {where}: J_x J_xᵀ overflowed {A.dtype} (the Jacobian's "
        "entries are beyond its range). Probe a float64 copy of the model (model.double()) or look for exploding "
        "weights or activations."
    )


def bad_samples(finite_per_sample) -> str:
    """'[i, j, …]' for the first ten samples whose flag is False (a bool tensor of shape (batch,))."""
    bad = (~finite_per_sample).nonzero().flatten().tolist()
    return f"{bad[:10]}{'…' if len(bad) > 10 else ''}"
