"""A_x layer by layer: per-layer Gram contractions of inputs and backpropagated logit-Jacobians.

For a layer z = W a + b with per-sample input a and B_c = ∂f_c/∂z (one row per class c), the
layer's parameters contribute to A_x (DESIGN §3; Opacus' "ghost norm" generalised to C outputs):

- Linear, a of shape (d_in,):      A[c, c'] += (‖a‖² + 1)·(B_c · B_c')                 (bias: the +1)
- Linear over positions t (a_t):   A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})
- Conv (unfolded patches a_s):     A[c, c'] += Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'}) + bias term
  (grouped or depthwise: the same per group, summed; :mod:`.grouped`)
- Embedding (token ids):           A[c, c'] += Σ_{t,t'} [tok_t = tok_t'](b_{c,t}·b_{c',t'})
- MultiheadAttention: its in-projection as Linear layers over positions, one per block of rows with its
  own input (q·k·v for self-attention, q and k·v when key is value, …), and its out-projection, their
  inputs and outputs recomputed by a hook where the backward passes reach them (:mod:`.attention`)
- LSTM, GRU, RNN: W_ih and W_hh as Linear layers over the time steps (inputs x_t and h_{t−1}, output
  gradient ∂f_c/∂(W_ih x_t + b_ih), times [1, 1, r_t] for GRU's W_hh), the call recomputed step by
  step by a hook (:mod:`.recurrent`)
- a parameter P used directly, or a view V of it (a slice, a reshape), broadcast over the samples
  (out = h + V, h ⊙ V, or V.expand(n, …)):
                                   A[c, c'] += ⟨g_c, g_c'⟩, g_c = Σ_broadcast b_c [⊙ h] (:mod:`.raw`)
- BatchNorm (running statistics), LayerNorm, RMSNorm, GroupNorm, z = x̂ ⊙ γ + β:
                                   A[c, c'] += ⟨Σ_pos b_c ⊙ x̂, Σ_pos b_c' ⊙ x̂⟩ + ⟨Σ_pos b_c, Σ_pos b_c'⟩

Each position-summed term is computed either in "ghost" form (the S×S Gram of the patches) or
by materialising the per-sample, per-class weight gradient G_c = Σ_s b_{c,s} a_sᵀ and taking
⟨G_c, G_c'⟩, whichever the cost model (:func:`.contract.contraction_costs`) says is cheaper for that layer.
A materialised layer with thin patches (K ≤ 2·d_out) contracts each b_c as its backward pass
delivers it; the others copy the b_c into one buffer and contract all classes in one batched GEMM,
building their patches only then, in a buffer shared by the layers of the same shape. On the CPU, a
Conv2d whose output feeds only [ReLU →] MaxPool2d is contracted at the pool's output instead, over
the positions the pool selected (:mod:`.pooled`): its backward passes stop there. In the
standalone call on the CPU, a convolution whose output feeds only an ``nn.ReLU`` (or only a sum
that feeds only one, as in a residual block) gets b_c from that ReLU's backward written straight
into the layer's buffer (:mod:`.relu_tap`), with no fresh tensor and no copy.

All B_c come from one forward with hooks and C backward passes of Σ_b f_c(x_b) (samples are
independent under eval semantics, so the summed backward gives every per-sample row), or one
vmapped backward of the C cotangents where that is faster: no convolution backward on the way
and small layer outputs (:func:`.passes._one_pass`). On the CPU
the standalone call hands the model each Conv2d output in channels-last (the layers after keep
that layout, and oneDNN's backward kernels are faster in it); a forward that cannot take it (a
``.view`` of a convolution's output) is rerun in its own layout, from then on. Parameters
the fast path does not know — other module types, tied or reused weights, weights used outside
their module — are handed to the ``torch.func`` path restricted to those parameters; the two
contributions are summed. A Linear, LayerNorm or Embedding may see its samples along another
dimension than the first (a sequence-first model): that dimension is found, or the layer goes to
the generic path (:mod:`.samples`). Never an inexact answer.

Where each part lives: which layers are fast and what the graph says about them, :mod:`.plan`; the
forward's hooks and the per-layer parts, :mod:`.capture` (with :mod:`.attention`, :mod:`.raw` and
:mod:`.samples`, :mod:`.recurrent`, their shared :mod:`.stand_in`); the accumulators, :mod:`.sinks` (with :mod:`.grouped`, :mod:`.pooled`,
:mod:`.relu_tap`, the contractions in :mod:`.contract` and the patches in :mod:`.patches`); the
backward passes, :mod:`.passes`. This module is the entry point.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ._context import check_outputs
from .capture import ForwardCapture
from .patches import release_workspace
from .plan import LayerPlan, plan_layers

__all__ = ["structural_matrix_gram", "plan_layers", "LayerPlan", "ForwardCapture", "release_workspace"]

log = logging.getLogger("optmech.structure")

#: the standalone ``gram`` call hands the model its Conv2d outputs in channels-last on the CPU (:func:`.layout._to_channels_last`)
_CHANNELS_LAST = True

#: the standalone ``gram`` call on the CPU writes a conv's ReLU backward straight into the layer's buffer (:mod:`.relu_tap`)
_RELU_TAPS = True

#: the standalone ``gram`` call recomputes covered ``nn.MultiheadAttention`` calls so that their projections are fast (:mod:`.attention`)
_ATTENTION = True

#: ... and covered ``nn.LSTM``/``nn.GRU``/``nn.RNN`` calls step by step, so that their weights are fast (:mod:`.recurrent`)
_RECURRENT = True

#: the standalone ``gram`` call watches its forward for parameters used directly (:mod:`.raw`)
_DIRECT = True

#: models whose forward failed on channels-last convolution outputs (a ``.view`` of one, say): the
#: standalone call retried them in their own layout and keeps doing so
_NO_CHANNELS_LAST: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def structural_matrix_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    named_params: list[tuple[str, torch.Tensor]],
    *,
    n_classes: int | None = None,
    chunk_size: int | None = None,
    groups: dict[str, torch.Tensor] | None = None,
    logits: list[torch.Tensor] | None = None,
    generic: list[str] | None = None,
) -> torch.Tensor:
    """A (batch, C, C) by per-layer Gram contractions, the rest through torch.func.

    Args:
        model: maps (batch, ...) to (batch, C); called in the current (eval) mode.
        inputs: (batch, ...).
        named_params: θ as (name, tensor) pairs.
        n_classes: C, or None to read it from the logits.
        chunk_size: samples per chunk (bounds the memory of activations and B's).
        groups: if a dict, receives {module path: (batch, C, C)} with A = Σ of the groups.
        logits: if a list, receives the detached logits of each chunk's forward.
        generic: if a list, receives the names of the parameters that went through the generic path (each once).

    On the CPU the forward runs on channels-last Conv2d outputs (see :func:`.layout._to_channels_last`);
    if it raises a RuntimeError that way, it is rerun in the model's own layout, which the model
    keeps for later calls (logged at INFO on ``optmech.structure``).
    """
    n = inputs.shape[0]
    chunk = n if chunk_size is None else chunk_size
    total = None
    cpu = inputs.device.type == "cpu"
    capture = ForwardCapture(
        model, named_params, channels_last=_CHANNELS_LAST and model not in _NO_CHANNELS_LAST, relu_taps=_RELU_TAPS and cpu,
        attention=_ATTENTION, direct=_DIRECT, recurrent=_RECURRENT,
    )
    for start in range(0, n, chunk):
        x = inputs[start : start + chunk]
        while True:
            try:
                with capture, torch.enable_grad():
                    out = check_outputs(model(x), x.shape[0])
                if total is None:  # C from the first chunk's logits: no separate forward to find it
                    n_classes = out.shape[1] if n_classes is None else n_classes
                    total = torch.zeros(n, n_classes, n_classes, dtype=named_params[0][1].dtype, device=inputs.device)
                elif out.shape[1] != n_classes:
                    raise ValueError(
                        f"model output: expected {n_classes} logits per sample in every chunk, got {out.shape[1]} for "
                        f"samples {start}…{start + x.shape[0] - 1}. The number of classes must not depend on the input."
                    )
                parts, slow_names = capture.fast_parts(out, n_classes)
                break
            except RuntimeError as err:
                if not capture.channels_last:
                    raise
                # e.g. a forward that calls .view() on a convolution's output: run it as given from now on
                _NO_CHANNELS_LAST.add(model)
                capture.channels_last = False
                log.info("gram: %s does not run on channels-last convolution outputs (%s); using its own layout", type(model).__name__, err)
        capture.add_parts(parts, slow_names, out, x, n_classes=n_classes, groups=groups, rows=slice(start, start + chunk), total=total)
        if generic is not None:
            generic.extend(name for name in slow_names if name not in generic)
        if logits is not None:
            logits.append(out.detach())
        del out
    return total
