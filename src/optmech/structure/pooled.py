"""Conv2d → [ReLU] → MaxPool2d: a convolution's share of A_x contracted at the pool's output.

Max pooling hands each pooled position's gradient to one input position, its argmax (recorded by
the forward), and ReLU keeps it where z > 0. With g_c = ∂f_c/∂p at the pool's output p (n, d
channels, S' positions), idx[n, o, s'] the argmax of pooled position s' in channel o and â_s the
convolution's patches (with a row of ones for the bias), the per-class weight gradient is

    ∂f_c/∂W_o = Σ_s b_{c,o,s} â_s = Σ_{s'} [z_{o, idx[o,s']} > 0] · g_{c,o,s'} · â_{idx[o,s']}

(windows that overlap and pick the same position add up, as in the pool's own backward). So the C
backward passes stop at p, skipping C times the pool's and the ReLU's backward over the full-size
map, and the contraction runs over S' positions instead of S: with ã[n, o, :, s'] = â_{idx[n,o,s']}
gathered once per call (n·d·(K+1)·S' values), G_c = ã · (mask ⊙ g_c) for all classes in one batched
GEMM, then A = ⟨G_c, G_c'⟩. Used when the model's graph is exactly that chain (z feeds only the ReLU,
the ReLU only the pool), when ã is no larger than the ∂f/∂z buffer the layer would otherwise keep
(n·C·d·S values) and when it costs at most twice the multiply-adds of the layer's best unfolded
form (the skipped backward passes are worth more than that). Used on the CPU only (``EngineOptions.fold_pools``);
docs/engine.md has what it saves and why not on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .accumulator import Accumulator
from .cache import SHARED, Workspace
from .contract import gram_of
from .patches import layer_patches
from .relu_tap import is_tap_node

__all__ = ["PooledConvGram", "pooled_output", "pooled_cost"]


def pooled_output(z: torch.Tensor, pools: list[tuple[torch.Tensor, int]], consumers: dict[int, int]):
    """``(p, indices, relu)`` when the conv output z flows only into [ReLU →] MaxPool2d with output p; else None.

    Args:
        z: the convolution's output (n, d, H, W), with its graph.
        pools: (output, its version counter at capture) of every MaxPool2d module call in the forward.
        consumers: graph node id -> how many edges of the logits' graph consume it (nodes kept alive
            by the caller, so that the ids are those of the nodes reached from z and p).
    """
    zfn = z.grad_fn
    for p, version in pools:
        pfn = p.grad_fn
        if p._version != version or pfn is None or type(pfn).__name__ != "MaxPool2DWithIndicesBackward0":
            continue  # overwritten in place afterwards, or not a max pool's output
        indices = getattr(pfn, "_saved_result1", None)  # the argmax per pooled position, flat over H·W
        if not isinstance(indices, torch.Tensor) or indices.shape != p.shape:
            continue
        prev = pfn.next_functions[0][0]
        relu = prev is not None and (type(prev).__name__ == "ReluBackward0" or is_tap_node(prev))  # a ReLU, tapped or not
        if relu:
            if consumers.get(id(prev), 0) != 1:
                continue  # relu(z) also feeds something else
            prev = prev.next_functions[0][0]
        if prev is zfn and consumers.get(id(zfn), 0) == 1:
            return p, indices, relu
    return None


def pooled_cost(n: int, C: int, S_pooled: int, K: int, d_out: int) -> float:
    """Multiply-adds of the folded contraction: gathering ã, G = ã·g for C classes, A = ⟨G_c, G_c'⟩."""
    return float(n * d_out * K * S_pooled * (C + 1) + n * C * C * d_out * K)


class PooledConvGram(Accumulator):
    """Accumulates a Conv2d → [ReLU] → MaxPool2d layer's contribution from g_c = ∂f_c/∂p (see the module docstring)."""

    form = "pooled"

    def __init__(self, module: nn.Module, a: torch.Tensor, z: torch.Tensor, pooled, n_classes: int, ws: Workspace) -> None:
        p, indices, relu = pooled
        self.module, self.ws, self.target = module, ws, p
        self.input = a
        n, d = p.shape[:2]
        self.indices = indices.reshape(n, d, -1)  # (n, d, S')
        S_pooled = self.indices.shape[2]
        # ReLU's mask at the selected positions, applied to each g_c as it is copied (cheaper than masking ã)
        self.keep = (z.detach().reshape(n, d, -1).gather(2, self.indices) > 0).to(z.dtype) if relu else None
        self.buffer = ws.get(self.module, "pooled-dfdp", (n, d, n_classes, S_pooled), z.dtype, z.device)
        self.n_classes, self.count = n_classes, 0

    def add(self, g: torch.Tensor) -> None:
        n, d, C, S_pooled = self.buffer.shape
        g = g.reshape(n, d, S_pooled)
        if self.keep is None:
            self.buffer[:, :, self.count] = g
        else:
            torch.mul(g, self.keep, out=self.buffer[:, :, self.count])
        self.count += 1

    def _take_all(self, gs: torch.Tensor) -> bool:
        """gs (C, n, d, H', W') in one masked copy into the buffer (n, d, C, S')."""
        n, d, C, S_pooled = self.buffer.shape
        g = gs.reshape(C, n, d, S_pooled).permute(1, 2, 0, 3)
        if self.keep is None:
            self.buffer.copy_(g)
        else:
            torch.mul(g, self.keep.unsqueeze(2), out=self.buffer)
        return True

    def contract(self, into: torch.Tensor | None = None) -> torch.Tensor:
        n, d, C, S_pooled = self.buffer.shape
        assert self.count == C, "every class must be added once"
        patches = layer_patches(self.module, self.input, self.ws, self.module.bias is not None, owner=SHARED)  # (n, K+1, S)
        K1, S = patches.shape[1:]
        # ã stored position-major (n, d, S', K+1), so that the contraction is an NN product of contiguous
        # operands (faster than with one operand transposed: docs/engine.md)
        gathered = self.ws.get(self.module, "pooled-patches", (n, d, S_pooled, K1), patches.dtype, patches.device)
        index = self.indices.unsqueeze(2).expand(n, d, K1, S_pooled)
        torch.gather(patches.unsqueeze(1).expand(n, d, K1, S), 3, index, out=gathered.transpose(2, 3))
        Gt = self.buffer.reshape(n * d, C, S_pooled) @ gathered.view(n * d, S_pooled, K1)  # (n·d, C, K+1): the G_cᵀ
        F_ = Gt.view(n, d, C, K1).transpose(1, 2).reshape(n, C, d * K1)
        return gram_of(F_, into)
