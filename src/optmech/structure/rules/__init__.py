"""The rule registry of ``gram``: one rule per module kind, each in its own file with its formula.

=============  =====================================================  =========================================
rule           handles                                                file
=============  =====================================================  =========================================
linear         ``nn.Linear``                                          :mod:`.linear`
conv           ``nn.Conv1d/2d/3d`` (grouped, depthwise, any padding)  :mod:`.conv`
conv_transpose ``nn.ConvTranspose1d/2d`` (ungrouped)                   :mod:`.conv_transpose`
norm           BatchNorm (running statistics), LayerNorm, RMSNorm,    :mod:`.norm`
               GroupNorm
embedding      ``nn.Embedding``                                       :mod:`.embedding`
attention      ``nn.MultiheadAttention`` (a recompute hook)           :mod:`.attention`
recurrent      ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (a recompute hook)  :mod:`.recurrent`
direct         parameters used directly (added, multiplied,           :mod:`.direct`
               expanded), claimed after the module rules
=============  =====================================================  =========================================

A module kind is added with one file (a :class:`.base.Rule` subclass) and one line in :data:`MODULE_RULES`.
The first rule whose ``matches`` accepts a module takes it; every parameter no module rule takes is offered to
:data:`DIRECT`; what is left goes to the generic ``torch.func`` path.
"""

from __future__ import annotations

from torch import nn

from .attention import AttentionRule
from .base import AccumulatorContext, Claim, Layer, Record, Rule
from .conv import ConvRule
from .conv_transpose import ConvTransposeRule
from .direct import DirectRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import NormRule
from .recurrent import RecurrentRule

__all__ = ["MODULE_RULES", "DIRECT", "rule_for", "Rule", "Claim", "Layer", "Record", "AccumulatorContext"]

#: the module rules, tried in order
MODULE_RULES: tuple[Rule, ...] = (
    LinearRule(),
    ConvRule(),
    ConvTransposeRule(),
    NormRule(),
    EmbeddingRule(),
    AttentionRule(),
    RecurrentRule(),
)

#: the rule for parameters used directly, offered what the module rules left
DIRECT = DirectRule()


def rule_for(module: nn.Module) -> Rule | None:
    """The first module rule that handles ``module``, or None."""
    return next((rule for rule in MODULE_RULES if rule.matches(module)), None)
