"""The errors every layer may raise about values that went non-finite (a leaf: imports nothing of optmech)."""

from __future__ import annotations

__all__ = ["NonFiniteLogitsError", "NonFiniteStructureError", "bad_samples"]


class NonFiniteLogitsError(ValueError):
    """The logits hold NaN or inf (a diverged model, or bad inputs)."""


class NonFiniteStructureError(ValueError):
    """A structural matrix holds NaN or inf though the logits are finite: J_x J_xᵀ overflowed the model's dtype."""


def bad_samples(finite_per_sample) -> str:
    """'[i, j, …]' for the first ten samples whose flag is False (a bool tensor of shape (batch,))."""
    bad = (~finite_per_sample).nonzero().flatten().tolist()
    return f"{bad[:10]}{'…' if len(bad) > 10 else ''}"
