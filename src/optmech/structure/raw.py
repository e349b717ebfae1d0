"""Parameters the forward uses directly, not through a layer: a positional embedding added to the
activations, a layer scale multiplying them, a class token or a learned query expanded over the batch.

For a parameter P (shape broadcast against the batch's activations h, of size 1 or absent along
the samples' dimension) the per-sample gradient of f_c is a sum of b_c = ∂f_c/∂out over the
dimensions along which P is broadcast, out being the op's result (DESIGN §3, like a bias):

- out = h + P:                               g_c = Σ_broadcast b_c
- out = h ⊙ P:                               g_c = Σ_broadcast b_c ⊙ h
- out = P.expand(n, …):                      g_c = Σ_broadcast b_c
  (a class token then concatenated to the patches, a learned query handed to an attention layer:
  b_c = ∂f_c/∂out gathers every use of the expanded tensor)

and A[c, c'] += ⟨g_c, g_c'⟩ per sample. Such ops leave no module to hook, so while the standalone
``gram`` call's forward runs (not the probe's training-step capture: the user's own training
forward is not watched), a ``TorchFunctionMode`` (:class:`RawUses`) watches the torch calls whose operands
include one of the parameters the layers did not claim and records these three patterns with
their result. A parameter is then contracted this way when it has exactly one recorded use, the
logits' graph consumes it exactly once (no other use went unseen), and the samples' dimension of
the result is known: the only one of the batch's size with the parameter broadcast along it when
that is the first, else the one the backward check of :mod:`.samples` finds among those (a
sequence-first layout); otherwise it goes to the generic path, as before. The mode only observes: every call runs as the model makes it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.overrides import TorchFunctionMode

from ._class_sink import ClassSink
from .contract import class_major_gram

__all__ = ["RawUse", "RawUses", "RawParameterGram"]

_ADD = {"add", "__add__", "__radd__"}
_MUL = {"mul", "__mul__", "__rmul__"}
#: calls that only read metadata (shape, size, dtype, device, … and attribute reads): not a use
_METADATA = {"__get__", "size", "dim", "numel", "__len__", "stride", "is_contiguous", "element_size", "nelement", "ndimension"}


@dataclasses.dataclass
class RawUse:
    """One recorded use of a parameter: ``kind`` add / mul / expand, its result ``out``, the other operand
    (mul), and the version counters of out and the other operand when recorded."""

    kind: str
    out: torch.Tensor
    other: torch.Tensor | None = None
    versions: tuple[int, int] = (0, 0)

    def intact(self) -> bool:
        """Neither the result nor the saved operand was modified in place after the op."""
        return (self.out._version, self.other._version if self.other is not None else 0) == self.versions

    def sample_dims(self, param: torch.Tensor, n: int) -> list[int]:
        """The dimensions that may hold the n samples: of size n, and the parameter broadcast along them."""
        shape = self.out.shape
        aligned = (1,) * (len(shape) - param.dim()) + tuple(param.shape)
        return [d for d in range(len(shape)) if shape[d] == n and aligned[d] == 1]


def _broadcasts_to(p: torch.Tensor, shape: torch.Size) -> bool:
    """p broadcasts to ``shape`` (the result's); along which dimension the samples lie is checked later
    (:meth:`RawUse.sample_dims`: one of the batch's size along which p is broadcast)."""
    try:
        return p.dim() <= len(shape) and torch.broadcast_shapes(p.shape, shape) == shape
    except RuntimeError:
        return False


class RawUses(TorchFunctionMode):
    """Records, during one forward, the add / mul / expand uses of the given parameters (by id)."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.uses: dict[str, list[RawUse]] = {}
        self.unknown: set[str] = set()  # parameters seen in a call that is none of the patterns

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            self._record(getattr(func, "__name__", ""), args, kwargs, out)
        return out

    def _record(self, name: str, args: tuple, kwargs: dict, out) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        mine = [a for a in tensors if id(a) in self.params]
        if not mine or name in _METADATA:
            return
        param = self.params[id(mine[0])]
        if name == "expand" and len(mine) == 1 and args[0] is mine[0] and isinstance(out, torch.Tensor) and _broadcasts_to(mine[0], out.shape):
            self.uses.setdefault(param, []).append(RawUse("expand", out, versions=(out._version, 0)))
            return
        # two tensor operands, one of them the parameter; no out= (nor an alpha other than 1)
        plain = len(args) == 2 and len(tensors) == 2 and len(mine) == 1 and set(kwargs) <= {"alpha"} and kwargs.get("alpha", 1) == 1
        if plain and isinstance(out, torch.Tensor) and (name in _ADD or name in _MUL):
            h = tensors[1] if tensors[0] is mine[0] else tensors[0]
            if h.shape == out.shape and _broadcasts_to(mine[0], out.shape):
                other = h.detach() if name in _MUL else None
                versions = (out._version, other._version if other is not None else 0)
                self.uses.setdefault(param, []).append(RawUse("add" if name in _ADD else "mul", out, other, versions=versions))
                return
        self.unknown.update(self.params[id(t)] for t in mine)


class RawParameterGram(ClassSink):
    """One directly used parameter's share of A_x: the per-sample gradients g_c (n, |P|) of the module
    docstring, class by class, then A = ⟨g_c, g_c'⟩ per sample."""

    strategy = "raw"

    def __init__(self, param: torch.Tensor, use: RawUse, n_classes: int, dim: int = 0) -> None:
        self.use, self.n_classes, self.count, self.dim = use, n_classes, 0, dim  # dim: the samples' dimension of out
        out, shape = use.out, use.out.shape
        aligned = (1,) * (len(shape) - param.dim()) + tuple(param.shape)  # P's shape, padded on the left
        self.reduce = tuple(d for d in range(len(shape)) if d != dim and aligned[d] == 1 and shape[d] != 1)
        self.buffer = torch.empty(n_classes, shape[dim], param.numel(), dtype=out.dtype, device=out.device)

    def add(self, b: torch.Tensor) -> None:
        if self.use.kind == "mul":
            b = b * self.use.other
        g = (b.sum(self.reduce, keepdim=True) if self.reduce else b).movedim(self.dim, 0)
        self.buffer[self.count] = g.reshape(g.shape[0], -1)
        self.count += 1

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return class_major_gram(self.buffer)  # (C, n, |P|)
