"""Which dimension of a fast layer's input and output holds the samples.

``gram``'s accumulators read a layer's input a and output z as (n, …): row i of both belongs to sample
i. Convolutions and BatchNorm/GroupNorm take (batch, channels, …) by definition, but a Linear, a
LayerNorm or an Embedding acts on any leading dimensions: in a sequence-first model
(``nn.Transformer``'s default layout) a Linear sees (L, n, E). So:

- a layer whose only leading dimension of size n is the first is read as it is (the samples first);
- otherwise, for a position-wise layer, each leading dimension of size n is a candidate, and one
  backward pass of a random class mix of sample 0's logits tells which holds the samples: the
  gradient at z is nonzero at index 0 along that dimension and zero at every other index. A layer
  with no candidate, or with none or more than one passing, goes to the generic path (exact). The
  accumulator then gets a and every b_c with that dimension moved first (:class:`SamplesMoved`).

What no check here covers: a model that reorders the samples within the batch before a layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ._class_sink import ClassSink
from .plan import _FEATURE_NORMS

__all__ = ["candidate_dims", "sample_dims", "SamplesMoved"]

#: layers that act on any leading dimensions (their samples may lie along another one)
_POSITION_WISE = (nn.Linear, nn.Embedding) + _FEATURE_NORMS


def candidate_dims(module: nn.Module, z: torch.Tensor, n: int) -> list[int]:
    """The dimensions of z that may hold the n samples: for a position-wise layer, its leading (not feature)
    dimensions of size n; for the others, the first if its size is n."""
    if not isinstance(module, _POSITION_WISE):
        return [0] if z.dim() >= 1 and z.shape[0] == n else []
    features = len(module.normalized_shape) if isinstance(module, _FEATURE_NORMS) else 1
    return [d for d in range(z.dim() - features) if z.shape[d] == n]


def sample_dims(out: torch.Tensor, zs: list[torch.Tensor], candidates: list[list[int]]) -> list[int | None]:
    """For each z, the one candidate dimension along which the gradient of a random class mix of sample 0's
    logits is nonzero at index 0 and zero elsewhere, or None (no candidate passes, or several do).
    One backward pass; the graph is kept."""
    mix = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out[0] * mix).sum(), zs, retain_graph=True, allow_unused=True)
    found = []
    for g, dims in zip(grads, candidates):
        passing = []
        for d in dims if g is not None else []:
            rows = g.movedim(d, 0).reshape(g.shape[d], -1)
            if bool(rows[0].ne(0).any()) and not bool(rows[1:].ne(0).any()):
                passing.append(d)
        found.append(passing[0] if len(passing) == 1 else None)
    return found


class SamplesMoved(ClassSink):
    """An accumulator for a layer whose samples lie along dimension ``dim`` of z: it hands the inner one
    every b_c (and the C classes at once) with that dimension first. Its input a is moved by the caller."""

    def __init__(self, inner: ClassSink, dim: int) -> None:
        self.inner, self.dim = inner, dim
        self.n_classes, self.count = inner.n_classes, 0

    def add(self, b: torch.Tensor) -> None:
        self.inner.add(b.movedim(self.dim, 0))
        self.count += 1

    def add_classes(self, bs: torch.Tensor) -> None:
        self.inner.add_classes(bs.movedim(self.dim + 1, 1))
        self.count = self.n_classes

    def result(self) -> torch.Tensor:
        return self.inner.result()
