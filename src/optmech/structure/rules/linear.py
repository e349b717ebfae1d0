"""``nn.Linear``: a weight W (d_out × d_in) and bias b, on vectors or over positions.

Claims ``weight`` and ``bias``. With per-sample input a_t at positions t (a vector: one position) and
b_{c,t} = ∂f_c/∂z_t (DESIGN §3):

    A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})      (bias: the second term)
    vector input:  A[c, c'] += (‖a‖² + 1)·(b_c·b_c')

in ghost or materialised form (:class:`..layer_gram.LayerGram`). Position-wise: the samples may lie along
any leading dimension of z (a sequence-first model), found by :mod:`..samples`.

The logits layer (z is the model's output f itself, on vectors): b_c = e_c for every sample, so its share is
(‖a‖² + 1)·I in closed form (:class:`LogitsLinearGram`, no backward pass and no C×C product), and the other
layers' backward passes start at its input h with the cotangents ∂f_c/∂h = W[c] (its ``seed``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..accumulator import Accumulator
from ..contract import squared_norms
from ..layer_gram import LayerGram
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["LinearRule", "LogitsLinearGram"]


class LinearRule(Rule):
    name = "linear"
    kinds = (nn.Linear,)
    feature_dims = 1

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> Accumulator:
        if ctx.logits is not None and record.z is ctx.logits and record.a.dim() == 2 and record.sample_dim == 0:
            return LogitsLinearGram(layer.module, record, ctx.n_classes)
        return LayerGram(layer.module, record.a, ctx.n_classes, ctx.workspace, ctx.strategy)


class LogitsLinearGram(Accumulator):
    """The logits layer's share (‖a‖² + 1[bias])·I_C, in closed form: it reads no ∂f/∂z (``target`` None)."""

    form = "closed"
    reads_gradient = False

    def __init__(self, module: nn.Linear, record: Record, n_classes: int) -> None:
        self.n_classes, self.count = n_classes, n_classes
        a = record.a
        self.scale = squared_norms(a)  # (n,)
        if module.bias is not None:
            self.scale += 1
        h = record.input
        if h is not None and h.grad_fn is not None and h.dim() == 2:
            self.seed = (h, module.weight.detach())

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        if into is None:
            eye = torch.eye(self.n_classes, dtype=self.scale.dtype, device=self.scale.device)
            return self.scale[:, None, None] * eye
        into.diagonal(dim1=1, dim2=2).add_(self.scale[:, None].to(into.dtype))
        return into
