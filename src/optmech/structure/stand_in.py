"""What the hooks that recompute a module's call in steps share (:mod:`.rules.attention`, :mod:`.rules.recurrent`).

- :func:`stand_in`: a Linear module on the meta device (no memory) with one recomputed projection's
  shape, kept in the model's cache per owner module and key, that the projection's layer and the
  accumulators' buffers are keyed by;
- :func:`matches`: whether a recomputed output equals the module's own, to rounding (:data:`MATCH`),
  before the hook hands it on in place of the module's.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import ModelCache

__all__ = ["MATCH", "matches", "stand_in"]

#: largest |recomputed − module output| allowed, relative to the largest |module output|, per dtype
MATCH = {torch.float64: 1e-10, torch.float32: 1e-4}

def stand_in(cache: ModelCache, owner: nn.Module, role, d_in: int, d_out: int, bias: bool) -> nn.Linear:
    """The Linear (d_in → d_out, meta tensors) standing for ``owner``'s projection ``role``, kept in the model's cache."""
    key = (id(owner), role, d_in, d_out, bias)
    if key not in cache.stand_ins:
        cache.stand_ins[key] = nn.Linear(d_in, d_out, bias=bias, device="meta")
    return cache.stand_ins[key]


def matches(own: torch.Tensor, mine: torch.Tensor) -> bool:
    """Same shape, and max |mine − own| ≤ MATCH[dtype] · max |own| (NaN in both at a place counts as equal)."""
    if own.shape != mine.shape:
        return False
    with torch.no_grad():
        scale = own.abs().nan_to_num(0.0).max().clamp_min(torch.finfo(own.dtype).tiny)
        both_nan = mine.isnan() & own.isnan()
        return bool((mine - own).abs().masked_fill(both_nan, 0.0).max().nan_to_num(float("inf")) <= MATCH[own.dtype] * scale)
