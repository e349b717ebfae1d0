"""The interface of a layer's accumulator in the ``gram`` method: the C classes' ∂f/∂z one by one or all at once."""

from __future__ import annotations

import torch

__all__ = ["ClassSink"]


class ClassSink:
    """One layer's accumulator: ``add(b_c)`` for c = 0…C−1, or ``add_classes`` with all C at once, then ``result()``.

    ``add_classes(bs)``, bs of shape (C, n, *z.shape[1:]) (from the one vmapped backward pass), hands
    the whole tensor to :meth:`_take_all` when the sink is fresh; a sink that cannot take it at once
    (``_take_all`` returns False, having done nothing) gets the C classes one by one.
    """

    n_classes: int
    count: int

    def add(self, b: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError

    def _take_all(self, bs: torch.Tensor) -> bool:
        return False

    def add_classes(self, bs: torch.Tensor) -> None:
        if self.count == 0 and bs.shape[0] == self.n_classes and self._take_all(bs):
            self.count = self.n_classes
            return
        for b in bs:
            self.add(b)
