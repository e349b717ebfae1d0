"""The structural matrix A_x = J_x J_xᵀ (C×C per sample), J_x = ∂f_θ(x)/∂θ (paper Sec. 4.3).

A_x is the per-sample block of the empirical neural tangent kernel. It is computed exactly for a
whole batch by one of several methods, named in :class:`EngineMethod` with their cost regime.
The engine knows nothing of losses.
"""

from __future__ import annotations

import enum
import logging
import warnings
from typing import Callable

import torch
from torch import nn

from ._context import check_outputs, prepare_inputs, probing, trainable_parameters
from .gram import plan_layers, structural_matrix_gram
from .jacobian import structural_matrix_jacobian
from .loop import jacobian_rows_loop, structural_matrix_loop

__all__ = ["EngineMethod", "structural_matrix", "compute_structural_matrix", "available_methods", "jacobian_rows_loop"]

log = logging.getLogger("optmech.structure")


class EngineMethod(str, enum.Enum):
    """How A_x is computed. All methods are exact; they differ in cost.

    - ``LOOP``: the oracle. One ``torch.autograd.grad`` per sample and class: B forwards, B·C
      backwards, memory C·|θ|. Works for any module, including ones torch.func cannot transform.
    - ``JACOBIAN``: ``torch.func`` vmap∘jacrev over parameters, then Σ_t J_t J_tᵀ. Vectorised
      C backward passes per sample; memory chunk·C·|θ| (chunked to a fixed budget).
    - ``GRAM``: layer-wise (DESIGN §3). One forward with hooks, C batched backward passes for
      B_c = ∂f_c/∂z at every Linear/Conv1d/Conv2d output, then per layer the cheaper of the ghost
      Gram (Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'})) or the materialised per-class weight gradient.
      Parameters of other modules, tied or reused weights go through ``JACOBIAN`` restricted to
      them. Memory O(B·C·activations), independent of |θ| for the fast layers.
    - ``AUTO``: ``GRAM`` when the model has at least one Linear/Conv layer, else ``JACOBIAN``;
      falls back to ``LOOP`` (with a warning) when the forward cannot be vmapped.

    Every method registered in ``_METHODS`` is checked against ``LOOP`` by the tests.
    """

    LOOP = "loop"
    JACOBIAN = "jacobian"
    GRAM = "gram"
    AUTO = "auto"


def available_methods() -> list[str]:
    return [m.value for m in EngineMethod]


def _resolve(method: str | EngineMethod) -> EngineMethod:
    if isinstance(method, EngineMethod):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method: expected one of {available_methods()} (str), got {type(method).__name__} instead.")
    try:
        return EngineMethod(method.lower())
    except ValueError:
        raise ValueError(f"method: unknown engine method {method!r}; expected one of {available_methods()}.") from None


def structural_matrix(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    method: str | EngineMethod = "auto",
    chunk_size: int | None = None,
    return_method: bool = False,
    per_layer: bool = False,
) -> torch.Tensor | tuple:
    """Per-sample structural matrices A_x = J_x J_xᵀ for a batch.

    J_x = ∂f_θ(x)/∂θ ∈ R^{C×|θ|} over every parameter with ``requires_grad=True`` (tied weights
    once, with their total derivative; unused parameters contribute zero columns). Computed with
    eval semantics (dropout off, BatchNorm on running statistics); the model's modes, buffers,
    ``.grad`` fields and the RNG state are left as they were.

    Args:
        model: an ``nn.Module`` mapping inputs (batch, ...) to logits (batch, classes).
        inputs: (batch, ...). Floating inputs are cast to the model's dtype and device.
        method: ``"auto"``, ``"gram"``, ``"jacobian"`` or ``"loop"`` (see :class:`EngineMethod`).
        chunk_size: samples per vectorised chunk for ``jacobian`` (default: fit 256 MiB).
        return_method: also return the name of the method that actually ran.
        per_layer: also return the per-module shares {module path: (batch, C, C)}, A = Σ_l A^(l)
            (a module's share is J_l J_lᵀ over its own parameters; tied tensors count once, with
            the module that registers them).

    Returns:
        A of shape (batch, classes, classes) in the model's dtype: symmetric positive
        semi-definite, trace A_x = ‖J_x‖_F². With ``per_layer`` and/or ``return_method`` a tuple
        ``(A, [per_layer dict], [method name])`` in that order.

    Example:
        >>> A = structural_matrix(nn.Linear(4, 3), torch.randn(8, 4))   # (8, 3, 3)
    """
    A, groups, ran, _ = compute_structural_matrix(model, inputs, method=method, chunk_size=chunk_size, per_layer=per_layer)
    out = (A,) + ((groups,) if per_layer else ()) + ((ran,) if return_method else ())
    return out if len(out) > 1 else A


def compute_structural_matrix(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    method: str | EngineMethod = "auto",
    chunk_size: int | None = None,
    per_layer: bool = False,
) -> tuple[torch.Tensor, dict | None, str, torch.Tensor | None]:
    """:func:`structural_matrix` for callers that also want the logits: ``(A, groups, method, logits)``.

    ``logits`` (batch, C), detached, come from the engine's own forward when the method that ran
    has one over the whole batch under eval semantics (``gram``); otherwise None. ``groups`` is None
    unless ``per_layer``.
    """
    chosen = _resolve(method)
    named = trainable_parameters(model)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r} instead.")
    x = prepare_inputs(model, inputs)
    logits: list[torch.Tensor] | None = []
    with probing(model):
        ran = chosen
        if chosen is EngineMethod.AUTO:
            ran = EngineMethod.GRAM if plan_layers(model, named)[0] else EngineMethod.JACOBIAN
        n_classes = None  # gram reads C from its own forward; the others need it first
        if ran is not EngineMethod.GRAM:
            with torch.no_grad():
                n_classes = check_outputs(model(x[:1]), 1).shape[1]
        groups: dict[str, torch.Tensor] | None = {} if per_layer else None
        if chosen is EngineMethod.AUTO:
            try:
                A = _METHODS[ran](model, x, named, n_classes, chunk_size, groups, logits)
            except RuntimeError as exc:  # a forward torch.func cannot transform: exact fallback
                warnings.warn(
                    f"structural_matrix: the '{ran.value}' method failed on this model ({str(exc).splitlines()[0]}); "
                    "falling back to the exact but slower 'loop' method.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                groups = {} if per_layer else None
                A = structural_matrix_loop(model, x, named, groups)
                ran = EngineMethod.LOOP
        else:
            A = _METHODS[chosen](model, x, named, n_classes, chunk_size, groups, logits)
    log.debug("structural_matrix: method=%s batch=%d classes=%d", ran.value, x.shape[0], A.shape[1])
    return A, groups, ran.value, (torch.cat(logits) if ran is EngineMethod.GRAM else None)


_METHODS: dict[EngineMethod, Callable[..., torch.Tensor]] = {
    EngineMethod.LOOP: lambda model, x, named, n_classes, chunk, groups, logits: structural_matrix_loop(model, x, named, groups),
    EngineMethod.JACOBIAN: lambda model, x, named, n_classes, chunk, groups, logits: structural_matrix_jacobian(
        model, x, named, n_classes=n_classes, chunk_size=chunk, groups=groups
    ),
    EngineMethod.GRAM: lambda model, x, named, n_classes, chunk, groups, logits: structural_matrix_gram(
        model, x, named, n_classes=n_classes, chunk_size=chunk, groups=groups, logits=logits
    ),
}
