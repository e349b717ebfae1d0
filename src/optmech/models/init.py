"""Initialisation schemes for Linear and Conv layers (READING.md §2: the Fig. 5 claims depend on it).

- ``pytorch``: leave PyTorch's default (weights kaiming_uniform_(a=√5) = U(±1/√fan_in), biases
  U(±1/√fan_in)). This is what the authors' code used.
- ``he_normal`` / ``he_uniform``: kaiming_{normal,uniform}_(fan_in, ReLU gain), zero bias.
- ``xavier_normal`` / ``xavier_uniform``: Glorot, zero bias.
- ``orthogonal``: orthogonal weights (flattened per output unit), zero bias.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_WEIGHT_INITS: dict[str, Callable[[torch.Tensor], object] | None] = {
    "pytorch": None,
    "he_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "orthogonal": nn.init.orthogonal_,
}

INIT_SCHEMES = tuple(_WEIGHT_INITS)


def apply_init(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every Linear/Conv layer of ``model`` in place with ``scheme``; returns the model."""
    if scheme not in _WEIGHT_INITS:
        raise ValueError(f"init: unknown initialisation {scheme!r}; expected one of {list(INIT_SCHEMES)}.")
    init = _WEIGHT_INITS[scheme]
    if init is None:
        return model
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
