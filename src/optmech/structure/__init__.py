"""The structural matrix A_x = J_x J_xᵀ (C×C per sample), J_x = ∂f_θ(x)/∂θ (paper Sec. 4.3).

A_x is the per-sample block of the empirical neural tangent kernel. It is computed exactly for a
whole batch by one of several methods, named in :class:`EngineMethod` with their cost regime; the
fast one, ``gram``, is a loop over a registry of rules, one per module kind (:mod:`.rules`).
The engine knows nothing of losses.

Public names: :func:`structural_matrix` (returns a :class:`StructuralMatrix`), :class:`EngineMethod`,
:class:`EngineOptions`, :class:`RouteReport` / :class:`Route`, :func:`clear_cache` / :func:`model_cache`, :class:`ForwardCapture`
(the training-step capture), :class:`GenericPathWarning`, and the helpers the probe shares
(:func:`trainable_parameters`, :func:`prepare_inputs`, :func:`check_outputs`, :func:`probing`,
:func:`full_float32`, :func:`tf32_enabled`, :func:`jacobian_rows_loop`).
"""

from __future__ import annotations

from ._context import check_outputs, full_float32, prepare_inputs, probing, tf32_enabled, trainable_parameters
from .cache import ModelCache, clear_cache, model_cache
from .capture import ForwardCapture
from .engine import EngineMethod, StructuralMatrix, available_methods, structural_matrix
from .loop import jacobian_rows_loop
from .options import EngineOptions
from .route import GenericPathWarning, Route, RouteReport, SlowPathWarning

__all__ = [
    "EngineMethod", "EngineOptions", "StructuralMatrix", "Route", "RouteReport", "structural_matrix", "available_methods",
    "clear_cache", "model_cache", "ModelCache", "ForwardCapture", "GenericPathWarning", "SlowPathWarning", "jacobian_rows_loop", "trainable_parameters", "prepare_inputs",
    "check_outputs", "probing", "full_float32", "tf32_enabled",
]
