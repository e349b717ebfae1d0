"""The facts of the logits' autograd graph that ``gram`` relies on.

After the forward, :func:`graph_uses` counts how many graph edges consume each parameter and node, so
that a weight used outside its module, or a layer output with more than one consumer, is noticed, and
:func:`backward_runs` tells whether the backward passes to the layer outputs run a given kind of node (a
convolution's backward, say) (:mod:`.passes`).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["GraphUses", "graph_uses", "backward_runs"]


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
    kinds: set[str] = dataclasses.field(default_factory=set)  # the type names of the nodes

    def has_kind(self, kinds: tuple[str, ...]) -> bool:
        """Whether some node's type name contains one of ``kinds``."""
        return any(kind in name for name in self.kinds for kind in kinds)


def graph_uses(output: torch.Tensor) -> GraphUses:
    """Walk the autograd graph of ``output`` once, counting the consumers of each leaf and node."""
    leaves: dict[int, int] = {}
    consumers: dict[int, int] = {}
    seen: dict[int, object] = {}  # id -> the node itself, so that no id is reused during the walk
    kinds: set[str] = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        kinds.add(type(fn).__name__)
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                leaves[id(var)] = leaves.get(id(var), 0) + 1
            else:
                consumers[id(nxt)] = consumers.get(id(nxt), 0) + 1  # nxt stays alive on the stack, then in seen
                stack.append(nxt)
    return GraphUses(leaves, consumers, seen, kinds)


def backward_runs(out: torch.Tensor, zs: list[torch.Tensor], graph: GraphUses, kinds: tuple[str, ...]) -> bool:
    """Whether the backward passes from ``out`` to ``zs`` run a node whose type name contains one of ``kinds``
    ("Convolution": a convolution's backward).

    autograd runs a node when a path leads from it to one of the targets (the zs' nodes), so the
    passes stop at the first layers' outputs: a network whose only convolution comes first, or is
    contracted at its pool's output (SNet), runs no convolution backward. ``graph`` (the logits'
    :func:`graph_uses`) keeps every node alive, so that node ids stay unique during the walk.
    """
    if not graph.has_kind(kinds):  # no such node anywhere in the graph
        return False
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
