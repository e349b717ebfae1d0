"""Models of any call signature: a batch given as a tensor, a tuple or a mapping of tensors, and an output that is a
tensor, a tuple, a mapping or an object with ``.logits`` (Hugging Face's ``ModelOutput``).

The engine differentiates one function of one tensor, ``f(x) -> logits (n, C)``. :func:`bound` makes any model
that function for the duration of a call, without wrapping it in another module (parameter and module names,
hooks and the model's cache stay the model's own):

- the output is reduced to its logits by :func:`select_logits` (``output=`` chooses: a key, an attribute, an index
  or a callable);
- a structured batch (a tuple of positional inputs, a mapping of keyword inputs) is held aside and the engine is
  handed the sample indices ``arange(n)``: the model's forward is, for that time, ``idx ↦ model(*rows)`` or
  ``model(**rows)`` with each tensor's rows ``t[idx]``. Slicing, chunking and ``vmap`` over samples act on the
  indices, and each tensor follows; tensors are split along dimension 0, other values are passed as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Batch", "bound", "is_bound", "select_logits", "OutputSelector", "OutputSelectionError"]

#: what ``output=`` may be: a mapping key or attribute name, a tuple index, or a function of the model's output
OutputSelector = str | int | Callable[[Any], torch.Tensor] | None


class OutputSelectionError(Exception):
    """The logits could not be found in the model's output (raised as a TypeError or a ValueError)."""


class _NoLogits(OutputSelectionError, TypeError):
    pass


class _SelectorFailed(OutputSelectionError, ValueError):
    pass


def _kind(out: object) -> str:
    return type(out).__name__


def select_logits(out: object, output: OutputSelector = None) -> object:
    """The logits in a model's output.

    With ``output=None``: a tensor is the logits; otherwise an object with a ``logits`` attribute (Hugging Face
    ``ModelOutput``), a mapping with a ``"logits"`` key, or a tuple/list whose first item is a tensor. With
    ``output``: a key or attribute name (str), an index (int) or a function of the output. The result is checked
    by the caller (a (batch, classes) tensor).
    """
    if output is not None:
        try:
            if callable(output):
                return output(out)
            if isinstance(output, int) and not isinstance(output, bool):
                return out[output]
            if isinstance(output, str):
                return out[output] if isinstance(out, Mapping) else getattr(out, output)
        except (KeyError, IndexError, AttributeError, TypeError) as err:
            raise _SelectorFailed(
                f"output: could not select {output!r} from the model's output of type {_kind(out)} ({type(err).__name__}: "
                f"{err}). Pass a key or attribute name (str), an index (int) or a function that returns the logits."
            ) from None
        raise TypeError(f"output: expected a str, an int or a callable, got {type(output).__name__} instead.")
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise _NoLogits(
        f"model output: expected logits (batch, classes) as a tensor, an object with .logits, a mapping with 'logits' or "
        f"a tuple whose first item is the logits, got {_kind(out)} instead. Pass output=... (a key or attribute name, "
        "an index, or a function of the output that returns the logits)."
    )


class Batch:
    """A batch of inputs split along dimension 0: one tensor, positional tensors (tuple/list) or keyword tensors
    (mapping). Tensors must share their first dimension n ≥ 1; non-tensor values are passed through unchanged."""

    def __init__(self, inputs: object, name: str = "inputs") -> None:
        self.name = name
        if isinstance(inputs, torch.Tensor):
            self.kind, self.items = "tensor", {0: inputs}
        elif isinstance(inputs, Mapping):
            if not all(isinstance(k, str) for k in inputs):
                raise TypeError(f"{name}: expected a mapping with str keys (keyword arguments of forward), got keys "
                                f"{[k for k in inputs if not isinstance(k, str)][:3]}.")
            self.kind, self.items = "mapping", dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            self.kind, self.items = "tuple", dict(enumerate(inputs))
        else:
            raise TypeError(
                f"{name}: expected a tensor (batch, ...), a tuple of tensors (positional inputs) or a mapping of tensors "
                f"(keyword inputs), got {type(inputs).__name__} instead."
            )
        tensors = {k: v for k, v in self.items.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(f"{name}: expected at least one tensor, got {self.describe()}.")
        sizes = {k: (v.shape[0] if v.dim() else None) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(
                f"{name}: expected every tensor to have the same batch size along dimension 0, got {self.describe()}. "
                "Split each input along its first dimension (one row per sample)."
            )
        self.size = next(iter(sizes.values()))

    def describe(self) -> str:
        def one(v: object) -> str:
            return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else type(v).__name__

        if self.kind == "tensor":
            return f"shape {one(self.items[0])}"
        if self.kind == "mapping":
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in self.items.items()) + "}"
        return "(" + ", ".join(one(v) for v in self.items.values()) + ")"

    def map(self, fn: Callable[[str | int, torch.Tensor], torch.Tensor]) -> Batch:
        """A batch of the same structure with ``fn(key, t)`` for every tensor t."""
        new = object.__new__(Batch)
        new.name, new.kind, new.size = self.name, self.kind, self.size
        new.items = {k: fn(k, v) if isinstance(v, torch.Tensor) else v for k, v in self.items.items()}
        return new

    def call(self, model: Callable, rows: torch.Tensor | None = None) -> object:
        """``model(...)`` on the whole batch or on the rows ``rows`` (indices into dimension 0)."""
        items = self.items if rows is None else {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in self.items.items()}
        if self.kind == "mapping":
            return model(**items)
        return model(*items.values())

    @property
    def tensor(self) -> torch.Tensor | None:
        """The tensor itself for a single-tensor batch, else None."""
        return self.items[0] if self.kind == "tensor" else None


def is_bound(model: nn.Module) -> bool:
    """Whether ``model.forward`` is, now, the one :func:`bound` put in place (a function of one tensor → logits)."""
    return getattr(model.__dict__.get("forward"), "_optmech_bound", False)


@contextlib.contextmanager
def bound(model: nn.Module, inputs: object, output: OutputSelector = None, *, cache=None,
          name: str = "inputs") -> Iterator[torch.Tensor]:
    """For the duration, ``model`` is a function of one tensor returning logits; yields that tensor.

    A single tensor whose model is known to return a tensor (``cache.plain_output``, :class:`.cache.ModelCache`)
    is yielded as it is and nothing changes. Otherwise ``model.forward`` is replaced (an instance attribute,
    removed afterwards) by one that selects the logits (:func:`select_logits`; a tensor output is the logits
    itself, so the first call of a plain model runs unchanged and teaches the cache that it is plain), and for a
    tuple or mapping batch the yielded tensor is ``arange(n)`` on the model's device, the forward indexing every
    input with it.
    """
    batch = inputs if isinstance(inputs, Batch) else Batch(inputs, name)
    if batch.kind == "tensor" and output is None and (is_bound(model) or (cache is not None and cache.plain_output)):
        yield batch.tensor
        return
    original = model.forward
    learn = cache is not None and batch.kind == "tensor" and output is None and cache.plain_output is None

    def logits_of(out):
        if learn and cache.plain_output is None:
            cache.plain_output = isinstance(out, torch.Tensor)
        return select_logits(out, output)

    if batch.kind == "tensor":
        def forward(x):
            return logits_of(original(x))
        x = batch.tensor
    else:
        def forward(idx):
            return logits_of(batch.call(original, idx))
        x = torch.arange(batch.size, device=next(model.parameters()).device)
    forward._optmech_bound = True
    had = "forward" in model.__dict__
    model.forward = forward
    try:
        yield x
    finally:
        if had:
            model.forward = original
        else:
            del model.forward
