"""What a rule is: the parameters it claims, how it records a forward, and how its accumulator contracts.

``gram`` (:mod:`..capture`) knows no module by name: it asks each rule of the registry (:mod:`.`) which
modules it handles and which of their parameters it claims, lets the rule's hooks record the forward, checks
what was recorded with the rule's :meth:`Rule.check`, and hands each recorded layer's input and output to the
rule's accumulator. A rule:

- ``kinds``, :meth:`Rule.matches`: the module types it handles (exact types: a subclass may change ``forward``);
- :meth:`Rule.parameters`: the parameters of such a module it claims (all must be in θ and claimed by no
  other module, else the generic path takes them);
- :meth:`Rule.claims`: the :class:`Claim` and its :class:`Layer` s (what the backward passes reach);
- :meth:`Rule.install`: its forward hooks (by default one that records (input, output) of each claimed module;
  a *recompute hook* hands the model the module's output computed in steps the backward passes can reach);
- :meth:`Rule.check`: after the forward, the dimensions of a layer's output that may hold the samples, or the
  reason the layer goes to the generic path;
- :meth:`Rule.accumulator`: the accumulator (:mod:`..accumulator`) that turns b_c = ∂f_c/∂z and the layer's
  input into its share of A_x.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..accumulator import Accumulator

if TYPE_CHECKING:  # pragma: no cover
    from ..capture import ForwardCapture
    from ..graph import GraphUses

__all__ = ["Rule", "Claim", "Layer", "Record", "AccumulatorContext"]


@dataclasses.dataclass(eq=False)
class Layer:
    """One place the backward passes reach: a module (or a meta-device stand-in for a recomputed projection)
    whose recorded input a and output z give the share of the θ names ``params``.

    ``name`` groups the share in per-layer results (the module path, "(root)" for the model itself);
    ``feature_dims``: for a position-wise layer (Linear, LayerNorm, Embedding), the number of trailing feature
    dimensions of z (its samples may lie along any other dimension); None: the samples are z's first dimension.
    """

    name: str
    module: nn.Module | None
    params: list[str]
    rule: Rule
    feature_dims: int | None = None
    key: object = None  # the rule's own key for the layer (a recurrent module's (kind, layer, direction))


@dataclasses.dataclass(eq=False)
class Claim:
    """A rule's hold on some parameters of θ: the layers that carry their share.

    ``layers`` are fixed when the claim is made; ``made`` holds layers a forward makes (an attention call's
    in-projection blocks, the uses of a direct parameter) and is emptied before each forward. ``whole``: the
    layers are fast together or not at all (blocks of one packed weight).
    """

    rule: Rule
    module: nn.Module | None
    params: list[str]
    layers: list[Layer]
    whole: bool = False
    made: dict = dataclasses.field(default_factory=dict)

    def all_layers(self) -> list[Layer]:
        return self.layers + list(self.made.values())


@dataclasses.dataclass
class Record:
    """What a hook recorded of one call of a layer: its input ``a`` (detached), its output ``z`` (with its
    graph) and z's version counter then; ``scale``: a factor on z's gradient (GRU's hh); ``extra``: the rule's own."""

    a: torch.Tensor | None
    z: torch.Tensor
    version: int
    scale: torch.Tensor | None = None
    extra: object = None
    input: torch.Tensor | None = None  # the input as the forward saw it, with its graph (the logits layer's seed)
    sample_dim: int = 0  # the dimension of z holding the samples (set by the capture after the checks)


@dataclasses.dataclass
class AccumulatorContext:
    """What an accumulator may use besides its layer's record: C, the options, the model's workspace, the
    logits' graph facts, and the capture's per-forward notes (``scratch``, keyed by rule)."""

    n_classes: int
    capture: ForwardCapture
    graph: GraphUses
    logits: torch.Tensor | None = None  # the forward's output f (batch, C)

    @property
    def options(self):
        return self.capture.options

    @property
    def workspace(self):
        return self.capture.cache.workspace

    @property
    def strategy(self) -> str | None:
        """The contraction form the options force, or None (the cheaper one)."""
        forced = self.capture.options.contraction
        return None if forced == "auto" else forced


class Rule:
    """A module kind on ``gram``'s fast path. Subclasses set ``name`` and ``kinds`` and implement :meth:`accumulator`."""

    name: str = "?"
    #: the exact module types handled
    kinds: tuple[type, ...] = ()
    #: a recompute hook replaces the module's output (allowed only with ``EngineOptions.recompute``)
    recomputes: bool = False
    #: trailing feature dimensions of z for a position-wise layer (None: samples first)
    feature_dims: int | None = None
    #: on a GPU the C classes may share one vmapped backward pass through this layer (not convolutions: slower)
    gpu_one_pass: bool = True
    #: the capture hands the accumulator a and b_c with the samples' dimension moved first (else the rule reads
    #: ``record.sample_dim`` itself)
    moves_samples: bool = True

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self.kinds

    def parameters(self, module: nn.Module) -> list[torch.Tensor]:
        """The parameters of ``module`` this rule claims (default: weight and bias, where present)."""
        return [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]

    def claims(self, path: str, module: nn.Module, names: list[str], capture: ForwardCapture) -> list[Claim]:
        """The claims on ``module``'s parameters ``names`` (default: one layer, the module itself)."""
        layer = Layer(path or "(root)", module, names, self, self.layer_feature_dims(module))
        return [Claim(self, module, names, [layer])]

    def layer_feature_dims(self, module: nn.Module) -> int | None:
        return self.feature_dims

    def install(self, capture: ForwardCapture, claims: list[Claim]) -> list:
        """Register this rule's forward hooks for its claims; return the handles (default: :meth:`record_hook`)."""
        handles = []
        for claim in claims:
            for layer in claim.layers:
                handles.append(layer.module.register_forward_hook(self.record_hook(capture, layer)))
        return handles

    def record_hook(self, capture: ForwardCapture, layer: Layer):
        """A forward hook recording (input, output) of ``layer``'s module; it hands the model a copy of the output
        when a later in-place op overwrote it on an earlier call (``ModelCache.copy_output``)."""

        def hook(module, args, output):
            capture.record(layer, Record(args[0].detach(), output, output._version, input=args[0]))
            if module in capture.cache.copy_output:
                return output.clone()  # the model continues on a copy; z keeps its value and its graph
            return None

        return hook

    def check(self, layer: Layer, records: list[Record], graph: GraphUses, n: int, capture: ForwardCapture) -> list[int] | str:
        """The dimensions of the recorded z that may hold the n samples, or why the layer goes to the generic path.

        Default: the module ran exactly once on the logits' graph, its output was not modified in place (else it is
        copied from the next call on: ``ModelCache.copy_output``), each of its parameters is consumed once by the
        graph, and some dimension of z has the batch's size (:func:`..samples.candidate_dims`).
        """
        from ..samples import candidate_dims

        single = len(records) == 1 and records[0].z.requires_grad
        if not single:
            return "its layer did not run exactly once: unused, reused, or a call not recomputed"
        if records[0].z._version != records[0].version:
            if layer.module is not None:
                capture.cache.copy_output.add(layer.module)
            return "its layer's output was modified in place (fast from the next call on)"
        by_name = capture.by_name
        if any(graph.leaves.get(id(by_name[name]), 0) != 1 for name in layer.params):
            return "it is used outside its layer too"
        dims = candidate_dims(records[0].z, n, layer.feature_dims)
        return dims or "no dimension of its layer's output has the batch's size"

    def after_forward(self, capture: ForwardCapture, claim: Claim) -> None:
        """Called once the forward has run, before the checks (a rule that makes its layers from the forward)."""

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> Accumulator:
        """The accumulator of ``layer``'s share, reading ∂f/∂(its ``target``; default record.z); samples first."""
        raise NotImplementedError
