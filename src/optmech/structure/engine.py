"""The engine's entry point: :func:`structural_matrix` dispatches to a method and returns one result type."""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
import warnings

import torch
from torch import nn

from ..errors import check_finite_structure
from ._context import check_outputs, forward_failure, outside_stacklevel, prepare_inputs, probing, trainable_parameters
from .cache import ModelCache, model_cache
from .capture import ForwardCapture
from .gram import gram_capture, structural_matrix_gram
from .head import LowRankHead
from .jacobian import structural_matrix_jacobian
from .loop import structural_matrix_loop
from .options import EngineOptions
from .route import Route, RouteReport
from .signature import OutputSelector, bound

__all__ = ["EngineMethod", "StructuralMatrix", "structural_matrix", "available_methods"]

log = logging.getLogger("optmech.structure")


class EngineMethod(str, enum.Enum):
    """How A_x is computed. All methods are exact; they differ in cost.

    - ``LOOP``: the oracle. One ``torch.autograd.grad`` per sample and class: B forwards, B·C
      backwards, memory C·|θ|. Works for any module, including ones torch.func cannot transform.
    - ``JACOBIAN``: ``torch.func`` vmap∘jacrev over parameters, then Σ_t J_t J_tᵀ. Vectorised
      C backward passes per sample; memory chunk·C·|θ| (chunked to a fixed budget).
    - ``GRAM``: layer-wise (DESIGN §3, :mod:`.gram`): one forward with the rules' hooks, C backward passes
      (or one vmapped pass) to every fast layer's output, and per layer the contraction its rule gives
      (:mod:`.rules`); parameters no rule takes go through ``JACOBIAN`` restricted to them.
      Memory O(B·C·activations), independent of |θ| for the fast layers.
    - ``AUTO``: on the CPU, ``GRAM`` when a module rule claims every parameter, ``JACOBIAN`` when none
      claims any; otherwise the faster of the two, timed on the first call for a model and call signature
      and kept in the model's cache (on the CPU ``JACOBIAN`` is not timed when ``GRAM``'s forward left no
      parameter generic). Falls back to ``LOOP`` (with a warning) when the forward cannot be transformed.

    Every method is checked against ``LOOP`` by the tests.
    """

    LOOP = "loop"
    JACOBIAN = "jacobian"
    GRAM = "gram"
    AUTO = "auto"


def available_methods() -> list[str]:
    return [m.value for m in EngineMethod]


@dataclasses.dataclass(frozen=True)
class StructuralMatrix:
    """What :func:`structural_matrix` returns, for every method.

    Attributes:
        A: (batch, C, C) in the model's dtype, symmetric positive semi-definite, trace A_x = ‖J_x‖_F² (None only
            with ``dense=False``, when ``head`` holds it).
        method: the method that ran (``"gram"``, ``"jacobian"`` or ``"loop"``; ``auto`` resolved).
        route: per parameter, the rule and contraction form, or the generic path and why (:class:`.route.RouteReport`).
        per_layer: with ``per_layer=True``, {module path: (batch, C, C)} with A = Σ of them; else None.
        logits: (batch, C), detached, when the method ran a forward over the whole batch in eval mode (``gram``);
            else None.
        head: the factors of A_x = s_x·I + Q M_x Qᵀ (:class:`.head.LowRankHead`) when ``gram`` ran with the logits
            a Linear layer narrower than C and every parameter on the fast path (``EngineOptions.factor_head``);
            else None. They give λmin and λmax of each A_x without a C × C eigensolver.
    """

    A: torch.Tensor | None
    method: str
    route: RouteReport
    per_layer: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    head: LowRankHead | None = None


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
    options: EngineOptions | None = None,
    chunk_size: int | None = None,
    per_layer: bool = False,
    output: OutputSelector = None,
    dense: bool = True,
) -> StructuralMatrix:
    """Per-sample structural matrices A_x = J_x J_xᵀ for a batch (paper Sec. 4.3).

    J_x = ∂f_θ(x)/∂θ ∈ R^{C×|θ|} over every parameter with ``requires_grad=True`` (tied weights
    once, with their total derivative; unused parameters contribute zero columns). Computed with
    eval semantics (dropout off, BatchNorm on running statistics), also inside ``torch.inference_mode``;
    the model's modes, buffers, ``.grad`` fields and the RNG state are left as they were.

    Args:
        model: an ``nn.Module`` mapping inputs (batch, ...) to logits (batch, classes), or to an output holding them.
        inputs: a tensor (batch, ...), a tuple of tensors (the forward's positional inputs) or a mapping of them
            (keyword inputs, e.g. ``{"input_ids": ..., "attention_mask": ...}``), each split along dimension 0.
            Floating inputs are cast to the model's dtype, and every tensor to its device.
        method: ``"auto"``, ``"gram"``, ``"jacobian"`` or ``"loop"`` (see :class:`EngineMethod`).
        options: how ``gram`` may run (:class:`.options.EngineOptions`; default ``EngineOptions()``).
        chunk_size: samples per vectorised chunk (default: the whole batch for ``gram``, 256 MiB of Jacobians
            for ``jacobian``).
        per_layer: also return the per-module shares (a module's share is J_l J_lᵀ over its own parameters;
            tied tensors count once, with the module that registers them).
        output: where the logits are in the model's output (:func:`.signature.select_logits`): by default the
            output itself (a tensor), its ``.logits`` (Hugging Face), its ``"logits"`` key or its first item;
            else a key or attribute name, an index, or a function of the output.
        dense: False: when the logits are a Linear layer narrower than C and its factors hold A whole
            (A_x = s_x·I + Q M_x Qᵀ, the result's ``head``), A itself is not formed and ``A`` is None; the factors
            give its spectrum at a d × d cost (the probe's route; docs/engine.md, "Cost in C").

    Returns:
        :class:`StructuralMatrix` with ``A`` (batch, classes, classes), the method that ran, the route report,
        and the per-layer shares when asked.

    Raises:
        ValueError: inputs the model's forward cannot take (named as such), non-finite logits
            (:class:`~optmech.errors.NonFiniteLogitsError`) or an overflow of A
            (:class:`~optmech.errors.NonFiniteStructureError`), parameters on the meta device.

    Example:
        >>> result = structural_matrix(nn.Linear(4, 3), torch.randn(8, 4))
        >>> result.A.shape, result.method
        (torch.Size([8, 3, 3]), 'gram')
    """
    chosen = _resolve(method)
    options = EngineOptions() if options is None else options
    if not isinstance(options, EngineOptions):
        raise TypeError(f"options: expected an optmech.EngineOptions, got {type(options).__name__} instead.")
    named = trainable_parameters(model)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r} instead.")
    batch = prepare_inputs(model, inputs)
    cache = model_cache(model)
    shown = None if isinstance(batch, torch.Tensor) else batch.describe()
    # the model as a function of one tensor returning logits (a structured batch: of the samples' indices)
    with probing(model), bound(model, batch, output, cache=cache) as x:
        try:
            result = _run(model, x, named, chosen, options, cache, chunk_size, per_layer, dense=dense)
        except Exception as err:
            failure = forward_failure(model, x, err, shown)
            if failure is not None:
                raise failure from err
            if chosen is not EngineMethod.AUTO or not isinstance(err, RuntimeError):
                raise
            # a forward torch.func cannot transform: the exact fallback
            warnings.warn(
                f"structural_matrix: the 'auto' method failed on this model ({str(err).splitlines()[0]}); "
                "falling back to the exact but slower 'loop' method.",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
            result = _run(model, x, named, EngineMethod.LOOP, options, cache, chunk_size, per_layer)

        def logits() -> torch.Tensor:
            if result.logits is not None:
                return result.logits
            with torch.no_grad():
                return model(x)

        if result.head is not None:  # A, if formed, from these factors
            result.head.check_finite(logits, formed=result.A)
        else:
            check_finite_structure(result.A, logits)
    log.debug("structural_matrix: method=%s batch=%d", result.method, x.shape[0])
    return result


def _run(model, x, named, chosen: EngineMethod, options, cache: ModelCache, chunk_size, per_layer,
         capture: ForwardCapture | None = None, dense: bool = True) -> StructuralMatrix:
    groups: dict[str, torch.Tensor] | None = {} if per_layer else None
    if chosen is EngineMethod.AUTO:
        capture = gram_capture(model, named, options, cache, x.device)  # its claims decide; gram then runs with it
        ran, key = _auto_choice(capture, x, named, options, cache, chunk_size, per_layer)
        if key is not None:  # first call of this kind: time both exact methods, keep the faster
            return _auto_trial(model, x, named, options, cache, chunk_size, per_layer, key, capture, dense)
        chosen = ran
    logits: list[torch.Tensor] = []
    head = None
    if chosen is EngineMethod.GRAM:
        factors: dict = {}
        A, routes = structural_matrix_gram(model, x, named, options=options, cache=cache, chunk_size=chunk_size,
                                           groups=groups, logits=logits, capture=capture, factors=factors, dense=dense)
        route = RouteReport("gram", list(routes.values()))
        head = LowRankHead.from_factors(factors)
    else:
        with torch.no_grad():
            n_classes = check_outputs(model(x[:1]), 1).shape[1]
        if chosen is EngineMethod.JACOBIAN:
            A = structural_matrix_jacobian(model, x, named, n_classes=n_classes, chunk_size=chunk_size, groups=groups, cache=cache)
        else:
            A = structural_matrix_loop(model, x, named, groups)
        route = RouteReport(chosen.value, [Route(name, None, chosen.value) for name, _ in named])
    joined = None if not logits else logits[0] if len(logits) == 1 else torch.cat(logits)
    return StructuralMatrix(A, chosen.value, route, groups, joined, head)


def _auto_choice(capture: ForwardCapture, x, named, options, cache: ModelCache, chunk_size, per_layer) -> tuple[EngineMethod, tuple | None]:
    """``auto``'s method and, when it must first be measured, the cache key for :func:`_auto_trial`.

    No module rule claims a parameter: ``jacobian``. Every parameter claimed, on the CPU: ``gram`` (its
    arithmetic is a subset of ``jacobian``'s, and on the CPU arithmetic decides). Otherwise ``gram`` = those
    layers + ``jacobian`` on the other parameters, which can cost more than ``jacobian`` alone (that backward
    still runs through the whole network), and on a GPU small models are bound by kernel launches, where
    ``jacobian``'s few vmapped kernels can beat ``gram``'s many small ones: the first call with a given model
    and call signature times both and keeps the faster (docs/engine.md has the measurements).
    """
    module_claims = [c for c in capture.claims if c.module is not None]
    if not module_claims:
        return EngineMethod.JACOBIAN, None
    if not capture.unclaimed and x.device.type == "cpu":
        return EngineMethod.GRAM, None
    key = (tuple(x.shape), x.dtype, x.device, tuple(n for n, _ in named), chunk_size, per_layer, options)
    known = cache.auto.get(key)
    return (EngineMethod(known), None) if known is not None else (EngineMethod.GRAM, key)


def _auto_trial(model, x, named, options, cache: ModelCache, chunk_size, per_layer, key, capture, dense) -> StructuralMatrix:
    """Run ``gram`` and ``jacobian``, timed; remember the faster in the model's cache; return its result.

    On the CPU, when ``gram``'s forward left no parameter generic (a rule took parameters used directly, or
    attention, found only during a forward), ``jacobian`` is not run: ``gram``'s arithmetic is then a subset
    of its. On a GPU each runs three times with the device synchronised around each run, and the faster of
    the last two counts: the first also pays for kernel selection and allocations.
    """
    cuda = x.device.type == "cuda"
    results, seconds = {}, {}
    for method in (EngineMethod.GRAM, EngineMethod.JACOBIAN):
        if method is EngineMethod.JACOBIAN and not cuda and not results[EngineMethod.GRAM].route.generic():
            cache.auto[key] = EngineMethod.GRAM.value
            log.info("structural_matrix(method='auto'): gram took every parameter on its fast path (%.1f ms on batch %s); "
                     "using gram for this model and shape", 1e3 * seconds[EngineMethod.GRAM], tuple(x.shape))
            return results[EngineMethod.GRAM]
        runs = []
        for _ in range(3 if cuda else 1):
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            results[method] = _run(model, x, named, method, options, cache, chunk_size, per_layer, capture, dense)
            if cuda:
                torch.cuda.synchronize(x.device)
            runs.append(time.perf_counter() - start)
        seconds[method] = min(runs[1:]) if cuda else runs[0]
    best = min(seconds, key=seconds.get)
    cache.auto[key] = best.value
    log.info(
        "structural_matrix(method='auto'): measured gram %.1f ms, jacobian %.1f ms on batch %s; using %s for this model and shape",
        1e3 * seconds[EngineMethod.GRAM], 1e3 * seconds[EngineMethod.JACOBIAN], tuple(x.shape), best.value,
    )
    chosen = results[best]
    if best is EngineMethod.JACOBIAN:  # gram's forward gave the logits of the same eval forward
        chosen = dataclasses.replace(chosen, logits=results[EngineMethod.GRAM].logits)
    return chosen
