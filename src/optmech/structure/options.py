"""The engine's options: one frozen object, passed explicitly (no module-level switches)."""

from __future__ import annotations

import dataclasses

__all__ = ["EngineOptions", "CONTRACTIONS"]

#: the contraction forms a layer of Linear or convolution type may be forced into (``EngineOptions.contraction``)
CONTRACTIONS = ("auto", "ghost", "materialise")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How ``gram`` may run. Every option leaves A exact; they trade speed, memory and how much of the model's
    forward the engine may rewrite.

    Attributes:
        channels_last: on the CPU, hand the model each float Conv2d output in channels-last (oneDNN's convolution
            backward is faster in it; the values are the same). A forward that cannot take it is rerun in its
            own layout, and the model's cache remembers that.
        relu_taps: on the CPU, a convolution whose output feeds only an ``nn.ReLU`` gets ∂f/∂z written by that
            ReLU's backward straight into the layer's buffer (:mod:`.rules.conv`).
        fold_pools: on the CPU, a Conv2d feeding only [ReLU →] MaxPool2d is contracted at the pool's output
            (:mod:`.pooled`).
        recompute: rules with a recompute hook (``nn.MultiheadAttention``, ``nn.LSTM``/``GRU``/``RNN``) replace
            the module's output by the same values computed in steps that the backward passes can reach.
        direct: watch the forward for parameters used directly (added, multiplied, expanded: :mod:`.rules.direct`).
        contraction: ``"auto"`` (the cheaper form per layer by :func:`.contract.contraction_costs`), or force
            ``"ghost"`` or ``"materialise"`` on every Linear and convolution layer.
        factor_head: when the logits are a Linear layer f = h Wᵀ + b with h narrower than C (d < C), run the
            backward passes on d cotangents and contract every layer below it d × d, then form A = s·I + Q M Qᵀ
            (:mod:`.head`); the probe then takes λmin and λmax from the factors, without a C × C eigensolver.
        pass_bytes: on the CPU, the C classes share one vmapped backward pass only while one class's ∂f/∂z over
            all layers is at most this many bytes (:func:`.passes.one_pass`).

    :meth:`training_step` gives the options of the probe's training-step capture, which must leave the step's
    graph as the model builds it.
    """

    channels_last: bool = True
    relu_taps: bool = True
    fold_pools: bool = True
    recompute: bool = True
    direct: bool = True
    contraction: str = "auto"
    factor_head: bool = True
    pass_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if self.contraction not in CONTRACTIONS:
            raise ValueError(f"contraction: expected one of {list(CONTRACTIONS)}, got {self.contraction!r} instead.")
        if not isinstance(self.pass_bytes, int) or self.pass_bytes < 0:
            raise ValueError(f"pass_bytes: expected a non-negative integer, got {self.pass_bytes!r} instead.")
        for field in ("channels_last", "relu_taps", "fold_pools", "recompute", "direct", "factor_head"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field}: expected a bool, got {type(getattr(self, field)).__name__} instead.")

    @classmethod
    def training_step(cls) -> EngineOptions:
        """Options that change nothing the training step computes: no layout change, no taps, no recomputed
        modules, no watching of the forward (the pooled fold only reads the graph)."""
        return cls(channels_last=False, relu_taps=False, recompute=False, direct=False)

    def replace(self, **changes) -> EngineOptions:
        return dataclasses.replace(self, **changes)
