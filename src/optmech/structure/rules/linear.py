"""``nn.Linear``: a weight W (d_out × d_in) and bias b, on vectors or over positions.

Claims ``weight`` and ``bias``. With per-sample input a_t at positions t (a vector: one position) and
b_{c,t} = ∂f_c/∂z_t (DESIGN §3):

    A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})      (bias: the second term)
    vector input:  A[c, c'] += (‖a‖² + 1)·(b_c·b_c')

in ghost or materialised form (:class:`..layer_gram.LayerGram`). Position-wise: the samples may lie along
any leading dimension of z (a sequence-first model), found by :mod:`..samples`.
"""

from __future__ import annotations

from torch import nn

from ..layer_gram import LayerGram
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["LinearRule"]


class LinearRule(Rule):
    name = "linear"
    kinds = (nn.Linear,)
    feature_dims = 1

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> LayerGram:
        return LayerGram(layer.module, record.a, ctx.n_classes, ctx.workspace, ctx.strategy)
