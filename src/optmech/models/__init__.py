"""Model families of the paper and the table mapping its models a–d to them.

``build(name, depth=k, skip=...)`` builds a family; ``build_paper("a", depth=k)`` builds one of the
paper's models through a mapping. Fig. 1 of the paper is an image that did not survive, so the
mapping is a reconstruction (READING.md §3): ``reconstruction`` (default; H1: a/b = ResNet class
plain/skip, c/d = SNet plain/skip), ``swapped`` (H2: the pairs exchanged) and ``authors-code``
(the labels in the authors' plotting code for their earlier paper: a = LNet, b = CNet, c = SNet
with skip, d = ResNet with skip).
"""

from __future__ import annotations

import torch
from torch import nn

from .families import CNN, MLP, ResNet, SNet, expected_n_params
from .init import INIT_SCHEMES, apply_init

__all__ = ["build", "build_paper", "paper_spec", "FAMILIES", "PAPER_MAPPINGS", "INIT_SCHEMES", "expected_n_params", "n_params"]

FAMILIES: dict[str, type[nn.Module]] = {"mlp": MLP, "snet": SNet, "cnn": CNN, "resnet": ResNet}

#: mapping name -> paper letter -> (family, skip)
PAPER_MAPPINGS: dict[str, dict[str, tuple[str, bool]]] = {
    "reconstruction": {"a": ("resnet", False), "b": ("resnet", True), "c": ("snet", False), "d": ("snet", True)},
    "swapped": {"a": ("snet", False), "b": ("snet", True), "c": ("resnet", False), "d": ("resnet", True)},
    "authors-code": {"a": ("mlp", False), "b": ("cnn", False), "c": ("snet", True), "d": ("resnet", True)},
}


def n_params(model: nn.Module) -> int:
    """|θ|: elements of every parameter with requires_grad (tied tensors once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(
    name: str,
    *,
    depth: int,
    skip: bool = False,
    init: str = "pytorch",
    dropout: float = 0.0,
    input_shape: tuple[int, ...] = (1, 28, 28),
    n_classes: int = 10,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build a model family.

    Args:
        name: ``mlp`` (LNet), ``snet``, ``cnn`` (CNet) or ``resnet`` (the ResNet class).
        depth: k ≥ 0, the number of repeated blocks (layers).
        skip: identity shortcuts on the repeated blocks.
        init: one of :data:`INIT_SCHEMES`.
        dropout: probability after hidden activations (0 adds no module).
        input_shape: (channels, height, width) of one input.
        n_classes: C, the number of logits.
        seed: if given, parameters are drawn from ``torch.manual_seed(seed)`` without touching the
            global RNG stream.
        dtype: parameter dtype.
    """
    if name not in FAMILIES:
        hint = " Paper letters a–d go through build_paper()." if name in ("a", "b", "c", "d") else ""
        raise ValueError(f"model: unknown family {name!r}; expected one of {list(FAMILIES)}.{hint}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth: expected an integer k ≥ 0, got {depth!r} instead.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r} instead.")
    shape = tuple(int(s) for s in input_shape)
    if name != "mlp" and (len(shape) != 3 or shape[1] < 4 or shape[2] < 4):
        raise ValueError(
            f"input_shape: expected (channels, height, width) with height, width ≥ 4 for {name!r}, got {input_shape!r} instead."
        )
    if n_classes < 2:
        raise ValueError(f"n_classes: expected at least 2, got {n_classes} instead.")
    if init not in INIT_SCHEMES:
        raise ValueError(f"init: unknown initialisation {init!r}; expected one of {list(INIT_SCHEMES)}.")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = FAMILIES[name](depth, skip, shape, n_classes, dropout)
        apply_init(model, init)
    return model.to(dtype)


def paper_spec(letter: str, mapping: str = "reconstruction") -> tuple[str, bool]:
    """(family, skip) of the paper's model ``letter`` under ``mapping``."""
    if mapping not in PAPER_MAPPINGS:
        raise ValueError(f"mapping: unknown a–d mapping {mapping!r}; expected one of {list(PAPER_MAPPINGS)}.")
    table = PAPER_MAPPINGS[mapping]
    if letter not in table:
        raise ValueError(f"model: unknown paper model {letter!r}; expected one of {list(table)} or a family {list(FAMILIES)}.")
    return table[letter]


def build_paper(letter: str, *, depth: int, mapping: str = "reconstruction", **kwargs) -> nn.Module:
    """Build the paper's model ``letter`` (a–d) with k = ``depth`` under ``mapping``."""
    family, skip = paper_spec(letter, mapping)
    return build(family, depth=depth, skip=skip, **kwargs)
