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
  accumulator then gets a and every b_c with that dimension moved first (:class:`.accumulator.SamplesMoved`).

What no check here covers: a model that reorders the samples within the batch before a layer.
"""

from __future__ import annotations

import torch

__all__ = ["candidate_dims", "sample_dims"]


def candidate_dims(z: torch.Tensor, n: int, feature_dims: int | None) -> list[int]:
    """The dimensions of z that may hold the n samples: for a position-wise layer (``feature_dims`` trailing
    feature dimensions), its leading dimensions of size n; for the others (None), the first if its size is n."""
    if feature_dims is None:
        return [0] if z.dim() >= 1 and z.shape[0] == n else []
    return [d for d in range(z.dim() - feature_dims) if z.shape[d] == n]


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
