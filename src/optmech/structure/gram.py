"""A_x layer by layer: per-layer Gram contractions of inputs and backpropagated logit-Jacobians.

For a layer z = W a + b with per-sample input a and B_c = ∂f_c/∂z (one row per class c), the
layer's parameters contribute to A_x (DESIGN §3; Opacus' "ghost norm" generalised to C outputs):

- Linear, a of shape (d_in,):      A[c, c'] += (‖a‖² + 1)·(B_c · B_c')                 (bias: the +1)
- Linear over positions t (a_t):   A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})
- Conv (unfolded patches a_s):     A[c, c'] += Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'}) + bias term

Each position-summed term is computed either in "ghost" form (the S×S Gram of the patches) or
by materialising the per-sample, per-class weight gradient G_c = Σ_s b_{c,s} a_sᵀ and taking
⟨G_c, G_c'⟩, whichever the cost model says is cheaper for that layer.

All B_c come from one forward with hooks and C backward passes of Σ_b f_c(x_b) (samples are
independent under eval semantics, so the summed backward gives every per-sample row). Parameters
the fast path does not know — other module types, tied or reused weights, weights used outside
their module — are handed to the ``torch.func`` path restricted to those parameters; the two
contributions are summed. Never an inexact answer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ._context import check_outputs
from .jacobian import structural_matrix_jacobian

__all__ = ["structural_matrix_gram", "plan_layers", "LayerPlan"]

_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclasses.dataclass
class LayerPlan:
    """How one layer's parameters are handled: ``ghost``, ``materialise``, or ``func`` (fallback)."""

    name: str
    module: nn.Module
    params: list[str]
    strategy: str = "pending"


def _is_fast_layer(module: nn.Module) -> bool:
    if type(module) not in _FAST_TYPES:  # exact types only: subclasses may change forward
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    return True


def _use_counts(output: torch.Tensor) -> dict[int, int]:
    """How many graph edges consume each leaf tensor (id -> count), walking the autograd graph once."""
    counts: dict[int, int] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                counts[id(var)] = counts.get(id(var), 0) + 1
            else:
                stack.append(nxt)
    return counts


def plan_layers(model: nn.Module, named_params: list[tuple[str, torch.Tensor]]) -> tuple[list[LayerPlan], list[str]]:
    """Candidate fast layers (all of whose trainable parameters are in θ) and the remaining names."""
    wanted = {id(p): n for n, p in named_params}
    plans = []
    claimed: set[str] = set()
    for mod_name, module in model.named_modules():
        if not _is_fast_layer(module):
            continue
        own = [p for p in (module.weight, module.bias) if p is not None]
        if not own or not all(id(p) in wanted for p in own):
            continue  # frozen weight or bias: let the generic path deal with the partial layer
        names = [wanted[id(p)] for p in own]
        if any(n in claimed for n in names):
            continue  # the same parameter in two modules: tied, leave to the generic path
        claimed.update(names)
        plans.append(LayerPlan(mod_name, module, names))
    rest = [n for n, _ in named_params if n not in claimed]
    return plans, rest


def _conv_patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches (batch, K = c_in·kernel, S positions) for Conv1d/Conv2d."""
    if isinstance(module, nn.Conv1d):
        a = a.unsqueeze(-2)
        k, d, p, s = (1, module.kernel_size[0]), (1, module.dilation[0]), (0, module.padding[0]), (1, module.stride[0])
    else:
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    return F.unfold(a, k, dilation=d, padding=p, stride=s)


def _cost(B: int, C: int, S: int, K: int, d_out: int) -> tuple[float, float]:
    """Multiply-adds of (ghost, materialise) for one layer with S positions, K inputs, d_out outputs."""
    ghost = B * S * S * K + B * C * C * S * S * d_out
    materialise = B * C * d_out * S * K + B * C * C * d_out * K
    return float(ghost), float(materialise)


def _layer_contribution(plan: LayerPlan, a: torch.Tensor, Bm: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
    """A contribution (batch, C, C) of one layer from its input a and Bm = ∂f/∂z, shape (batch, C, *z.shape[1:]).

    ``strategy`` forces ``"ghost"`` or ``"materialise"`` (tests); by default the cheaper one is used.
    """
    module = plan.module
    n, C = Bm.shape[:2]
    if isinstance(module, nn.Linear):
        a = a.reshape(n, -1, module.in_features)  # (n, T, d_in)
        b = Bm.reshape(n, C, -1, module.out_features)  # (n, C, T, d_out)
    else:
        a = _conv_patches(module, a).transpose(1, 2)  # (n, S, K)
        b = Bm.reshape(n, C, module.out_channels, -1).transpose(2, 3)  # (n, C, S, d_out)
    S, K, d_out = a.shape[1], a.shape[2], b.shape[-1]
    bias = module.bias is not None
    if S == 1 and strategy is None:
        plan.strategy = "ghost"
        scale = (a[:, 0] ** 2).sum(-1) + (1.0 if bias else 0.0)
        bb = b[:, :, 0]
        return scale[:, None, None] * (bb @ bb.transpose(1, 2))
    ghost, materialise = _cost(n, C, S, K, d_out)
    if strategy == "ghost" or (strategy is None and ghost <= materialise):
        plan.strategy = "ghost"
        gram_a = a @ a.transpose(1, 2)  # (n, S, S)
        # A[c,c'] = Σ_{s,s'} gram_a[s,s'] (b_{c,s}·b_{c',s'})
        bt = b.reshape(n, C * S, d_out)
        gram_b = (bt @ bt.transpose(1, 2)).reshape(n, C, S, C, S)
        out = torch.einsum("bst,bcsdt->bcd", gram_a, gram_b)
    else:
        plan.strategy = "materialise"
        G = torch.einsum("bcso,bsk->bcok", b, a).reshape(n, C, d_out * K)
        out = G @ G.transpose(1, 2)
    if bias:
        bsum = b.sum(2)  # (n, C, d_out)
        out = out + bsum @ bsum.transpose(1, 2)
    return out


def structural_matrix_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    named_params: list[tuple[str, torch.Tensor]],
    *,
    n_classes: int,
    chunk_size: int | None = None,
    per_layer: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A (batch, C, C) by per-layer Gram contractions, the rest through torch.func.

    Args:
        model: maps (batch, ...) to (batch, C); called in the current (eval) mode.
        inputs: (batch, ...).
        named_params: θ as (name, tensor) pairs.
        n_classes: C.
        chunk_size: samples per chunk (bounds the memory of activations and B's).
        per_layer: also return {group name: (batch, C, C)} with A = Σ of the groups; a group is a
            fast layer (its module name) or ``"other"`` for everything on the generic path.
    """
    plans, rest = plan_layers(model, named_params)
    by_name = dict(named_params)
    n = inputs.shape[0]
    chunk = n if chunk_size is None else chunk_size
    dtype = named_params[0][1].dtype
    total = torch.zeros(n, n_classes, n_classes, dtype=dtype, device=inputs.device)
    groups: dict[str, torch.Tensor] = {}

    for start in range(0, n, chunk):
        x = inputs[start : start + chunk]
        captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(p.module): [] for p in plans}

        def hook(module, args, output):
            captured[id(module)].append((args[0].detach(), output))

        handles = [p.module.register_forward_hook(hook) for p in plans]
        try:
            with torch.enable_grad():
                out = check_outputs(model(x), x.shape[0])
        finally:
            for h in handles:
                h.remove()
        counts = _use_counts(out) if out.grad_fn is not None else {}
        fast, slow_names = [], list(rest)
        for plan in plans:
            calls = captured[id(plan.module)]
            uses = [counts.get(id(by_name[name]), 0) for name in plan.params]
            if len(calls) == 1 and all(u == 1 for u in uses) and calls[0][1].requires_grad:
                fast.append(plan)
            else:  # reused module, weight used elsewhere too, or not on the graph: exact generic path
                plan.strategy = "func"
                slow_names.extend(plan.params)
        if fast:
            zs = [captured[id(p.module)][0][1] for p in fast]
            rows: list[list[torch.Tensor]] = [[] for _ in fast]
            for c in range(n_classes):
                grads = torch.autograd.grad(out[:, c].sum(), zs, retain_graph=c < n_classes - 1, allow_unused=True)
                for i, g in enumerate(grads):
                    rows[i].append(torch.zeros_like(zs[i]) if g is None else g)
            for plan, row in zip(fast, rows):
                a = captured[id(plan.module)][0][0]
                part = _layer_contribution(plan, a, torch.stack(row, 1))
                total[start : start + chunk] += part
                if per_layer:
                    groups.setdefault(plan.name, torch.zeros_like(total))[start : start + chunk] += part
        del out, captured
        if slow_names:
            keep = set(slow_names)
            part = structural_matrix_jacobian(model, x, [(nm, p) for nm, p in named_params if nm in keep], n_classes=n_classes)
            total[start : start + chunk] += part
            if per_layer:
                groups.setdefault("other", torch.zeros_like(total))[start : start + chunk] += part
    return (total, groups) if per_layer else total
