"""Fenchel-Young losses d_Ω(q, f) = Ω(q) + Ω*(f) − ⟨q, f⟩ and their prediction maps p = ∇Ω*(f).

The paper (Qi, Gong & Li, arXiv 2503.23016, Sec. 3.1, eq. (6)) writes the training objective as a
Fenchel-Young loss. Every loss here satisfies, for logits f of shape (batch, classes):

- d_Ω(q, f) ≥ 0, with equality iff q = predict(f)              (Lemma 1)
- ∇_f d_Ω(q, f) = predict(f) − q                               (exact, by autograd)
- ∇²_f d_Ω(q, f) = ∂predict(f)/∂f                              (double backward)

Everything is written with plain torch ops (no custom autograd.Function, no data-dependent Python
control flow), so `torch.func.vmap/grad/jacrev` and double backward work. For the sparse maps
(sparsemax, entmax) the threshold τ is found by bisection on detached logits and then refined by
one differentiable Newton step, which gives the exact implicit-function derivative of τ; Ω*(f) is
evaluated through its dual form Φ(f, μ) (stationary in μ), so its gradient is exactly p.

Available by name through :func:`get_loss`: ``softmax`` (Shannon negentropy on the simplex, i.e.
cross-entropy), ``sparsemax`` (Gini / Tsallis α = 2), ``entmax15`` (Tsallis α = 1.5),
``entmax`` (Tsallis with any ``alpha`` > 1), ``squared`` (Ω = ½‖·‖² on R^C, identity map).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import NonFiniteLogitsError

__all__ = [
    "FenchelYoungLoss",
    "SoftmaxLoss",
    "TsallisLoss",
    "SquaredLoss",
    "get_loss",
    "available_losses",
    "to_distribution",
    "check_logits",
    "NonFiniteLogitsError",
]



_REDUCTIONS = ("mean", "sum", "none")


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """Logits must be a floating (batch, classes) tensor of finite values (checks skipped inside vmap)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (batch, classes), got {type(logits).__name__} instead.")
    if logits.dim() != 2:
        raise ValueError(
            f"{name}: expected shape (batch, classes), got shape {tuple(logits.shape)} instead. "
            "Flatten or select the class dimension before calling the loss."
        )
    if not logits.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {logits.dtype} instead. Cast with .float().")
    if _readable(logits) and not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
        raise NonFiniteLogitsError(
            f"{name}: expected finite values, got NaN or inf in rows {bad[:10]}{'…' if len(bad) > 10 else ''}. "
            "Check the model's forward pass (learning rate, input normalisation) before computing the loss."
        )


def _readable(t: torch.Tensor) -> bool:
    """False inside a torch.func transform (vmap), where a tensor's values cannot be read in Python.

    Data-dependent input checks are skipped there; they ran on the untransformed call.
    """
    try:
        bool(t.reshape(-1)[:1].isfinite().all())
    except RuntimeError:
        return False
    return True


def to_distribution(
    targets: torch.Tensor,
    n_classes: int,
    *,
    dtype: torch.dtype = torch.float32,
    label_smoothing: float = 0.0,
    require_simplex: bool = True,
) -> torch.Tensor:
    """Turn targets into per-sample target vectors q of shape (batch, classes).

    Args:
        targets: class indices of shape (batch,) with values in [0, n_classes), or target
            distributions of shape (batch, n_classes) (non-negative rows summing to 1 when
            ``require_simplex``).
        n_classes: C.
        dtype: floating dtype of the result.
        label_smoothing: ε in [0, 1): q ← (1 − ε) q + ε / C.
        require_simplex: check that distribution targets lie on the probability simplex.

    Returns:
        q, shape (batch, classes).
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__} instead.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing} instead.")
    wrapped = not _readable(targets)
    if targets.dim() == 1:
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(
                f"targets: class-index targets of shape (batch,) must be an integer tensor, got dtype {targets.dtype} "
                "instead. Use targets.long(), or pass distributions of shape (batch, classes)."
            )
        if targets.numel() and not wrapped and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
            raise ValueError(
                f"targets: expected class indices in [0, {n_classes}), got values in "
                f"[{int(targets.min())}, {int(targets.max())}] instead. Check n_classes and the label encoding."
            )
        q = (targets.long().unsqueeze(-1) == torch.arange(n_classes, device=targets.device)).to(dtype)
    elif targets.dim() == 2:
        if targets.shape[1] != n_classes:
            raise ValueError(
                f"targets: expected distributions of shape (batch, {n_classes}), got shape {tuple(targets.shape)} "
                "instead. Pass one probability vector per sample, or class indices of shape (batch,)."
            )
        if not targets.is_floating_point():
            raise TypeError(f"targets: distribution targets must be floating point, got dtype {targets.dtype} instead.")
        q = targets.to(dtype)
        if wrapped:
            pass  # inside torch.func transforms data-dependent checks are impossible; checked outside
        elif not bool(torch.isfinite(q).all()):
            raise ValueError("targets: expected finite values, got NaN or inf. Clean the targets before the loss.")
        if require_simplex and not wrapped:
            tol = 1e-4 if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
            if bool((q < -tol).any()) or not torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=tol * n_classes):
                raise ValueError(
                    "targets: expected each row to be a probability vector (non-negative, summing to 1), got rows "
                    f"summing to {q.sum(1)[:5].tolist()} with minimum entry {float(q.min()):.3g} instead. "
                    "Normalise the targets, or use the 'squared' loss for unconstrained targets."
                )
    else:
        raise ValueError(
            f"targets: expected shape (batch,) of class indices or (batch, {n_classes}) of distributions, "
            f"got shape {tuple(targets.shape)} instead."
        )
    if label_smoothing:
        q = (1.0 - label_smoothing) * q + label_smoothing / n_classes
    return q


class FenchelYoungLoss:
    """Base class: d_Ω(q, f) = Ω(q) + Ω*(f) − ⟨q, f⟩ (paper eq. (6)).

    Subclasses implement :meth:`omega` (Ω on its domain), :meth:`omega_conj` (Ω*) and
    :meth:`predict` (p = ∇Ω*(f)). ``simplex`` says whether predictions lie on the probability
    simplex (then p − q ⊥ 1 for simplex targets, which the probe uses for a tighter bracket).

    Args:
        label_smoothing: ε applied to every target: q ← (1 − ε) q + ε / C.

    Call: ``loss(logits, targets, reduction="mean")`` with logits (batch, classes) and targets
    (batch,) class indices or (batch, classes) distributions; returns a scalar, or (batch,) for
    ``reduction="none"``.
    """

    name: str = "fenchel-young"
    simplex: bool = True

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing} instead.")
        self.label_smoothing = float(label_smoothing)

    # --- the three maps -----------------------------------------------------------------------
    def omega(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Ω(p) per row, shape (batch,)."""
        raise NotImplementedError

    def omega_conj(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Ω*(f) per row, shape (batch,)."""
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """p = ∇Ω*(f), shape (batch, classes)."""
        raise NotImplementedError

    # --- loss ---------------------------------------------------------------------------------
    def targets(self, targets: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
        """The target vectors q (batch, classes) this loss uses, label smoothing included."""
        return to_distribution(
            targets, n_classes, dtype=dtype, label_smoothing=self.label_smoothing, require_simplex=self.simplex
        )

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        check_logits(logits)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r} instead.")
        q = self.targets(targets, logits.shape[1], logits.dtype)
        if q.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets: expected {logits.shape[0]} rows to match logits, got {q.shape[0]} instead."
            )
        per_sample = self.divergence(q, logits)
        if reduction == "none":
            return per_sample
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    def divergence(self, q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d_Ω(q, f) = Ω(q) + Ω*(f) − ⟨q, f⟩ per row (eq. (6)), for target vectors q as made by
        :meth:`targets`; no input checks (the probe's path, where both were checked already)."""
        return self.omega(q) + self.omega_conj(logits) - (q * logits).sum(-1)

    def __repr__(self) -> str:
        extra = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        return f"{type(self).__name__}({self._repr_args()}{extra})"

    def _repr_args(self) -> str:
        return ""


class SoftmaxLoss(FenchelYoungLoss):
    """Shannon negentropy on the simplex: Ω(p) = Σ p_i ln p_i, Ω*(f) = logsumexp(f), p = softmax(f).

    d_Ω(q, f) = KL(q ‖ softmax f) = cross-entropy(f, q) − H(q); for one-hot q it is exactly the
    cross-entropy logsumexp(f) − f_y (READING.md §1.2). The paper's Ω(p) = Σ(p ln p − p) differs by
    the constant −1 on the simplex, which cancels in d_Ω.
    """

    name = "softmax"

    def omega(self, p: torch.Tensor) -> torch.Tensor:
        return torch.special.xlogy(p, p).sum(-1)

    def omega_conj(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, dim=-1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)


class TsallisLoss(FenchelYoungLoss):
    """Tsallis α-negentropy on the simplex (α > 1): Ω(p) = (Σ p_i^α − 1) / (α(α − 1)).

    Prediction (α-entmax): p_i = [(α − 1)(f_i − μ)]_+^{1/(α−1)} with μ such that Σ p_i = 1.
    α = 2 is sparsemax (Ω = ½‖p‖² − ½), α = 1.5 is 1.5-entmax; α → 1 recovers softmax.

    Ω*(f) = min_μ Φ(f, μ),  Φ(f, μ) = Σ_i u_i^{α/(α−1)} / α + μ + 1/(α(α−1)),
    u_i = [(α − 1)(f_i − μ)]_+,  ∂Φ/∂μ = 1 − Σ p_i,  ∂Φ/∂f_i = p_i.

    μ is found by bisection on detached logits (``n_iter`` halvings of a bracket of width
    1/(α−1)), then one Newton step on the graph, which makes μ(f) carry its exact
    implicit-function derivative: ∂p/∂f = (α−1)(diag(s) − s sᵀ/Σs), s_i = u_i^{(2−α)/(α−1)}/(α−1).

    Args:
        alpha: α > 1.
        n_iter: bisection steps (60 reaches float64 resolution).
    """

    def __init__(self, alpha: float = 1.5, *, n_iter: int = 60, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 1.0:
            raise ValueError(
                f"alpha: expected a finite number > 1 for Tsallis entmax, got {alpha!r} instead. "
                "Use the 'softmax' loss for alpha = 1."
            )
        self.alpha = float(alpha)
        self.n_iter = int(n_iter)
        self.name = "sparsemax" if self.alpha == 2.0 else ("entmax15" if self.alpha == 1.5 else f"entmax(alpha={self.alpha:g})")

    def _repr_args(self) -> str:
        return f"alpha={self.alpha:g}"

    def _power(self, u: torch.Tensor, exponent: float) -> torch.Tensor:
        """u^exponent for u ≥ 0, 0 where u = 0, with derivatives that stay finite at 0 (safe where)."""
        positive = u > 0
        safe = torch.where(positive, u, torch.ones_like(u))
        return torch.where(positive, safe**exponent, torch.zeros_like(u))

    def threshold(self, logits: torch.Tensor) -> torch.Tensor:
        """μ(f) of shape (batch, 1) with Σ_i [(α−1)(f_i − μ)]_+^{1/(α−1)} = 1, differentiable."""
        a1 = self.alpha - 1.0
        f = logits.detach()
        fmax = f.max(dim=-1, keepdim=True).values
        lo = fmax - 1.0 / a1  # Σ p ≥ 1 here (the largest p is 1)
        hi = fmax - (1.0 / f.shape[-1]) ** a1 / a1  # Σ p ≤ 1 here (every p ≤ 1/C)
        for _ in range(self.n_iter):
            mid = 0.5 * (lo + hi)
            total = self._power(torch.clamp(a1 * (f - mid), min=0), 1.0 / a1).sum(-1, keepdim=True)
            too_low = total >= 1  # μ too small: mass ≥ 1, so raise μ
            lo = torch.where(too_low, mid, lo)
            hi = torch.where(too_low, hi, mid)
        mu0 = 0.5 * (lo + hi)
        # One Newton step on h(μ) = Σ p_i(f, μ) − 1, on the graph: exact dμ/df at the root.
        u = torch.clamp(a1 * (logits - mu0), min=0)
        mass = self._power(u, 1.0 / a1).sum(-1, keepdim=True)
        slope = self._power(u, (2.0 - self.alpha) / a1).sum(-1, keepdim=True)  # = −∂h/∂μ
        return mu0 + (mass - 1.0) / slope

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        a1 = self.alpha - 1.0
        mu = self.threshold(logits)
        return self._power(torch.clamp(a1 * (logits - mu), min=0), 1.0 / a1)

    def omega(self, p: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return (self._power(torch.clamp(p, min=0), a).sum(-1) - 1.0) / (a * (a - 1.0))

    def omega_conj(self, logits: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        mu = self.threshold(logits)
        u = torch.clamp((a - 1.0) * (logits - mu), min=0)
        return self._power(u, a / (a - 1.0)).sum(-1) / a + mu.squeeze(-1) + 1.0 / (a * (a - 1.0))


class SquaredLoss(FenchelYoungLoss):
    """Ω(p) = ½‖p‖² on R^C: Ω*(f) = ½‖f‖², p = f, d_Ω(q, f) = ½‖f − q‖².

    Predictions are not constrained to the simplex, so targets may be any finite vectors.
    """

    name = "squared"
    simplex = False

    def omega(self, p: torch.Tensor) -> torch.Tensor:
        return 0.5 * (p * p).sum(-1)

    def omega_conj(self, logits: torch.Tensor) -> torch.Tensor:
        return 0.5 * (logits * logits).sum(-1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


_REGISTRY: dict[str, Callable[..., FenchelYoungLoss]] = {
    "softmax": SoftmaxLoss,
    "sparsemax": lambda **kw: TsallisLoss(2.0, **kw),
    "entmax15": lambda **kw: TsallisLoss(1.5, **kw),
    "entmax": TsallisLoss,
    "squared": SquaredLoss,
}
_ALIASES = {"cross_entropy": "softmax", "cross-entropy": "softmax", "ce": "softmax", "entmax-1.5": "entmax15"}


def available_losses() -> list[str]:
    """Names accepted by :func:`get_loss`."""
    return list(_REGISTRY)


def get_loss(name: str | FenchelYoungLoss, **kwargs) -> FenchelYoungLoss:
    """Build a Fenchel-Young loss by name.

    Args:
        name: one of ``softmax``, ``sparsemax``, ``entmax15``, ``entmax`` (takes ``alpha``),
            ``squared``; or an existing loss instance, returned unchanged.
        **kwargs: ``label_smoothing`` for every loss; ``alpha`` and ``n_iter`` for ``entmax``.

    Example:
        >>> loss = get_loss("entmax", alpha=1.5)
        >>> loss(torch.zeros(2, 3), torch.tensor([0, 2]))
    """
    if isinstance(name, FenchelYoungLoss):
        if kwargs:
            raise ValueError(f"get_loss: options {sorted(kwargs)} cannot be applied to an existing loss instance.")
        return name
    if not isinstance(name, str):
        raise TypeError(f"loss: expected a loss name (str) or a FenchelYoungLoss, got {type(name).__name__} instead.")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"loss: unknown name {name!r}; expected one of {available_losses()}.")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as exc:
        raise TypeError(f"loss {name!r}: invalid options {sorted(kwargs)} ({exc}).") from None
