"""The oracle: A_x = J_x J_xᵀ by one ``torch.autograd.grad`` call per sample and per class.

Cost: B forwards and B·C backwards, memory C·|θ| per sample. Slow and obvious on purpose:
every other method is tested against it (DESIGN §4.1).
"""

from __future__ import annotations

import torch
from torch import nn

from ._context import add_group, check_outputs, layer_of


def jacobian_rows_loop(model: nn.Module, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """J_x of one sample, shape (classes, n_params): row c is ∂f_c(x)/∂θ flattened.

    Args:
        model: maps (1, ...) to (1, classes).
        x: one sample with its batch dimension, shape (1, ...).
        params: the parameter tensors making up θ, in order.
    """
    out = check_outputs(model(x), 1)[0]
    rows = []
    for c in range(out.shape[0]):
        grads = torch.autograd.grad(out[c], params, retain_graph=c < out.shape[0] - 1, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def structural_matrix_loop(
    model: nn.Module, inputs: torch.Tensor, named_params: list[tuple[str, torch.Tensor]], groups: dict | None = None
) -> torch.Tensor:
    """A (batch, classes, classes) by the per-sample, per-class autograd loop (per-module shares into ``groups``)."""
    params = [p for _, p in named_params]
    sizes = [p.numel() for p in params]
    mats = []
    with torch.enable_grad():
        for b in range(inputs.shape[0]):
            jac = jacobian_rows_loop(model, inputs[b : b + 1], params)
            mats.append(jac @ jac.T)
            if groups is not None:
                for (name, _), block in zip(named_params, jac.split(sizes, dim=1)):
                    add_group(groups, layer_of(name), slice(b, b + 1), (block @ block.T)[None], inputs.shape[0])
    return torch.stack(mats)
