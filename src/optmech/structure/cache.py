"""What the engine keeps between calls, per model, in one object that can be cleared.

The probe calls the engine every step on the same model and shapes, so some facts and buffers are worth
keeping (:class:`ModelCache`). Everything kept lives in the model's cache — nothing in module globals —
so ``clear_cache(model)`` (or ``clear_cache()`` for all models) returns the engine to a first call's state.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["Workspace", "ModelCache", "model_cache", "clear_cache", "SHARED"]

#: owner key of buffers shared by the layers of one model (patches and padded inputs of the same shape:
#: layers contract one after another, so one buffer serves them all and is still in cache when read)
SHARED = "shared"

_SLOTS_PER_OWNER = 4  # e.g. the probe set and the training batch, each with two roles
_SLOTS_SHARED = 24  # patch and padded-input shapes of a whole network, for two batch sizes


class Workspace:
    """Buffers kept between calls, per (owner, role, shape, dtype, device); the least recently used go first.

    Fresh buffers of tens of MB are served by fresh mmaps whose page faults cost more than the copy into them
    (docs/engine.md), and the probe calls the engine with the same shapes every step.
    """

    def __init__(self) -> None:
        self._slots: dict[object, dict[tuple, torch.Tensor]] = {}

    def get(self, owner: object, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            zeroed: bool = False) -> torch.Tensor:
        """A buffer of ``shape`` kept for (owner, role); ``zeroed``: filled with zeros when first made.
        ``owner`` is a module (kept by id while the model lives) or :data:`SHARED`."""
        slots = self._slots.setdefault(owner if owner == SHARED else id(owner), {})
        key = (role, tuple(shape), dtype, device)
        buf = slots.pop(key, None)
        if buf is None:
            buf = (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=device)
        slots[key] = buf  # most recently used last
        while len(slots) > (_SLOTS_SHARED if owner == SHARED else _SLOTS_PER_OWNER):
            slots.pop(next(iter(slots)))
        return buf

    def clear(self) -> None:
        self._slots.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slots in self._slots.values() for t in slots.values())


class ModelCache:
    """The engine's state for one model.

    Attributes:
        workspace: buffers kept between calls (:class:`Workspace`).
        auto: ``auto``'s measured choice per call signature (shape, dtype, device, θ, chunk, per-layer, options).
        copy_output: modules whose output a later in-place op overwrote: their hook hands the model a copy,
            so that the recorded output keeps its value (learned on a first call, which is exact through the
            generic path).
        own_layout: the forward failed on channels-last convolution outputs: ``gram`` runs it in its own layout.
        one_by_one: ``vmap`` could not batch the forward over samples: ``jacobian`` takes samples one at a time.
        warned: the (parameter, reason) sets already reported as generic (said once per model).
        stand_ins: the meta-device Linear modules that stand for recomputed projections (:mod:`.stand_in`).
        plain_output: whether the model, called on one tensor, returns its logits as a tensor (None: not yet seen);
            otherwise :func:`.signature.select_logits` finds them in its output.
        head_basis: (a copy of the logits layer's weight, its :class:`.head.HeadBasis`): the QR of a weight with the
            same values is not recomputed.
    """

    def __init__(self) -> None:
        self.workspace = Workspace()
        self.auto: dict[tuple, str] = {}
        self.copy_output: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.own_layout = False
        self.one_by_one = False
        self.warned: set[frozenset] = set()
        self.stand_ins: dict[tuple, nn.Linear] = {}
        self.plain_output: bool | None = None
        self.head_basis: tuple[torch.Tensor, object] | None = None

    def clear(self) -> None:
        """Forget everything: the next call behaves as a first call."""
        self.__init__()


_CACHES: weakref.WeakKeyDictionary[nn.Module, ModelCache] = weakref.WeakKeyDictionary()


def model_cache(model: nn.Module) -> ModelCache:
    """The engine's cache for ``model`` (made on first use, dropped with the model)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = ModelCache()
    return cache


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget what the engine kept for ``model`` (every model when None): buffers, measured choices, learned facts."""
    if model is None:
        _CACHES.clear()
    elif model in _CACHES:
        _CACHES[model].clear()
