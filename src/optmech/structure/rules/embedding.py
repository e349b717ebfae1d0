"""``nn.Embedding``: a Linear over token positions whose inputs are one-hot vectors.

Claims ``weight`` (E, vocabulary × dim). ∂f_c/∂E = Σ_t e_{tok_t} b_{c,t}ᵀ, so

    A[c, c'] += Σ_{t,t'} [tok_t = tok_t'] (b_{c,t}·b_{c',t'})

the ghost form with Γ the token-equality matrix (positions holding ``padding_idx`` get no gradient and are
left out). The (vocabulary × dim) gradient is never formed. Not with ``max_norm`` (renormalises the weight in
place) or ``scale_grad_by_freq`` (couples the samples). Position-wise.

Indices shared by the whole batch (a leading dimension of 1, as BERT's position ids (1, T)) give an output that a
later op broadcasts over the samples, where no per-sample gradient of it exists. In the standalone call
(``EngineOptions.recompute``) the hook hands the model an n-fold copy of that output instead, the same values, so
that the backward passes reach each sample's b_c; the tokens are the shared ones for every sample.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accumulator import Accumulator
from ..cache import Workspace
from ..contract import ghost_gram
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["EmbeddingRule", "EmbeddingGram"]


class EmbeddingRule(Rule):
    name = "embedding"
    kinds = (nn.Embedding,)
    feature_dims = 1

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq

    def record_hook(self, capture, layer: Layer):
        default = super().record_hook(capture, layer)

        def hook(module, args, output):
            n = capture.batch_size
            if not (capture.options.recompute and n is not None and n > 1 and args[0].dim() >= 1 and args[0].shape[0] == 1):
                return default(module, args, output)
            copies = output.expand(n, *output.shape[1:]).clone()  # one per sample, each with its own gradient
            tokens = args[0].detach().expand(n, *args[0].shape[1:])
            capture.record(layer, Record(tokens, copies, copies._version, input=args[0]))
            return copies

        return hook

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> EmbeddingGram:
        return EmbeddingGram(layer.module, record.a, ctx.n_classes, ctx.workspace)


class EmbeddingGram(Accumulator):
    """The b_c copied into one (n, C, dim, L) buffer, then A = Σ Γ[t, t'] (b_{c,t}·b_{c',t'}) in two batched GEMMs."""

    form = "ghost"

    def __init__(self, m: nn.Embedding, tokens: torch.Tensor, n_classes: int, ws: Workspace) -> None:
        self.module = m
        n = tokens.shape[0]
        tok = tokens.reshape(n, -1)
        same = tok[:, :, None] == tok[:, None, :]
        if m.padding_idx is not None:
            keep = tok != m.padding_idx
            same &= keep[:, :, None] & keep[:, None, :]
        self.gamma = same.to(m.weight.dtype)  # (n, L, L)
        self.buffer = ws.get(m, "dfdz", (n, n_classes, m.embedding_dim, tok.shape[1]), m.weight.dtype, m.weight.device)
        self.n_classes, self.count = n_classes, 0

    def add(self, b: torch.Tensor) -> None:
        n = b.shape[0]
        self.buffer[:, self.count] = b.reshape(n, -1, self.buffer.shape[2]).transpose(1, 2)  # (n, dim, L)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """bs (C, n, *tokens.shape[1:], dim) in one copy into the buffer (n, C, dim, L)."""
        C, n = bs.shape[:2]
        self.buffer.copy_(bs.reshape(C, n, -1, self.buffer.shape[2]).permute(1, 0, 3, 2))
        return True

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return ghost_gram(self.buffer, self.gamma, into)
