"""Which parameters ``gram`` takes layer by layer, and the facts of the logits' graph it relies on.

A layer is *fast* when its type is one whose contribution to A_x has a closed form (Linear, Conv1d,
Conv2d, Conv3d, grouped ones included, Embedding, the normalisation layers on per-sample statistics: see
:mod:`.gram`) and all its trainable parameters are in θ; a parameter claimed by two modules (tied
weights) is left to the generic path. After the forward, :func:`_graph_uses` counts how many graph
edges consume each parameter and node, so that a weight used outside its module, or a layer output
with more than one consumer, is noticed, and :func:`_backward_runs` tells whether the
backward passes to the layer outputs run a given kind of node (a convolution's backward, say) (:mod:`.passes`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["LayerPlan", "GraphUses", "plan_layers"]

_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: layers that normalise over trailing feature dimensions (``nn.RMSNorm`` from torch 2.4 on)
_FEATURE_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm) + _FEATURE_NORMS


@dataclasses.dataclass
class LayerPlan:
    """How one layer's parameters are handled: ``ghost``, ``materialise``, or ``func`` (fallback)."""

    name: str
    module: nn.Module
    params: list[str]
    strategy: str = "pending"


def _is_fast_layer(module: nn.Module) -> bool:
    if type(module) is nn.Embedding:  # max_norm renormalises in place, scale_grad_by_freq couples samples
        return module.max_norm is None and not module.scale_grad_by_freq
    if type(module) in _NORM_TYPES:  # elementwise affine z = x̂·γ + β; BatchNorm only on running statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.running_mean is not None and module.running_var is not None
        return True
    # exact types only (subclasses may change forward); convolutions grouped ones too (:mod:`.grouped`), with
    # any padding and padding mode (:mod:`.patches`)
    return type(module) in _FAST_TYPES


@dataclasses.dataclass
class GraphUses:
    """How many edges of the logits' autograd graph consume each leaf tensor and each node (by id).

    ``nodes`` keeps every visited node alive while this object lives: torch (2.11 at least) makes a
    Python wrapper per access and frees it after, so the id of a freed node could come back as
    another node's (the walk would skip it as seen, and its parameters' uses would go uncounted).
    """

    leaves: dict[int, int]
    consumers: dict[int, int]
    nodes: dict[int, object]


def _graph_uses(output: torch.Tensor) -> GraphUses:
    """Walk the autograd graph of ``output`` once, counting the consumers of each leaf and node."""
    leaves: dict[int, int] = {}
    consumers: dict[int, int] = {}
    seen: dict[int, object] = {}  # id -> the node itself, so that no id is reused during the walk
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                leaves[id(var)] = leaves.get(id(var), 0) + 1
            else:
                consumers[id(nxt)] = consumers.get(id(nxt), 0) + 1  # nxt stays alive on the stack, then in seen
                stack.append(nxt)
    return GraphUses(leaves, consumers, seen)


def _backward_runs(out: torch.Tensor, zs: list[torch.Tensor], graph: GraphUses, kinds: tuple[str, ...]) -> bool:
    """Whether the backward passes from ``out`` to ``zs`` run a node whose type name contains one of ``kinds``
    ("Convolution": a convolution's backward).

    autograd runs a node when a path leads from it to one of the targets (the zs' nodes), so the
    passes stop at the first layers' outputs: a network whose only convolution comes first, or is
    contracted at its pool's output (SNet), runs no convolution backward. ``graph`` (the logits'
    :func:`_graph_uses`) keeps every node alive, so that node ids stay unique during the walk.
    """
    targets = {id(z.grad_fn) for z in zs if z.grad_fn is not None}
    reaches: dict[int, bool] = {}  # node id -> a target lies at or below it
    stack = [(out.grad_fn, False)] if out.grad_fn is not None else []
    while stack:
        fn, expanded = stack.pop()
        if not expanded:
            if id(fn) in reaches:
                continue
            reaches[id(fn)] = False  # provisional: the graph is acyclic
            stack.append((fn, True))
            stack.extend((nxt, False) for nxt, _ in fn.next_functions if nxt is not None and id(nxt) not in reaches)
            continue
        runs = any(nxt is not None and reaches.get(id(nxt), False) for nxt, _ in fn.next_functions)
        if runs and any(kind in type(fn).__name__ for kind in kinds):
            return True
        reaches[id(fn)] = runs or id(fn) in targets
    return False


def plan_layers(model: nn.Module, named_params: list[tuple[str, torch.Tensor]]) -> tuple[list[LayerPlan], list[str]]:
    """Candidate fast layers (all of whose trainable parameters are in θ) and the remaining names."""
    wanted = {id(p): n for n, p in named_params}
    plans = []
    claimed: set[str] = set()
    for mod_name, module in model.named_modules():
        if not _is_fast_layer(module):
            continue
        own = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        if not own or not all(id(p) in wanted for p in own):
            continue  # frozen weight or bias: let the generic path deal with the partial layer
        names = [wanted[id(p)] for p in own]
        if any(n in claimed for n in names):
            continue  # the same parameter in two modules: tied, leave to the generic path
        claimed.update(names)
        plans.append(LayerPlan(mod_name, module, names))
    rest = [n for n, _ in named_params if n not in claimed]
    return plans, rest

