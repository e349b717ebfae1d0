"""A narrow logits layer as a factor of A_x: A_x = s_x·I_C + Q M_x Qᵀ when f = h Wᵀ + b and h has width d < C.

For logits f = h Wᵀ + b (W: C × d) every other parameter's Jacobian row for class c is W[c]·∂h/∂θ, so the
share of every layer below h is W J_h J_hᵀ Wᵀ, of rank at most d. With the reduced QR factorisation W = Q R
(Q: C × d with orthonormal columns, R: d × d, in float64, recomputed when W's values change) and
M_x = R J_h J_hᵀ Rᵀ:

    A_x = s_x·I_C + Q M_x Qᵀ,     s_x = ‖h_x‖² + 1[bias] (the logits layer's own share, in closed form).

So the backward passes start at h with the d cotangents R[j] (:mod:`.passes`) instead of the C cotangents
W[c], every layer below contracts a d × d share instead of a C × C one, and one (C × d)(d × d)(d × C) product
per sample forms A. The spectrum follows without a C × C eigensolver: A_x has the eigenvalue s_x at least
C − d times, and its others are s_x + eig(M_x), so λmin(A_x) = s_x and λmax(A_x) = s_x + λmax(M_x)
(:func:`optmech.metrics.measure_from` takes them from :class:`LowRankHead`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import check_finite_structure
from .accumulator import Accumulator, _Wrapped

__all__ = ["HeadBasis", "ThroughHead", "LowRankHead", "head_basis", "factoring_pays", "expand"]


@dataclasses.dataclass(frozen=True)
class HeadBasis:
    """W = Q R for the logits layer's weight W (C × d), d < C: ``Q`` (C × d) and ``R`` (d × d) in W's dtype,
    from a float64 QR; ``Q64`` keeps Q in float64 for the probe's spectrum."""

    Q: torch.Tensor
    R: torch.Tensor
    Q64: torch.Tensor

    @property
    def rank(self) -> int:
        """d: the number of backward cotangents and the size of each M_x."""
        return self.R.shape[0]

    def expand(self, core: torch.Tensor, into: torch.Tensor | None = None, out: torch.Tensor | None = None,
               work: torch.Tensor | None = None) -> torch.Tensor:
        """Q M Qᵀ for M (n, d, d) (:func:`expand`)."""
        return expand(self.Q, core, into=into, out=out, work=work)


def expand(Q: torch.Tensor, core: torch.Tensor, *, into: torch.Tensor | None = None,
           out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    """Q M Qᵀ for Q (C, d) and M (n, d, d): a new (n, C, C) tensor, added into ``into``, or written over ``out``;
    P = Q M (n, C, d) is written into ``work`` when given (a kept buffer: no page faults on a fresh one)."""
    n, d, C = core.shape[0], core.shape[1], Q.shape[0]
    P = torch.bmm(Q.expand(n, C, d), core, out=work)
    Qt = Q.T.expand(n, d, C)
    if into is not None:
        return into.baddbmm_(P, Qt)
    return torch.bmm(P, Qt, out=out)


def factoring_pays(d: int, n_classes: int, width: int) -> bool:
    """Whether a dense A costs fewer multiply-adds through the factors: d²·w + C·d² + C²·d < C²·w per sample, with w
    the summed per-sample size of the outputs of the layers below the logits (each layer's contraction costs about
    C² per unit of its output: exactly C²·d_out for a vector Linear) and C·d² + C²·d the product Q M Qᵀ. The d
    backward passes instead of C are a further saving, not counted."""
    C = n_classes
    return d * d * width + C * d * d + C * C * d < C * C * width


def head_basis(W: torch.Tensor, n_classes: int, dense: bool, width: int, cache=None) -> HeadBasis | None:
    """The :class:`HeadBasis` of a logits weight W (C × d) when d < C and, if A is to be formed (``dense``), forming
    it through the factors is cheaper (:func:`factoring_pays`); else None. With the model's :class:`.cache.ModelCache`
    the QR of a weight equal to the last call's (compared value by value: C·d reads against a QR's C·d²) is reused."""
    C, d = W.shape
    if d >= C or C != n_classes or (dense and not factoring_pays(d, C, width)):
        return None
    kept = None if cache is None else cache.head_basis
    if kept is not None and kept[0].shape == W.shape and kept[0].dtype == W.dtype and kept[0].device == W.device \
            and torch.equal(kept[0], W):
        return kept[1]
    Q64, R64 = torch.linalg.qr(W.detach().to(torch.float64), mode="reduced")
    basis = HeadBasis(Q64.to(W.dtype), R64.to(W.dtype).contiguous(), Q64)
    if cache is not None:
        cache.head_basis = (W.detach().clone(), basis)
    return basis


class ThroughHead(_Wrapped):
    """A layer below a narrow logits layer: its inner accumulator was fed the d cotangents R[j] and holds
    M^(l) (n, d, d); its share of A is Q M^(l) Qᵀ. :meth:`.capture.ForwardCapture.add_parts` sums the layers'
    M^(l) first and expands once."""

    def __init__(self, inner: Accumulator, head: HeadBasis, n_classes: int) -> None:
        super().__init__(inner)
        self.head, self.n_classes, self.count = head, n_classes, n_classes

    def core(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """M^(l) (n, d, d), or added into ``into``."""
        return self.inner.contract(into)

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.expand(self.inner.result(), into)


@dataclasses.dataclass(frozen=True)
class LowRankHead:
    """A_x = s_x·I_C + Q M_x Qᵀ exactly (see the module's docstring), for every sample of a batch.

    Attributes:
        scale: s_x (batch,), in the model's dtype.
        basis: Q (C, d), orthonormal columns, float64.
        core: M_x (batch, d, d), in the model's dtype, symmetric positive semi-definite.
    """

    scale: torch.Tensor
    basis: torch.Tensor
    core: torch.Tensor

    def check_finite(self, logits=None, formed: torch.Tensor | None = None) -> None:
        """:func:`optmech.errors.check_finite_structure` on the factors (s_x added to M_x: an overflow of either),
        and on A formed from them (``formed``) only where the factors do not bound it.

        With m = max(|M_x|, |s_x|) finite, every entry of Q M_x Qᵀ and of the products forming it is at most
        ‖M_x‖₂ ≤ d·m in size (Q's rows have norm ≤ 1), so A is finite when (d + 1)·m is well inside the dtype's
        range: then the B·C² values of A need no pass of their own.
        """
        if self.core.numel() == 0:
            return
        low, high = torch.aminmax(self.core)  # one pass, no |M| temporary; NaN propagates
        peak = torch.stack([-low, high, self.scale.abs().amax()]).amax().item()
        if not math.isfinite(peak):
            check_finite_structure(self.core + self.scale[:, None, None], logits)
        elif formed is not None and (self.rank + 1) * peak > torch.finfo(formed.dtype).max / 4:
            check_finite_structure(formed, logits)

    @classmethod
    def from_factors(cls, factors: dict) -> LowRankHead | None:
        """The head from the ``factors`` dict that :meth:`.capture.ForwardCapture.add_parts` filled, or None."""
        if "core" not in factors or factors.get("invalid"):
            return None
        return cls(factors["scale"], factors["basis"], factors["core"])

    @staticmethod
    def fill_skipped(factors: dict, total: torch.Tensor) -> None:
        """Form in ``total`` the rows :meth:`.capture.ForwardCapture.add_parts` left to the factors (``dense=False``)."""
        Q = factors["basis"].to(total.dtype)
        for rows in factors.pop("skipped", []):
            expand(Q, factors["core"][rows], out=total[rows])
            total[rows].diagonal(dim1=-2, dim2=-1).add_(factors["scale"][rows, None].to(total.dtype))

    def form(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A (batch, C, C) formed from the factors, in ``dtype`` (default the core's: the model's)."""
        dtype = self.core.dtype if dtype is None else dtype
        C = self.basis.shape[0]
        total = torch.empty(self.core.shape[0], C, C, dtype=dtype, device=self.core.device)
        whole = {"basis": self.basis, "core": self.core.to(dtype), "scale": self.scale, "skipped": [slice(None)]}
        self.fill_skipped(whole, total)
        return total

    @property
    def rank(self) -> int:
        return self.basis.shape[1]
