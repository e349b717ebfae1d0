"""The per-layer accumulators of ``gram``: each takes b_c = ∂f_c/∂z class by class (or all at once) and returns
the layer's share of A_x, (n, C, C).

- :class:`_LayerGram`: Linear, Conv1d and ungrouped Conv2d, in ghost or materialised form (:mod:`.contract`),
  the b_c buffered, contracted as they arrive, or written into the buffer by a ReLU tap (:mod:`.relu_tap`);
- :class:`_NormGram`: BatchNorm on running statistics, LayerNorm, RMSNorm, GroupNorm;
- :class:`_EmbeddingGram`: Embedding, through the token-equality Gram;
- grouped convolutions: :class:`.grouped.GroupedConvGram`; a conv contracted at its pool's output: :mod:`.pooled`.

:func:`_sink` picks one for a layer plan. The formulas are in :mod:`.gram`'s docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._class_sink import ClassSink
from .contract import class_major_gram, contraction_costs, ghost_gram, materialised_gram
from .grouped import GroupedConvGram
from .layout import _is_channels_last
from .patches import SHARED, layer_dims, layer_patches, out_features, workspace
from .plan import _FEATURE_NORMS, _NORM_TYPES, LayerPlan

#: materialised layers whose patches have at most this many rows per output channel contract each class at once
_IMMEDIATE_RATIO = 2


def _kept_per_class(owner: nn.Module, role: str, z: torch.Tensor, dtype: torch.dtype, classes: int) -> torch.Tensor:
    """A kept buffer (classes, *z.shape) whose every slot [c] has z's order of dimensions in memory.

    z must satisfy :func:`.layout._tappable_layout`. For channels-last z (n, d, H, W) the memory holds (C, n, H, W, d).
    """
    if _is_channels_last(z):
        n, d, h, w = z.shape
        return workspace(owner, role, (classes, n, h, w, d), dtype, z.device).movedim(-1, 2)
    return workspace(owner, role, (classes, *z.shape), dtype, z.device)


class _LayerGram(ClassSink):
    """Accumulates one layer's contribution class by class: ``add(b_c)`` for c = 0…C−1, then ``result()``.

    b_c = ∂f_c/∂z has the layer output's shape (n, *z.shape[1:]), seen as (n, d_out, S).

    - ``materialise``: G_c = Σ_s b_{c,s} âᵀ_s with â the patches (n, K, S) plus a row of ones when
      there is a bias (its gradient Σ_s b_{c,s} is then one more row of the same GEMM); then
      A = ⟨G_c, G_c'⟩. With thin patches (K + 1 ≤ 2·d_out) each b_c is contracted as it arrives,
      G_cᵀ = â b_cᵀ (n, K+1, d_out), never copied (the â·bᵀ orientation is 1–2× faster on CPU than
      b·âᵀ for these shapes); otherwise the b_c are buffered like ``ghost`` and contracted in one
      batched GEMM, with the patches built only then.
    - ``ghost``: the b_c are copied into one (n, C·d_out, S) buffer so that the contraction is one
      batched GEMM (about 4× faster on CPU than C thin ones): A = ⟨b_c, b_c' Γ⟩, Γ = aᵀa (S×S), or
      (‖a‖²)·b_c·b_c' for a vector Linear (S = 1); plus the bias term ⟨Σ_s b_c, Σ_s b_c'⟩.
    """

    def __init__(
        self, plan: LayerPlan, a: torch.Tensor, n_classes: int, strategy: str | None = None, tap_z: torch.Tensor | None = None
    ) -> None:
        self.module = plan.module
        n = a.shape[0]
        K, S = layer_dims(self.module, a)
        self.n_classes, self.d_out, self.S = n_classes, out_features(self.module), S
        self.bias = self.module.bias is not None
        costs = contraction_costs(n, n_classes, S, K, self.d_out, self.bias)
        plan.strategy = self.strategy = strategy or min(costs, key=costs.get)
        materialise = self.strategy == "materialise"
        self.input, self.ones_row = a, materialise and self.bias
        rows = K + int(self.ones_row)
        # materialise: contract each b_c as it arrives when the patches are thin (re-reading them C times
        # costs less than copying the b_c), else buffer the b_c and contract them in one GEMM
        self.immediate = materialise and rows <= _IMMEDIATE_RATIO * self.d_out
        # (n, K[+1], S): now if every class needs them, else when result() contracts (shared buffer)
        self.a = layer_patches(self.module, a, self.ones_row) if self.immediate or S == 1 else None
        # a ReLU tap writes b_c into slot c of a class-major buffer laid out like z (see .relu_tap; taps
        # are made only on z of a tappable layout)
        self.tapped = tap_z is not None and materialise and not self.immediate and tap_z.dtype == a.dtype
        if self.immediate:
            shape = (n_classes, n, rows, self.d_out)  # G_cᵀ per class, contiguous per class
            self.buffer = workspace(self.module, "weight-grads", shape, a.dtype, a.device)
        elif self.tapped:
            self.buffer = _kept_per_class(self.module, "dfdz-classes", tap_z, a.dtype, n_classes)  # (C, *z.shape)
        elif not (self.strategy == "ghost" and S == 1):
            self.buffer = workspace(self.module, "dfdz", (n, n_classes, self.d_out, S), a.dtype, a.device)
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

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        if self.immediate:
            return class_major_gram(self.buffer)  # (C, n, K+1, d_out)
        a = self.a if self.a is not None else layer_patches(self.module, self.input, self.ones_row, owner=SHARED)
        if self.tapped:
            return self._tapped_result(a)
        if self.strategy == "materialise":
            return materialised_gram(self.buffer, a)
        if self.strategy == "ghost" and self.S == 1:  # (‖a‖² + 1)·B Bᵀ, the +1 for the bias
            F_ = self.class_major.transpose(0, 1) if self.class_major is not None else torch.stack(self.vectors, 1)  # (n, C, d_out)
            scale = (a[..., 0] ** 2).sum(-1) + float(self.bias)
            return scale[:, None, None] * (F_ @ F_.transpose(1, 2))
        out = ghost_gram(self.buffer, a.transpose(1, 2) @ a)  # Γ = (a_s·a_t), (n, S, S)
        if self.bias:
            bs = self.buffer.sum(3)  # (n, C, d_out)
            out = out + bs @ bs.transpose(1, 2)
        return out

    def _tapped_result(self, a: torch.Tensor) -> torch.Tensor:
        """The materialised contraction from the class-major buffer (C, *z.shape) the taps wrote.

        Channels-last z: the buffer is (C, n, S, d) in memory; relaid out once as (n, S, C·d) (a
        buffer shared by layers of that shape), the weight gradients of all classes are one GEMM
        â·[b_0 … b_C−1] → (n, K[+1], C·d) with no transposed operand (for a5's 28×28 layers 1.4–1.6×
        the throughput of the b·âᵀ product below, timed alone), reordered to (n, C, (K+1)·d) for the Gram.
        Contiguous z: relaid out as (n, C, d, S) and contracted as the untapped buffer.
        """
        C, n, d, S = self.buffer.shape[0], self.buffer.shape[1], self.d_out, self.S
        if not _is_channels_last(self.buffer[0]):
            by_sample = workspace(SHARED, "dfdz-samples", (n, C, d, S), a.dtype, a.device)
            by_sample.copy_(self.buffer.reshape(C, n, d, S).transpose(0, 1))
            return materialised_gram(by_sample, a)
        per_position = workspace(SHARED, "dfdz-positions", (n, S, C, d), a.dtype, a.device)
        per_position.copy_(self.buffer.movedim(2, -1).reshape(C, n, S, d).permute(1, 2, 0, 3))
        Gt = torch.bmm(a, per_position.view(n, S, C * d))  # (n, K[+1], C·d): the G_cᵀ side by side
        F_ = Gt.view(n, -1, C, d).transpose(1, 2).reshape(n, C, -1)  # (n, C, (K+1)·d)
        return F_ @ F_.transpose(1, 2)


class _NormGram(ClassSink):
    """One normalisation layer's contribution (BatchNorm on running statistics, LayerNorm, RMSNorm, GroupNorm).

    z = x̂ ⊙ γ + β elementwise (RMSNorm: no β), with x̂ the normalised input (a function of the input
    alone, per sample: running statistics, or statistics over the sample's own features). So
    ∂f_c/∂γ = Σ_positions b_c ⊙ x̂ and ∂f_c/∂β = Σ_positions b_c, each class contracted as it arrives
    into G (C, n, |γ| + |β|), and A[c, c'] = ⟨G_c, G_c'⟩. BatchNorm/GroupNorm: γ per channel (dim 1),
    positions = the spatial dims; LayerNorm/RMSNorm: γ over the normalised trailing dims, positions = the rest.
    """

    strategy = "elementwise"

    def __init__(self, plan: LayerPlan, a: torch.Tensor, n_classes: int) -> None:
        plan.strategy = self.strategy
        m = self.module = plan.module
        if isinstance(m, _FEATURE_NORMS):
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

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return class_major_gram(self.buffer)  # (C, n, |γ| + |β|)


class _EmbeddingGram(ClassSink):
    """An Embedding's contribution: a Linear over token positions whose inputs are one-hot vectors.

    ∂f_c/∂E = Σ_t e_{tok_t} b_{c,t}ᵀ, so A[c, c'] = Σ_{t,t'} [tok_t = tok_t'] (b_{c,t}·b_{c',t'}): the
    ghost form with Γ the token-equality matrix (positions holding ``padding_idx`` get no gradient
    and are left out). The (vocabulary × dim) gradient is never formed.
    """

    strategy = "ghost"

    def __init__(self, plan: LayerPlan, tokens: torch.Tensor, n_classes: int) -> None:
        plan.strategy = self.strategy
        m = self.module = plan.module
        n = tokens.shape[0]
        tok = tokens.reshape(n, -1)
        same = tok[:, :, None] == tok[:, None, :]
        if m.padding_idx is not None:
            keep = tok != m.padding_idx
            same &= keep[:, :, None] & keep[:, None, :]
        self.gamma = same.to(m.weight.dtype)  # (n, L, L)
        self.buffer = workspace(m, "dfdz", (n, n_classes, m.embedding_dim, tok.shape[1]), m.weight.dtype, m.weight.device)
        self.n_classes, self.count = n_classes, 0

    def add(self, b: torch.Tensor) -> None:
        n = b.shape[0]
        self.buffer[:, self.count] = b.reshape(n, -1, self.buffer.shape[2]).transpose(1, 2)  # (n, dim, L)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """bs (C, n, *tokens.shape[1:], dim) in one copy into the buffer (n, C, dim, L)."""
        C, n = bs.shape[:2]
        self.buffer.copy_(bs.reshape(C, n, -1, self.buffer.shape[2]).permute(1, 0, 3, 2))
        return True

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return ghost_gram(self.buffer, self.gamma)


def _sink(plan: LayerPlan, a: torch.Tensor, n_classes: int, tap_z: torch.Tensor | None = None):
    """The accumulator for one fast layer's contribution; ``tap_z``: its output z, when a ReLU tap may write b_c."""
    if isinstance(plan.module, nn.Embedding):
        return _EmbeddingGram(plan, a, n_classes)
    if isinstance(plan.module, _NORM_TYPES):
        return _NormGram(plan, a, n_classes)
    if getattr(plan.module, "groups", 1) > 1:
        return GroupedConvGram(plan, a, n_classes)
    return _LayerGram(plan, a, n_classes, tap_z=tap_z)


def _layer_contribution(plan: LayerPlan, a: torch.Tensor, Bm: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
    """A contribution (batch, C, C) of one layer from its input a and Bm = ∂f/∂z of shape (batch, C, *z.shape[1:]).

    ``strategy`` forces ``"ghost"`` or ``"materialise"`` (tests); by default the cheaper one is used.
    """
    acc = _LayerGram(plan, a, Bm.shape[1], strategy)
    for c in range(Bm.shape[1]):
        acc.add(Bm[:, c])
    return acc.result()
