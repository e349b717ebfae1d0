"""Normalisation layers with an elementwise affine map on per-sample statistics: BatchNorm1d/2d/3d (on its
running statistics), LayerNorm, RMSNorm, GroupNorm.

Claims ``weight`` (γ) and ``bias`` (β, absent in RMSNorm). z = x̂ ⊙ γ + β elementwise, with x̂ the normalised
input (a function of the sample alone: running statistics, or statistics over the sample's own features), so

    ∂f_c/∂γ = Σ_positions b_c ⊙ x̂,   ∂f_c/∂β = Σ_positions b_c,   A[c, c'] += ⟨G_c, G_c'⟩ with G_c = [∂f_c/∂γ, ∂f_c/∂β].

BatchNorm/GroupNorm: γ per channel (dimension 1), positions = the spatial dimensions; LayerNorm/RMSNorm: γ over
the normalised trailing dimensions (position-wise: the samples may lie along any other dimension),
positions = the rest. BatchNorm in training mode is not per-sample (the probe runs eval semantics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..accumulator import Accumulator
from ..contract import class_major_gram
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["NormRule", "NormGram", "FEATURE_NORMS"]

#: layers that normalise over trailing feature dimensions (``nn.RMSNorm`` from torch 2.4 on)
FEATURE_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class NormRule(Rule):
    name = "norm"
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm) + FEATURE_NORMS

    def matches(self, module: nn.Module) -> bool:
        if type(module) not in self.kinds:
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # per-sample only on running statistics
            return module.running_mean is not None and module.running_var is not None
        return True

    def layer_feature_dims(self, module: nn.Module) -> int | None:
        return len(module.normalized_shape) if isinstance(module, FEATURE_NORMS) else None

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> NormGram:
        return NormGram(layer.module, record.a, ctx.n_classes)


class NormGram(Accumulator):
    """One normalisation layer's share: each class's G_c = [Σ_pos b_c ⊙ x̂, Σ_pos b_c] contracted as it arrives
    into (C, n, |γ| + |β|), then A[c, c'] = ⟨G_c, G_c'⟩."""

    form = "elementwise"

    def __init__(self, m: nn.Module, a: torch.Tensor, n_classes: int) -> None:
        self.module = m
        if isinstance(m, FEATURE_NORMS):
            if isinstance(m, nn.LayerNorm):
                self.xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
            else:
                self.xhat = F.rms_norm(a, m.normalized_shape, None, m.eps)
            self.reduce = tuple(range(1, a.dim() - len(m.normalized_shape)))  # leading positions
        else:
            if isinstance(m, nn.GroupNorm):
                self.xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
            else:
                self.xhat = F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            self.reduce = tuple(range(2, a.dim()))  # spatial positions
        bias = getattr(m, "bias", None)
        self.has = (m.weight is not None, bias is not None)
        size = m.weight.numel() if m.weight is not None else bias.numel()
        self.buffer = torch.empty(n_classes, a.shape[0], size * sum(self.has), dtype=a.dtype, device=a.device)
        self.n_classes, self.count = n_classes, 0

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return (t.sum(self.reduce) if self.reduce else t).reshape(t.shape[0], -1)

    def add(self, b: torch.Tensor) -> None:
        parts = ([self._sum(b * self.xhat)] if self.has[0] else []) + ([self._sum(b)] if self.has[1] else [])
        torch.cat(parts, 1, out=self.buffer[self.count])
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """The same sums as :meth:`add`, with the class dimension in front."""
        C, n = bs.shape[:2]
        reduce = tuple(r + 1 for r in self.reduce)

        def summed(t: torch.Tensor) -> torch.Tensor:
            return (t.sum(reduce) if reduce else t).reshape(C, n, -1)

        parts = ([summed(bs * self.xhat)] if self.has[0] else []) + ([summed(bs)] if self.has[1] else [])
        torch.cat(parts, 2, out=self.buffer)
        return True

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return class_major_gram(self.buffer, into)  # (C, n, |γ| + |β|)
