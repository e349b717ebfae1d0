"""The per-layer Gram contractions of the ``gram`` method and their cost model (pure functions of tensors).

For a layer with per-sample inputs â (n, K, S: K features at S positions) and b_c = ∂f_c/∂z
(n, d_out, S) for each class c, the layer's share of A_x is

    A[c, c'] = Σ_{s,t} (â_s·â_t)(b_{c,s}·b_{c',t}) = ⟨G_c, G_c'⟩,   G_c = Σ_s b_{c,s} â_sᵀ

(DESIGN §3): the "ghost" form contracts through the S×S Gram Γ of the inputs, the "materialise"
form through the per-class weight gradients G_c. :func:`contraction_costs` counts the multiply-adds
of each, so that every layer takes the cheaper one.
"""

from __future__ import annotations

import torch

__all__ = ["contraction_costs", "materialised_gram", "ghost_gram", "class_major_gram", "gram_of", "squared_norms"]


def contraction_costs(n: int, C: int, S: int, K: int, d_out: int, bias: bool = True) -> dict[str, float]:
    """Multiply-adds of each way to contract one layer with S positions, K inputs, d_out outputs.

    - ``ghost``: Γ = a aᵀ (S×S), M = Γ b (S × C·d_out), A = b M: n·S²·K + n·S²·C·d_out + n·C²·S·d_out
    - ``materialise``: G_c = Σ_s b_{c,s} a_sᵀ, A = ⟨G_c, G_c'⟩: n·C·d_out·S·K + n·C²·d_out·K
    For S = 1 (a Linear layer on vectors) ghost is n·K + n·C²·d_out, the bias included (the +1 of ‖a‖² + 1).
    Otherwise the bias adds n·C·S·d_out + n·C²·d_out.
    """
    extra = (n * C * S * d_out + n * C * C * d_out) if bias else 0.0
    if S == 1:  # ghost: (‖a‖² + 1)·B Bᵀ, the bias inside the scale
        return {"ghost": float(n * K + n * C * C * d_out), "materialise": float(n * C * d_out * K + n * C * C * d_out * K + extra)}
    ghost = n * S * S * K + n * S * S * C * d_out + n * C * C * S * d_out
    materialise = n * C * d_out * S * K + n * C * C * d_out * K
    return {"ghost": float(ghost + extra), "materialise": float(materialise + extra)}


def squared_norms(a: torch.Tensor) -> torch.Tensor:
    """‖a_i‖² for the rows of a (n, K): one reduction, no (n, K) temporary (a fresh one costs its page faults)."""
    return torch.linalg.vector_norm(a, dim=-1).square_()


def gram_of(F_: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """F Fᵀ per sample for F (n, C, features): a new (n, C, C) tensor, or added into ``into`` in the same GEMM
    (one pass over the (n, C, C) result, which at large C is what the contraction's time goes to)."""
    if into is None:
        return F_ @ F_.transpose(1, 2)
    return into.baddbmm_(F_, F_.transpose(1, 2))


def materialised_gram(b: torch.Tensor, a: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """A = ⟨G_c, G_c'⟩ with G_c = b_c âᵀ, for b of shape (n, C, d, S) and patches â (n, K[+1], S): one batched GEMM.
    ``into``: add A into it (:func:`gram_of`)."""
    n, C, d, S = b.shape
    F_ = (b.reshape(n, C * d, S) @ a.transpose(1, 2)).reshape(n, C, -1)  # (n, C, (K+1)·d)
    return gram_of(F_, into)


def ghost_gram(b: torch.Tensor, gamma: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """A[c, c'] = Σ_{s,t} Γ[s, t] (b_{c,s}·b_{c',t}) for b of shape (n, C, d, S) and Γ (n, S, S): two batched GEMMs.
    ``into``: add A into it."""
    n, C, d, S = b.shape
    mixed = (b.reshape(n, C * d, S) @ gamma).reshape(n, C, d * S)
    if into is None:
        return b.reshape(n, C, d * S) @ mixed.transpose(1, 2)
    return into.baddbmm_(b.reshape(n, C, d * S), mixed.transpose(1, 2))


def class_major_gram(G: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """A[c, c'] = ⟨G_c, G_c'⟩ per sample for per-class gradients held class-major, G of shape (C, n, …): (n, C, C).
    ``into``: add A into it."""
    C, n = G.shape[:2]
    F_ = G.reshape(C, n, -1).transpose(0, 1)  # (n, C, features)
    return gram_of(F_, into)
