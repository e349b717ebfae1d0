"""What the callbacks share: moving a batch (a tensor, a tuple/list or a mapping of them) to the model's device."""

from __future__ import annotations

from typing import Any

import torch


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` with every tensor moved to ``device`` (structure kept; other values as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs
