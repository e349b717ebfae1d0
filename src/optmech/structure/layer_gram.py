"""The accumulator of a Linear or ungrouped convolution layer (Conv1d, Conv2d, Conv3d): ghost or materialised form.

For a layer with per-sample patches â (n, K, S: K features at S positions; a Linear over positions t, or a
convolution's unfolded input) and b_c = ∂f_c/∂z (n, d_out, S), its share of A_x is (DESIGN §3)

    A[c, c'] = Σ_{s,t} (â_s·â_t)(b_{c,s}·b_{c',t}) + ⟨Σ_s b_{c,s}, Σ_s b_{c',s}⟩ (bias) = ⟨G_c, G_c'⟩,

with G_c = Σ_s b_{c,s} â_sᵀ the per-class weight gradient; for a Linear on vectors (S = 1),
A = (‖a‖² + 1)·B Bᵀ. :func:`.contract.contraction_costs` picks the cheaper form per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .accumulator import Accumulator
from .cache import SHARED, Workspace
from .contract import class_major_gram, contraction_costs, ghost_gram, gram_of, materialised_gram, squared_norms
from .layout import is_channels_last
from .patches import layer_dims, layer_patches, out_features

__all__ = ["LayerGram"]

#: materialised layers whose patches have at most this many rows per output channel contract each class at once
_IMMEDIATE_RATIO = 2


def _kept_per_class(ws: Workspace, owner: nn.Module, role: str, z: torch.Tensor, dtype: torch.dtype, classes: int) -> torch.Tensor:
    """A kept buffer (classes, *z.shape) whose every slot [c] has z's order of dimensions in memory.

    z must satisfy :func:`.layout._tappable_layout`. For channels-last z (n, d, H, W) the memory holds (C, n, H, W, d).
    """
    if is_channels_last(z):
        n, d, h, w = z.shape
        return ws.get(owner, role, (classes, n, h, w, d), dtype, z.device).movedim(-1, 2)
    return ws.get(owner, role, (classes, *z.shape), dtype, z.device)


class LayerGram(Accumulator):
    """Accumulates one layer's contribution class by class: ``add(b_c)`` for c = 0…C−1, then ``result()``.

    b_c = ∂f_c/∂z has the layer output's shape (n, *z.shape[1:]), seen as (n, d_out, S).

    - ``materialise``: G_c = Σ_s b_{c,s} âᵀ_s with â the patches (n, K, S) plus a row of ones when
      there is a bias (its gradient Σ_s b_{c,s} is then one more row of the same GEMM); then
      A = ⟨G_c, G_c'⟩. With thin patches (K + 1 ≤ 2·d_out) each b_c is contracted as it arrives,
      G_cᵀ = â b_cᵀ (n, K+1, d_out), never copied (the â·bᵀ orientation: docs/engine.md); otherwise
      the b_c are buffered like ``ghost`` and contracted in one batched GEMM, with the patches built
      only then.
    - ``ghost``: the b_c are copied into one (n, C·d_out, S) buffer so that the contraction is one
      batched GEMM rather than C thin ones: A = ⟨b_c, b_c' Γ⟩, Γ = aᵀa (S×S), or
      (‖a‖²)·b_c·b_c' for a vector Linear (S = 1); plus the bias term ⟨Σ_s b_c, Σ_s b_c'⟩.
    """

    def __init__(
        self, module: nn.Module, a: torch.Tensor, n_classes: int, ws: Workspace, strategy: str | None = None,
        tap_z: torch.Tensor | None = None,
    ) -> None:
        self.module, self.ws = module, ws
        n = a.shape[0]
        K, S = layer_dims(self.module, a)
        self.n_classes, self.d_out, self.S = n_classes, out_features(self.module), S
        self.bias = self.module.bias is not None
        costs = contraction_costs(n, n_classes, S, K, self.d_out, self.bias)
        self.form = self.strategy = strategy or min(costs, key=costs.get)
        materialise = self.strategy == "materialise"
        self.input, self.ones_row = a, materialise and self.bias
        rows = K + int(self.ones_row)
        # materialise: contract each b_c as it arrives when the patches are thin (re-reading them C times
        # costs less than copying the b_c), else buffer the b_c and contract them in one GEMM
        self.immediate = materialise and rows <= _IMMEDIATE_RATIO * self.d_out
        # (n, K[+1], S): now if every class needs them, else when result() contracts (shared buffer)
        self.a = layer_patches(self.module, a, ws, self.ones_row) if self.immediate or S == 1 else None
        # a ReLU tap writes b_c into slot c of a class-major buffer laid out like z (see .relu_tap; taps
        # are made only on z of a tappable layout)
        self.tapped = tap_z is not None and materialise and not self.immediate and tap_z.dtype == a.dtype
        if self.immediate:
            shape = (n_classes, n, rows, self.d_out)  # G_cᵀ per class, contiguous per class
            self.buffer = ws.get(self.module, "weight-grads", shape, a.dtype, a.device)
        elif self.tapped:
            self.buffer = _kept_per_class(ws, self.module, "dfdz-classes", tap_z, a.dtype, n_classes)  # (C, *z.shape)
        elif not (self.strategy == "ghost" and S == 1):
            self.buffer = ws.get(self.module, "dfdz", (n, n_classes, self.d_out, S), a.dtype, a.device)
        self.vectors: list[torch.Tensor] = []  # ghost with S = 1: the b_c themselves, stacked once in result()
        self.class_major: torch.Tensor | None = None  # ghost with S = 1, all classes at once: (C, n, d_out)
        self.count = 0

    def _per_position(self, b: torch.Tensor) -> torch.Tensor:
        """b_c as (n, S, d_out) (a view)."""
        n = b.shape[0]
        if isinstance(self.module, nn.Linear):
            return b.reshape(n, -1, self.d_out)
        return b.reshape(n, self.d_out, -1).transpose(1, 2)

    def slot(self) -> torch.Tensor:
        """Where b_c of the current class goes (a tapped layer): z's shape and strides."""
        return self.buffer[self.count]

    def add(self, b: torch.Tensor) -> None:
        if self.tapped:
            slot = self.slot()
            if not (b.data_ptr() == slot.data_ptr() and b.stride() == slot.stride()):
                slot.copy_(b)  # the tap did not run (or autograd handed back a copy): b is still exact
        elif self.immediate:
            torch.bmm(self.a, self._per_position(b), out=self.buffer[self.count])
        elif self.strategy == "ghost" and self.S == 1:
            self.vectors.append(b.reshape(b.shape[0], self.d_out))
        else:
            self.buffer[:, self.count] = self._per_position(b).transpose(1, 2)  # (n, d_out, S)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """A vector Linear keeps bs itself (its Gram reads it as (n, C, d_out), a strided view: no stacking);
        a buffered layer takes it in one copy; the others (per-class contractions, taps) class by class."""
        if self.immediate or self.tapped:
            return False
        C, n = bs.shape[:2]
        if self.strategy == "ghost" and self.S == 1:
            self.class_major = bs.reshape(C, n, self.d_out)
        elif isinstance(self.module, nn.Linear):  # (C, n, S, d_out) -> (n, C, d_out, S)
            self.buffer.copy_(bs.reshape(C, n, self.S, self.d_out).permute(1, 0, 3, 2))
        else:  # (C, n, d_out, S) -> (n, C, d_out, S)
            self.buffer.copy_(bs.reshape(C, n, self.d_out, self.S).transpose(0, 1))
        return True

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        if self.immediate:
            return class_major_gram(self.buffer, into)  # (C, n, K+1, d_out)
        a = self.a if self.a is not None else layer_patches(self.module, self.input, self.ws, self.ones_row, owner=SHARED)
        if self.tapped:
            return self._tapped_result(a, into)
        if self.strategy == "materialise":
            return materialised_gram(self.buffer, a, into)
        if self.strategy == "ghost" and self.S == 1:  # (‖a‖² + 1)·B Bᵀ, the +1 for the bias
            F_ = self.class_major.transpose(0, 1) if self.class_major is not None else torch.stack(self.vectors, 1)  # (n, C, d_out)
            scale = squared_norms(a[..., 0])
            if self.bias:
                scale += 1
            # √scale·B written sample-major into a kept buffer: the batched GEMM on it runs about 1.1× faster than on
            # the class-major product (docs/engine.md)
            scaled = self.ws.get(self.module, "scaled-dfdz", F_.shape, F_.dtype, F_.device)
            return gram_of(torch.mul(F_, scale.sqrt_().view(-1, 1, 1), out=scaled), into)
        out = ghost_gram(self.buffer, a.transpose(1, 2) @ a, into)  # Γ = (a_s·a_t), (n, S, S)
        if self.bias:
            out = gram_of(self.buffer.sum(3), out)  # + ⟨Σ_s b_c, Σ_s b_c'⟩, (n, C, d_out)
        return out

    def _tapped_result(self, a: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """The materialised contraction from the class-major buffer (C, *z.shape) the taps wrote.

        Channels-last z: the buffer is (C, n, S, d) in memory; relaid out once as (n, S, C·d) (a
        buffer shared by layers of that shape), the weight gradients of all classes are one GEMM
        â·[b_0 … b_C−1] → (n, K[+1], C·d) with no transposed operand, reordered to (n, C, (K+1)·d) for
        the Gram.
        Contiguous z: relaid out as (n, C, d, S) and contracted as the untapped buffer.
        """
        C, n, d, S = self.buffer.shape[0], self.buffer.shape[1], self.d_out, self.S
        if not is_channels_last(self.buffer[0]):
            by_sample = self.ws.get(SHARED, "dfdz-samples", (n, C, d, S), a.dtype, a.device)
            by_sample.copy_(self.buffer.reshape(C, n, d, S).transpose(0, 1))
            return materialised_gram(by_sample, a, into)
        per_position = self.ws.get(SHARED, "dfdz-positions", (n, S, C, d), a.dtype, a.device)
        per_position.copy_(self.buffer.movedim(2, -1).reshape(C, n, S, d).permute(1, 2, 0, 3))
        Gt = torch.bmm(a, per_position.view(n, S, C * d))  # (n, K[+1], C·d): the G_cᵀ side by side
        F_ = Gt.view(n, -1, C, d).transpose(1, 2).reshape(n, C, -1)  # (n, C, (K+1)·d)
        return gram_of(F_, into)
