"""The structural matrix A_x = J_x J_xᵀ (C×C per sample), J_x = ∂f_θ(x)/∂θ (paper Sec. 4.3).

A_x is the per-sample block of the empirical neural tangent kernel. It is computed exactly for a
whole batch by one of several methods, named in :class:`EngineMethod` with their cost regime.
The engine knows nothing of losses.
"""

from __future__ import annotations

import enum
import logging
import time
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from ._context import check_outputs, prepare_inputs, probing, trainable_parameters
from .attention import attention_plans
from .recurrent import recurrent_plans
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
      B_c = ∂f_c/∂z at every fast layer's output (one vmapped pass for all C on a GPU without
      convolutions, and on the CPU when no convolution backward is on the way and the layer
      outputs are small), then per Linear/Conv1d/Conv2d/Conv3d the cheaper of the
      ghost Gram (Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'})) or the materialised per-class weight
      gradient (on the CPU, a Conv2d feeding only [ReLU →] MaxPool2d: at the pool's output, over
      the selected positions), a grouped or depthwise convolution the same way as a batch of its
      groups; Embedding as a ghost Gram over token equality; ``nn.MultiheadAttention`` (self- or
      cross-attention) as its projections, Linear layers over positions (the call recomputed in steps that the
      backward passes reach, checked against the module's output); a parameter used directly (or a
      view of it: a slice, a reshape) and broadcast over the samples — added (a positional embedding,
      in place too), multiplied (a layer scale), or expanded (a class token, a learned query) — from ∂f/∂ of that op's result; the affine
      parameters of BatchNorm (running statistics), LayerNorm, RMSNorm and GroupNorm as
      Σ_positions b_c ⊙ x̂ and Σ_positions b_c.
      On the CPU the model runs on channels-last Conv2d outputs (faster convolution backward
      passes; a forward that cannot take them is rerun as given, from then on).
      Parameters of other modules, tied or reused weights go through ``JACOBIAN`` restricted to
      them; so, on the first call only, do layers whose output a later in-place op overwrites; so do
      Linear/LayerNorm/Embedding layers whose samples lie along no dimension that one backward pass
      can identify (a sequence-first layout is found and handled).
      Memory O(B·C·activations), independent of |θ| for the fast layers.
    - ``AUTO``: on the CPU, ``GRAM`` when every parameter sits in a fast layer, ``JACOBIAN`` when
      none does; otherwise — and on a GPU whenever some layer is fast, since there kernel launches
      rather than arithmetic decide small models — the faster of the two, timed on the first call
      for a model and input shape and remembered (logged at INFO). Falls back to ``LOOP`` (with a
      warning) when the forward cannot be vmapped.

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

    ``logits`` (batch, C), detached, come from ``gram``'s own forward under eval semantics when
    ``gram`` ran (alone or in ``auto``'s trial); otherwise None. ``groups`` is None
    unless ``per_layer``.
    """
    chosen = _resolve(method)
    named = trainable_parameters(model)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r} instead.")
    x = prepare_inputs(model, inputs)
    logits: list[torch.Tensor] | None = []
    with probing(model):
        ran, key = chosen, None
        if chosen is EngineMethod.AUTO:
            ran, key = _auto_choice(model, x, named, chunk_size, per_layer)
        n_classes = None  # gram reads C from its own forward; the others need it first
        if ran is not EngineMethod.GRAM:
            with torch.no_grad():
                n_classes = check_outputs(model(x[:1]), 1).shape[1]
        groups: dict[str, torch.Tensor] | None = {} if per_layer else None
        if chosen is EngineMethod.AUTO:
            try:
                if key is not None:  # first call of this kind: time both exact methods, keep the faster
                    A, groups, ran = _auto_trial(model, x, named, n_classes, chunk_size, per_layer, logits, key)
                else:
                    A = _METHODS[ran](model, x, named, n_classes, chunk_size, groups, logits)
            except RuntimeError as exc:  # a forward torch.func cannot transform: exact fallback
                warnings.warn(
                    f"structural_matrix: the '{'gram/jacobian' if key is not None else ran.value}' method failed on this "
                    f"model ({str(exc).splitlines()[0]}); "
                    "falling back to the exact but slower 'loop' method.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                groups = {} if per_layer else None
                logits.clear()  # a gram that failed part-way may have left some chunks' logits
                A = structural_matrix_loop(model, x, named, groups)
                ran = EngineMethod.LOOP
        else:
            A = _METHODS[chosen](model, x, named, n_classes, chunk_size, groups, logits)
    log.debug("structural_matrix: method=%s batch=%d classes=%d", ran.value, x.shape[0], A.shape[1])
    return A, groups, ran.value, (torch.cat(logits) if logits else None)


#: ``auto``'s measured choice per model and call signature (see :func:`_auto_choice`).
_AUTO_CHOICE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, EngineMethod]]" = weakref.WeakKeyDictionary()


def _auto_choice(model: nn.Module, x: torch.Tensor, named: list, chunk_size, per_layer: bool) -> tuple[EngineMethod, tuple | None]:
    """``auto``'s method and, when it must first be measured, the cache key for :func:`_auto_trial`.

    No fast layer (Linear, Conv, Embedding, norm, attention's projections): ``jacobian``. Every
    parameter in one, on the CPU: ``gram`` (its arithmetic is a subset of ``jacobian``'s, and on the CPU arithmetic decides).
    Otherwise ``gram`` = those layers + ``jacobian`` on the other parameters, which can cost more
    than ``jacobian`` alone (that backward still runs through the whole network), and on a GPU
    small models are bound by kernel launches, where ``jacobian``'s few vmapped kernels can beat
    ``gram``'s many small ones (on an H100, jacobian was 1.3–1.6× faster on the SNet models at
    batch 64 and 1.1–1.3× slower at batch 256; benchmarks/README.md): the first call with a given
    model, input shape and dtype times both and keeps the faster.
    """
    plans, rest = plan_layers(model, named)
    covered = {name for a in attention_plans(model, named, set(rest)) for name in a.params}
    covered |= {name for r in recurrent_plans(model, named, set(rest)) for name in r.params}
    rest = [name for name in rest if name not in covered]
    if not plans and not covered:
        return EngineMethod.JACOBIAN, None
    if not rest and x.device.type == "cpu":
        return EngineMethod.GRAM, None
    key = (tuple(x.shape), x.dtype, x.device, tuple(n for n, _ in named), chunk_size, per_layer)
    known = _AUTO_CHOICE.get(model, {}).get(key)
    return (known, None) if known is not None else (EngineMethod.GRAM, key)


def _auto_trial(model, x, named, n_classes, chunk_size, per_layer, logits, key) -> tuple[torch.Tensor, dict | None, EngineMethod]:
    """Run ``gram`` and ``jacobian``, timed; remember the faster; return its result.

    On the CPU, when ``gram``'s forward found every parameter a fast rule (parameters used directly,
    attention, found only during a forward), ``jacobian`` is not run: ``gram``'s arithmetic is then a
    subset of its, as when every parameter sits in a fast layer (:func:`_auto_choice`).

    On a GPU, where a call takes milliseconds, each runs three times with the device synchronised
    around each run, and the faster of the last two counts: the first also pays for kernel
    selection and allocations, and one run alone can meet a pause (a garbage collection, another
    process) as long as the difference between the methods.
    """
    results, seconds = {}, {}
    cuda = x.device.type == "cuda"
    generic: list[str] = []  # the parameters gram's forward left to the generic path
    for method in (EngineMethod.GRAM, EngineMethod.JACOBIAN):
        if method is EngineMethod.JACOBIAN and not cuda and not generic:
            _AUTO_CHOICE.setdefault(model, {})[key] = EngineMethod.GRAM
            log.info("structural_matrix(method='auto'): gram took every parameter on its fast path (%.1f ms on batch %s); "
                     "using gram for this model and shape", 1e3 * seconds[EngineMethod.GRAM], tuple(x.shape))
            return (*results[EngineMethod.GRAM], EngineMethod.GRAM)
        runs = []
        for _ in range(3 if cuda else 1):
            groups = {} if per_layer else None
            run_logits: list[torch.Tensor] | None = [] if method is EngineMethod.GRAM else None
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            extra = {"generic": generic} if method is EngineMethod.GRAM else {}
            if method is EngineMethod.GRAM:
                generic.clear()
            A = _METHODS[method](model, x, named, n_classes, chunk_size, groups, run_logits, **extra)
            if cuda:
                torch.cuda.synchronize(x.device)
            runs.append(time.perf_counter() - start)
        seconds[method] = min(runs[1:]) if cuda else runs[0]
        if run_logits is not None and logits is not None:
            logits.extend(run_logits)
        results[method], n_classes = (A, groups), A.shape[1]  # gram runs first and tells jacobian C
    best = min(seconds, key=seconds.get)
    _AUTO_CHOICE.setdefault(model, {})[key] = best
    log.info(
        "structural_matrix(method='auto'): measured gram %.1f ms, jacobian %.1f ms on batch %s; using %s for this model and shape",
        1e3 * seconds[EngineMethod.GRAM], 1e3 * seconds[EngineMethod.JACOBIAN], tuple(x.shape), best.value,
    )
    return (*results[best], best)


_METHODS: dict[EngineMethod, Callable[..., torch.Tensor]] = {
    EngineMethod.LOOP: lambda model, x, named, n_classes, chunk, groups, logits: structural_matrix_loop(model, x, named, groups),
    EngineMethod.JACOBIAN: lambda model, x, named, n_classes, chunk, groups, logits: structural_matrix_jacobian(
        model, x, named, n_classes=n_classes, chunk_size=chunk, groups=groups
    ),
    EngineMethod.GRAM: lambda model, x, named, n_classes, chunk, groups, logits, generic=None: structural_matrix_gram(
        model, x, named, n_classes=n_classes, chunk_size=chunk, groups=groups, logits=logits, generic=generic
    ),
}
