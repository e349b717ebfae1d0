"""Parameters the forward uses directly, not through a layer: a positional embedding added to the
activations, a layer scale multiplying them, a class token or a learned query expanded over the batch.

For a parameter P, or a view V of it (a basic slice ``P[:, :L]``, a reshape, a transpose, …: each
entry of P at most once), broadcast against the batch's activations h (of size 1 or absent along
the samples' dimension), the per-sample gradient of f_c with respect to V is a sum of
b_c = ∂f_c/∂out over the dimensions along which V is broadcast, out being the op's result (DESIGN §3,
like a bias):

- out = h + V (``x += V`` in place too):     g_c = Σ_broadcast b_c
- out = h ⊙ V:                               g_c = Σ_broadcast b_c ⊙ h
- out = V.expand(n, …):                      g_c = Σ_broadcast b_c
  (a class token then concatenated to the patches, a learned query handed to an attention layer:
  b_c = ∂f_c/∂out gathers every use of the expanded tensor)

and A[c, c'] += ⟨g_c, g_c'⟩ per sample: P's gradient is g_c on the entries V holds and 0 elsewhere,
so its Gram is V's. Claims the parameters no module rule claimed. Such ops leave no module to hook, so
while the standalone ``gram`` call's forward runs (``EngineOptions.direct``; not the probe's training-step
capture: the user's own training forward is not watched), a
``TorchFunctionMode`` (:class:`RawUses`) watches the torch calls whose operands include one of the
parameters the layers did not claim, or a view of one, and records these three patterns with their
result. A parameter is then contracted this way when it has exactly one recorded use, the logits'
graph consumes it exactly once and each view on the way exactly once (no other use went unseen),
neither the result nor the saved operand was changed in place afterwards, and the samples'
dimension of the result is known: the only one of the batch's size with V broadcast along it when
that is the first, else the one the backward check of :mod:`.samples` finds among those (a
sequence-first layout); otherwise it goes to the generic path. The mode only observes:
every call runs as the model makes it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._context import layer_of
from ..accumulator import Accumulator
from ..contract import class_major_gram
from .base import Claim, Layer, Record, Rule

__all__ = ["DirectRule", "RawUse", "RawUses", "RawParameterGram"]

_ADD = {"add", "__add__", "__radd__"}
_ADD_IN_PLACE = {"add_", "__iadd__"}  # x += V; not x *= V (the product's gradient needs x as it was)
_MUL = {"mul", "__mul__", "__rmul__"}
#: calls that only read metadata (shape, size, dtype, device, … and attribute reads): not a use
_METADATA = {"__get__", "size", "dim", "numel", "__len__", "stride", "is_contiguous", "element_size", "nelement", "ndimension"}
#: calls whose result holds each entry of their first operand at most once, unchanged (views and copies)
_VIEWS = {"__getitem__", "narrow", "select", "view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "transpose",
          "swapaxes", "permute", "movedim", "t", "contiguous", "clone"}


def _basic_index(index) -> bool:
    """Integers, slices, None and Ellipsis only: the selection holds each entry at most once (no tensor indices)."""
    items = index if isinstance(index, tuple) else (index,)

    def plain(i) -> bool:
        return i is None or i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))

    return all(plain(i) or (isinstance(i, slice) and all(plain(j) for j in (i.start, i.stop, i.step))) for i in items)


@dataclasses.dataclass
class RawUse:
    """One recorded use of a parameter: ``kind`` add / mul / expand, its result ``out``, the other operand
    (mul), the shape of the operand that is the parameter or its view, the views between the parameter and
    that operand (``chain``, each must have one consumer), and the version counters of out and the other
    operand when recorded."""

    kind: str
    out: torch.Tensor
    operand: torch.Size
    chain: list[torch.Tensor] = dataclasses.field(default_factory=list)
    other: torch.Tensor | None = None
    versions: tuple[int, int] = (0, 0)

    def intact(self) -> bool:
        """Neither the result nor the saved operand was modified in place after the op."""
        return (self.out._version, self.other._version if self.other is not None else 0) == self.versions

    def aligned(self) -> tuple[int, ...]:
        """The operand's shape padded on the left to the result's number of dimensions."""
        return (1,) * (self.out.dim() - len(self.operand)) + tuple(self.operand)

    def sample_dims(self, n: int) -> list[int]:
        """The dimensions that may hold the n samples: of size n, and the operand broadcast along them."""
        shape, aligned = self.out.shape, self.aligned()
        return [d for d in range(len(shape)) if shape[d] == n and aligned[d] == 1]


def _broadcasts_to(p: torch.Tensor, shape: torch.Size) -> bool:
    """p broadcasts to ``shape`` (the result's); along which dimension the samples lie is checked later
    (:meth:`RawUse.sample_dims`: one of the batch's size along which p is broadcast)."""
    try:
        return p.dim() <= len(shape) and torch.broadcast_shapes(p.shape, shape) == shape
    except RuntimeError:
        return False


class RawUses(TorchFunctionMode):
    """Records, during one forward, the add / mul / expand uses of the given parameters (by id) and of their views."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.uses: dict[str, list[RawUse]] = {}
        self.unknown: set[str] = set()  # parameters seen in a call that is none of the patterns
        self.views: dict[int, tuple[str, torch.Tensor, list[torch.Tensor]]] = {}  # id(view) -> (parameter, view, chain)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            self._record(getattr(func, "__name__", ""), args, kwargs, out)
        return out

    def _owner(self, t: torch.Tensor) -> tuple[str, list[torch.Tensor]] | None:
        """(the parameter, the views from it to t) when t is a watched parameter or a recorded view of one."""
        if id(t) in self.params:
            return self.params[id(t)], []
        view = self.views.get(id(t))
        return (view[0], view[2]) if view is not None and view[1] is t else None

    def _record(self, name: str, args: tuple, kwargs: dict, out) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        mine = [(a, owner) for a in tensors if (owner := self._owner(a)) is not None]
        if not mine or name in _METADATA:
            return
        operand, (param, chain) = mine[0]
        first = len(mine) == 1 and args[0] is operand and isinstance(out, torch.Tensor)
        if first and name in _VIEWS and len(tensors) == 1 and (name != "__getitem__" or _basic_index(args[1])):
            self.views[id(out)] = (param, out, chain + [out])
            return
        if first and name == "expand" and _broadcasts_to(operand, out.shape):
            self.uses.setdefault(param, []).append(RawUse("expand", out, operand.shape, chain, versions=(out._version, 0)))
            return
        # two tensor operands, one of them the parameter or its view; no out= (nor an alpha other than 1)
        plain = len(args) == 2 and len(tensors) == 2 and len(mine) == 1 and set(kwargs) <= {"alpha"} and kwargs.get("alpha", 1) == 1
        if plain and isinstance(out, torch.Tensor) and (name in _ADD or name in _MUL or name in _ADD_IN_PLACE):
            h = tensors[1] if tensors[0] is operand else tensors[0]
            # in place: x += V with x the target, not a view (its gradient is then that of the add's result)
            in_place_ok = name not in _ADD_IN_PLACE or (tensors[0] is h and out is h and h._base is None)
            if in_place_ok and h.shape == out.shape and _broadcasts_to(operand, out.shape):
                other = h.detach() if name in _MUL else None
                versions = (out._version, other._version if other is not None else 0)
                kind = "mul" if name in _MUL else "add"
                self.uses.setdefault(param, []).append(RawUse(kind, out, operand.shape, chain, other, versions))
                return
        self.unknown.update(owner[0] for _, owner in mine)


class RawParameterGram(Accumulator):
    """One directly used parameter's share of A_x: the per-sample gradients g_c (n, |V|) of the module
    docstring, class by class, then A = ⟨g_c, g_c'⟩ per sample."""

    form = "direct"

    def __init__(self, use: RawUse, n_classes: int, dim: int = 0) -> None:
        self.target = use.out
        self.use, self.n_classes, self.count, self.dim = use, n_classes, 0, dim  # dim: the samples' dimension of out
        out, aligned = use.out, use.aligned()
        self.reduce = tuple(d for d in range(out.dim()) if d != dim and aligned[d] == 1 and out.shape[d] != 1)
        self.buffer = torch.empty(n_classes, out.shape[dim], use.operand.numel(), dtype=out.dtype, device=out.device)

    def add(self, b: torch.Tensor) -> None:
        if self.use.kind == "mul":
            b = b * self.use.other
        g = (b.sum(self.reduce, keepdim=True) if self.reduce else b).movedim(self.dim, 0)
        self.buffer[self.count] = g.reshape(g.shape[0], -1)
        self.count += 1

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return class_major_gram(self.buffer, into)  # (C, n, |V|)


class _Watching:
    """The handle of a running :class:`RawUses` mode: ``remove()`` ends it (as a hook handle is removed)."""

    def __init__(self, mode: RawUses) -> None:
        self.mode = mode
        mode.__enter__()

    def remove(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


class DirectRule(Rule):
    """Parameters used directly, not through a module (the module docstring). It claims the parameters no module
    rule claimed; its layers are the recorded uses, made after each forward."""

    name = "direct"
    moves_samples = False

    def matches(self, module: nn.Module) -> bool:
        return False  # claims parameters, not modules: :meth:`claim_rest`

    def claim_rest(self, names: list[str]) -> Claim:
        return Claim(self, None, list(names), [])

    def install(self, capture, claims: list[Claim]) -> list:
        watched = {id(capture.by_name[name]): name for claim in claims for name in claim.params}
        uses = capture.scratch[self.name] = RawUses(watched)
        return [_Watching(uses)]

    def after_forward(self, capture, claim: Claim) -> None:
        """One layer per parameter the forward used: its recorded uses, or (seen only in other calls) none."""
        uses: RawUses | None = capture.scratch.get(self.name)
        if uses is None:
            return
        for name in [*uses.uses, *(n for n in uses.unknown if n not in uses.uses)]:
            layer = claim.made[name] = Layer(layer_of(name), None, [name], self)
            recorded = uses.uses.get(name) or [None]
            for use in recorded:
                out = use.out if use is not None else None
                capture.record(layer, Record(None, out, out._version if out is not None else 0, extra=(use, name in uses.unknown)))

    def check(self, layer: Layer, records: list[Record], graph, n: int, capture) -> list[int] | str:
        """One recorded use, the only consumer of the parameter and of each view on the way, intact, with a
        dimension of the batch's size along which the parameter is broadcast."""
        use, unknown = records[0].extra
        if unknown:
            return "used directly in an op the fast path does not follow (it follows add, multiply and expand)"
        if len(records) != 1 or graph.leaves.get(id(capture.by_name[layer.params[0]]), 0) != 1:
            return "used directly in more than one place, or also through an op that was not seen"
        if any(graph.consumers.get(id(v.grad_fn), 0) != 1 for v in use.chain):
            return "a view of it is used elsewhere too"
        if not (use.intact() and use.out.requires_grad):
            return "the result of its use was modified in place"
        return use.sample_dims(n) or "no dimension of the result of its use has the batch's size with the parameter broadcast along it"

    def accumulator(self, layer: Layer, record: Record, ctx) -> RawParameterGram:
        return RawParameterGram(record.extra[0], ctx.n_classes, record.sample_dim)
