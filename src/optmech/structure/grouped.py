"""A grouped convolution's share of A_x (``groups`` = g > 1, depthwise included), as g convolutions of its own.

A Conv1d/Conv2d/Conv3d with g groups maps input channels [j·c_in/g, (j+1)·c_in/g) to output channels
[j·d_out/g, (j+1)·d_out/g) with weights of their own, so its share of A_x is the sum over j of the
shares of g ordinary convolutions (:mod:`.contract`):

    A[c, c'] = Σ_j Σ_{s,t} (â_{j,s}·â_{j,t})(b_{c,j,s}·b_{c',j,t}) + ⟨Σ_s b_{c,s}, Σ_s b_{c',s}⟩   (bias)

with â_{j,s} the patch of group j's input channels at position s (K/g values) and b_{c,j,s} the
group's d_out/g outputs of ∂f_c/∂z. The patches of the whole layer, ordered (input channel,
kernel offset), are those of the g groups one after another, so the groups become a batch of n·g
"samples": patches (n·g, K/g, S), ∂f/∂z (n·g, C, d_out/g, S), one batched contraction in the form
:func:`.contract.contraction_costs` finds cheaper for those shapes, and a sum over the g groups.
"""

from __future__ import annotations

import torch

from .accumulator import Accumulator
from .cache import SHARED, Workspace
from .contract import contraction_costs, ghost_gram, gram_of, materialised_gram
from .patches import layer_dims, layer_patches

__all__ = ["GroupedConvGram"]


class GroupedConvGram(Accumulator):
    """Accumulates a grouped convolution's contribution: ``add(b_c)`` per class (or all at once), then ``result()``.

    b_c = ∂f_c/∂z has the layer output's shape (n, d_out, *spatial); it is copied into a buffer
    (n, g, C, d_out/g, S), which is the (n·g, C, d_out/g, S) operand of the per-group contraction.
    """

    def __init__(self, module, a: torch.Tensor, n_classes: int, ws: Workspace, strategy: str | None = None) -> None:
        self.module = m = module
        self.ws = ws
        n, g = a.shape[0], m.groups
        K, S = layer_dims(m, a)
        self.groups, self.S, self.d_group = g, S, m.out_channels // g
        self.bias = m.bias is not None
        costs = contraction_costs(n * g, n_classes, S, K // g, self.d_group, self.bias)
        self.form = self.strategy = strategy or min(costs, key=costs.get)
        self.input = a
        self.buffer = ws.get(m, "dfdz-groups", (n, g, n_classes, self.d_group, S), a.dtype, a.device)
        self.n_classes, self.count = n_classes, 0

    def add(self, b: torch.Tensor) -> None:
        n = b.shape[0]
        self.buffer[:, :, self.count] = b.reshape(n, self.groups, self.d_group, self.S)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """bs (C, n, d_out, *spatial) in one copy into the buffer (n, g, C, d_out/g, S)."""
        C, n = bs.shape[:2]
        self.buffer.copy_(bs.reshape(C, n, self.groups, self.d_group, self.S).permute(1, 2, 0, 3, 4))
        return True

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        n, g, C, d, S = self.buffer.shape
        b = self.buffer.view(n * g, C, d, S)
        a = layer_patches(self.module, self.input, self.ws, owner=SHARED)  # (n, K, S), rows ordered (channel, offset)
        a = a.view(n * g, a.shape[1] // g, S)  # the groups' patches one after another
        if self.strategy == "materialise":
            out = materialised_gram(b, a)
        else:
            out = ghost_gram(b, a.transpose(1, 2) @ a)  # Γ_j = (â_{j,s}·â_{j,t}), (n·g, S, S)
        out = out.view(n, g, C, C).sum(1) if into is None else into.add_(out.view(n, g, C, C).sum(1))
        if self.bias:
            sums = self.buffer.sum(4).transpose(1, 2).reshape(n, C, g * d)  # Σ_s b_c over all output channels
            out = gram_of(sums, out)
        return out
