"""A_x layer by layer: per-layer Gram contractions of inputs and backpropagated logit-Jacobians.

For a layer z = W a + b with per-sample input a and B_c = ∂f_c/∂z (one row per class c), the layer's
parameters contribute to A_x (DESIGN §3; Opacus' "ghost norm" generalised to C outputs) by the formula
of its rule, one file each in :mod:`.rules`:

- Linear, a of shape (d_in,):      A[c, c'] += (‖a‖² + 1)·(B_c · B_c')                 (:mod:`.rules.linear`)
- Linear over positions t (a_t):   A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})
- Conv (unfolded patches a_s):     A[c, c'] += Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'}) + bias term  (:mod:`.rules.conv`)
- Embedding (token ids):           A[c, c'] += Σ_{t,t'} [tok_t = tok_t'](b_{c,t}·b_{c',t'})   (:mod:`.rules.embedding`)
- norms, z = x̂ ⊙ γ + β:            A[c, c'] += ⟨Σ_pos b_c ⊙ x̂, Σ_pos b_c' ⊙ x̂⟩ + ⟨Σ_pos b_c, Σ_pos b_c'⟩  (:mod:`.rules.norm`)
- MultiheadAttention, LSTM/GRU/RNN: their projections as Linear layers over positions, the call recomputed
  in steps the backward passes reach (:mod:`.rules.attention`, :mod:`.rules.recurrent`)
- a parameter used directly, broadcast over the samples: A[c, c'] += ⟨g_c, g_c'⟩, g_c = Σ_broadcast b_c [⊙ h]
  (:mod:`.rules.direct`)

Each position-summed term is computed either in "ghost" form (the S×S Gram of the patches) or by
materialising the per-sample, per-class weight gradient G_c = Σ_s b_{c,s} a_sᵀ and taking ⟨G_c, G_c'⟩,
whichever :func:`.contract.contraction_costs` says is cheaper for that layer.

All B_c come from one forward with the rules' hooks (:mod:`.capture`) and C backward passes of
Σ_b f_c(x_b) (samples are independent under eval semantics, so the summed backward gives every
per-sample row), or one vmapped backward of the C cotangents where that is faster (:mod:`.passes`).
Parameters no rule takes — other module types, tied or reused weights, weights used outside their module —
are handed to the ``torch.func`` path restricted to those parameters; the two contributions are summed,
and the route report says which parameter went where and why. Never an inexact answer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ._context import check_outputs
from .cache import ModelCache
from .capture import ForwardCapture
from .head import LowRankHead
from .options import EngineOptions
from .route import Route

__all__ = ["structural_matrix_gram", "gram_capture"]

log = logging.getLogger("optmech.structure")


def gram_capture(model: nn.Module, named_params, options: EngineOptions, cache: ModelCache, device: torch.device) -> ForwardCapture:
    """The capture a ``gram`` call on ``device`` runs with (ReLU taps on the CPU only); ``auto`` inspects its claims."""
    return ForwardCapture(model, named_params, options if device.type == "cpu" else options.replace(relu_taps=False), cache)


def structural_matrix_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    named_params: list[tuple[str, torch.Tensor]],
    *,
    options: EngineOptions,
    cache: ModelCache,
    n_classes: int | None = None,
    chunk_size: int | None = None,
    groups: dict[str, torch.Tensor] | None = None,
    logits: list[torch.Tensor] | None = None,
    capture: ForwardCapture | None = None,
    factors: dict | None = None,
    dense: bool = True,
) -> tuple[torch.Tensor | None, dict[str, Route]]:
    """(A (batch, C, C), {parameter: Route}) by the rules' Gram contractions, the rest through torch.func.

    Args:
        model: maps (batch, ...) to (batch, C); called in the current (eval) mode.
        inputs: (batch, ...).
        named_params: θ as (name, tensor) pairs.
        options: :class:`.options.EngineOptions`; cache: the model's :class:`.cache.ModelCache`.
        n_classes: C, or None to read it from the logits.
        chunk_size: samples per chunk (bounds the memory of activations and B's).
        groups: if a dict, receives {module path: (batch, C, C)} with A = Σ of the groups.
        logits: if a list, receives the detached logits of each chunk's forward.
        capture: the :func:`gram_capture` to run with, when the caller made it already (``auto``).
        factors: if a dict, receives the factors of A = s·I + Q M Qᵀ when every chunk's A has that form
            (:meth:`.capture.ForwardCapture.add_parts`; :class:`.head.LowRankHead`).
        dense: False (with ``factors``): A is not formed when the factors hold it whole, and None is returned
            in its place; rows of chunks that had the factors' form are formed from them when another chunk's had not.

    With ``options.channels_last`` on the CPU, a forward that raises a RuntimeError on channels-last Conv2d
    outputs is rerun in the model's own layout, which the model's cache keeps for later calls (logged at INFO).
    A parameter routed generic in any chunk is reported generic.
    """
    n = inputs.shape[0]
    chunk = n if chunk_size is None else chunk_size
    total, first = None, True
    capture = gram_capture(model, named_params, options, cache, inputs.device) if capture is None else capture
    routes: dict[str, Route] = {}
    for start in range(0, n, chunk):
        x = inputs[start : start + chunk]
        while True:
            try:
                capture.batch_size = x.shape[0]
                with capture, torch.enable_grad():
                    out = check_outputs(model(x), x.shape[0])
                if first:  # C from the first chunk's logits: no separate forward to find it
                    n_classes = out.shape[1] if n_classes is None else n_classes
                    first = False
                elif out.shape[1] != n_classes:
                    raise ValueError(
                        f"model output: expected {n_classes} logits per sample in every chunk, got {out.shape[1]} for "
                        f"samples {start}…{start + x.shape[0] - 1}. The number of classes must not depend on the input."
                    )
                parts, generic, chunk_routes = capture.fast_parts(out, n_classes, dense=dense or factors is None)
                break
            except RuntimeError as err:
                if not capture.channels_last:
                    raise
                # e.g. a forward that calls .view() on a convolution's output: run it as given from now on
                cache.own_layout = True
                capture.channels_last = False
                log.info("gram: %s does not run on channels-last convolution outputs (%s); using its own layout", type(model).__name__, err)
        total = capture.add_parts(parts, generic, out, x, n_classes=n_classes, groups=groups, rows=slice(start, start + chunk),
                                  total=total, factors=factors, dense=dense, n_all=n)
        for name, route in chunk_routes.items():
            if name not in routes or not route.fast:
                routes[name] = route
        if logits is not None:
            logits.append(out.detach())
        del out
    if factors is not None and factors.get("skipped") and factors.get("invalid"):  # some chunks only in factors
        if total is None:
            total = torch.empty(n, n_classes, n_classes, dtype=named_params[0][1].dtype, device=inputs.device)
        LowRankHead.fill_skipped(factors, total)
    return total, routes
