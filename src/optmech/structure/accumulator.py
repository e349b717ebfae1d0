"""The interface of a rule's accumulator: it receives b_c = ∂f_c/∂z for the C classes and returns its share of A_x.

Every rule (:mod:`.rules`) builds one accumulator per recorded layer. The backward passes (:mod:`.passes`)
hand it b_c for c = 0…C−1 one by one (``add``) or all at once (``add_classes``, from one vmapped pass);
``result()`` then gives the layer's share (n, C, C). ``target`` is the tensor whose gradient it reads (the
layer's output z, or what the rule chose instead: a pool's output), ``form`` how it contracts.

Two wrappers adapt what an accumulator is handed: :class:`SamplesMoved` (the samples lie along another
dimension of z than the first) and :class:`GradientScaled` (b_c ⊙ m, with m a factor the forward recorded).
"""

from __future__ import annotations

import torch

__all__ = ["Accumulator", "SamplesMoved", "GradientScaled"]


class Accumulator:
    """One layer's accumulator: ``add(b_c)`` for c = 0…C−1, or ``add_classes`` with all C at once, then ``result()``.

    ``add_classes(bs)``, bs of shape (C, n, *z.shape[1:]) (from the one vmapped backward pass), hands
    the whole tensor to :meth:`_take_all` when the accumulator is fresh; one that cannot take it at once
    (``_take_all`` returns False, having done nothing) gets the C classes one by one.
    """

    n_classes: int
    count: int
    #: how the share is contracted (reported per parameter in the route report)
    form: str = "?"
    #: the tensor whose gradient b_c = ∂f_c/∂target this accumulator reads (set by the rule, or the layer's output)
    target: torch.Tensor | None = None
    #: False: the share needs no b_c (a closed form); the backward passes leave the layer out
    reads_gradient: bool = True
    #: whether a ReLU tap writes b_c into this accumulator's buffer (one class per backward pass then)
    tapped: bool = False

    #: (h, W): the backward passes of the other layers may start at h with the cotangents W[c] instead of at the
    #: logits with one-hot ones (the logits layer f = h Wᵀ + b: ∂f_c/∂h = W[c]); None otherwise
    seed: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, b: torch.Tensor) -> None:
        raise NotImplementedError

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's share (n, C, C), as a new tensor or (``into``) added into it."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        return self.contract(None)

    def add_into(self, total: torch.Tensor) -> None:
        """total += this layer's share (n, C, C), without forming it apart where the contraction can accumulate."""
        self.contract(total)

    def _take_all(self, bs: torch.Tensor) -> bool:
        return False

    def add_classes(self, bs: torch.Tensor) -> None:
        if self.count == 0 and bs.shape[0] == self.n_classes and self._take_all(bs):
            self.count = self.n_classes
            return
        for b in bs:
            self.add(b)


class _Wrapped(Accumulator):
    def __init__(self, inner: Accumulator) -> None:
        self.inner = inner
        self.n_classes, self.count = inner.n_classes, 0
        self.form, self.target, self.tapped = inner.form, inner.target, inner.tapped
        self.reads_gradient, self.seed = inner.reads_gradient, inner.seed

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.contract(into)


class SamplesMoved(_Wrapped):
    """An accumulator for a layer whose samples lie along dimension ``dim`` of z: it hands the inner one
    every b_c (and the C classes at once) with that dimension first. Its input a is moved by the caller."""

    def __init__(self, inner: Accumulator, dim: int) -> None:
        super().__init__(inner)
        self.dim = dim

    def add(self, b: torch.Tensor) -> None:
        self.inner.add(b.movedim(self.dim, 0))
        self.count += 1

    def add_classes(self, bs: torch.Tensor) -> None:
        self.inner.add_classes(bs.movedim(self.dim + 1, 1))
        self.count = self.n_classes


class GradientScaled(_Wrapped):
    """An accumulator handed b_c ⊙ m instead of b_c (GRU's hidden-to-hidden part: m = [1, 1, r_t], the
    z's shape, with ∂f_c/∂w_t = ∂f_c/∂u_t ⊙ m_t)."""

    def __init__(self, inner: Accumulator, scale: torch.Tensor) -> None:
        super().__init__(inner)
        self.scale = scale

    def add(self, b: torch.Tensor) -> None:
        self.inner.add(b * self.scale)
        self.count += 1

    def add_classes(self, bs: torch.Tensor) -> None:
        self.inner.add_classes(bs * self.scale)
        self.count = self.n_classes
