"""Transposed convolutions: ``nn.ConvTranspose1d`` and ``nn.ConvTranspose2d`` (ungrouped).

Claims ``weight`` (c_in × c_out × kernel) and ``bias``. A transposed convolution scatters each input position p
through the kernel: z[o, p·s + k·d − pad] += Σ_i W[i, o, k] a[i, p]. So, with b_c = ∂f_c/∂z and ũ_c its
unfolded patches under the layer's own stride s, dilation d and padding (the adjoint convolution's
geometry: ũ_c[(o, k), p] = b_c[o, p·s + k·d − pad], zero outside z), the per-sample, per-class gradients are

    ∂f_c/∂W[i, o, k] = Σ_p a[i, p] ũ_c[(o, k), p] = (a ũ_cᵀ)[i, (o, k)],     ∂f_c/∂b[o] = Σ_q b_c[o, q]

and A[c, c'] += ⟨G_c, G_c'⟩ with G_c = [a ũ_cᵀ, Σ_q b_c] (the materialised form). ``output_padding`` only
extends z past the last position any input reaches: those entries carry no weight gradient.
Not covered (generic): ``groups`` > 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..accumulator import Accumulator
from ..contract import class_major_gram
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["ConvTransposeRule", "ConvTransposeGram"]


class ConvTransposeRule(Rule):
    name = "conv_transpose"
    kinds = (nn.ConvTranspose1d, nn.ConvTranspose2d)
    gpu_one_pass = False

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self.kinds and module.groups == 1

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> ConvTransposeGram:
        return ConvTransposeGram(layer.module, record.a, ctx.n_classes)


class ConvTransposeGram(Accumulator):
    """Each class's G_c = [a ũ_cᵀ, Σ_q b_c] contracted as it arrives into (C, n, |W| + |b|), then A = ⟨G_c, G_c'⟩."""

    form = "materialise"

    def __init__(self, m: nn.Module, a: torch.Tensor, n_classes: int) -> None:
        self.module, self.one_d = m, isinstance(m, nn.ConvTranspose1d)
        n = a.shape[0]
        self.a = a.reshape(n, m.in_channels, -1)  # (n, c_in, P)
        size = m.weight.numel() + (m.out_channels if m.bias is not None else 0)
        self.buffer = torch.empty(n_classes, n, size, dtype=a.dtype, device=a.device)
        self.n_classes, self.count = n_classes, 0

    def _unfolded(self, b: torch.Tensor) -> torch.Tensor:
        """ũ (n, c_out·K, P): b's patches under the layer's stride, dilation and padding (Conv1d seen as 2-D)."""
        m = self.module
        if self.one_d:
            b = b.unsqueeze(2)
            kernel, dilation, padding, stride = (1, m.kernel_size[0]), (1, m.dilation[0]), (0, m.padding[0]), (1, m.stride[0])
        else:
            kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
        return F.unfold(b, kernel, dilation=dilation, padding=padding, stride=stride)

    def add(self, b: torch.Tensor) -> None:
        n = b.shape[0]
        u = self._unfolded(b)  # (n, c_out·K, P): output_padding's extra positions are reached by no patch
        assert u.shape[2] == self.a.shape[2], "the adjoint geometry maps z's patches onto a's positions"
        weight = (self.a @ u.transpose(1, 2)).reshape(n, -1)  # (n, c_in·c_out·K), W's layout
        parts = [weight] + ([b.reshape(n, b.shape[1], -1).sum(2)] if self.module.bias is not None else [])
        torch.cat(parts, 1, out=self.buffer[self.count])
        self.count += 1

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return class_major_gram(self.buffer, into)
