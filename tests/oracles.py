"""Slow, obvious references in float64, written independently of the package's code."""

from __future__ import annotations

import torch
from torch import nn


def per_sample_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (batch, C, n_params): one autograd.grad per sample and class over every trainable tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in range(x.shape[0]):
        logits = model(x[b : b + 1])[0]
        rows = []
        for c in range(logits.shape[0]):
            grads = torch.autograd.grad(logits[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.flatten() for g, p in zip(grads, params)]))
        out.append(torch.stack(rows))
    return torch.stack(out)


def structural_oracle(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, J) with A = J Jᵀ per sample, the model in eval mode for the call."""
    was = model.training
    model.eval()
    try:
        J = per_sample_jacobian(model, x)
    finally:
        model.train(was)
    return J @ J.transpose(1, 2), J


def structural_oracle_of(model: nn.Module, logits_of, n: int) -> torch.Tensor:
    """A = J Jᵀ per sample for any call signature: ``logits_of(b)`` returns sample b's logits (C,), computed
    alone; one autograd.grad per sample and class over every trainable tensor, the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    try:
        out = []
        for b in range(n):
            logits = logits_of(b)
            rows = []
            for c in range(logits.shape[0]):
                grads = torch.autograd.grad(logits[c], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.flatten() for g, p in zip(grads, params)]))
            J = torch.stack(rows)
            out.append(J @ J.T)
    finally:
        model.train(was)
    return torch.stack(out)
