"""Convolutions: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``, any padding and padding mode, grouped and depthwise.

Claims ``weight`` and ``bias``. With the unfolded patches â_s of the input (K = c_in·kernel values at each of
the S output positions, :mod:`..patches`) and b_{c,s} = ∂f_c/∂z at position s (DESIGN §3):

    A[c, c'] += Σ_{s,s'} (â_s·â_s')(b_{c,s}·b_{c',s'}) + ⟨Σ_s b_{c,s}, Σ_s b_{c',s}⟩      (bias: the second term)

in ghost or materialised form (:class:`..layer_gram.LayerGram`); with g > 1 groups, the same per group, summed
(:class:`..grouped.GroupedConvGram`). On the CPU, by :class:`..options.EngineOptions`:

- ``channels_last``: the hook hands the model each float Conv2d output in channels-last (the layers after keep
  the layout; the recorded z is that copy, so the backward passes stop before the copy's own backward);
- ``fold_pools``: a Conv2d whose output feeds only [ReLU →] MaxPool2d is contracted at the pool's output over
  the positions the pool selected (:class:`..pooled.PooledConvGram`), when that costs at most twice the
  multiply-adds of the layer's cheapest unfolded form and its gathered patches are no larger than the ∂f/∂z
  buffer it replaces;
- ``relu_taps``: an ungrouped Conv1d/Conv2d whose output z feeds only an ``nn.ReLU`` (or only a sum z + y that
  feeds only one, as in a residual block) gets b_c written by that ReLU's backward straight into its buffer
  (:mod:`..relu_tap`).

On a GPU the C classes never share one vmapped backward through a convolution (``gpu_one_pass``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..accumulator import Accumulator
from ..contract import contraction_costs
from ..grouped import GroupedConvGram
from ..layer_gram import LayerGram
from ..layout import tappable_layout, to_channels_last
from ..patches import layer_dims
from ..pooled import PooledConvGram, pooled_cost, pooled_output
from ..relu_tap import tapped_relu
from .base import AccumulatorContext, Layer, Record, Rule

__all__ = ["ConvRule"]


def _tappable(module: nn.Module) -> bool:
    """A convolution whose buffer a ReLU tap may write into: ungrouped Conv1d/Conv2d (a grouped one has its own)."""
    return type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1


class _Notes:
    """What the conv rule's hooks note during one forward: every MaxPool2d output (with its version), the taps
    made on each convolution's output, and the graph nodes of the recorded outputs (for the ReLU hook)."""

    def __init__(self) -> None:
        self.pools: list[tuple[torch.Tensor, int]] = []
        self.taps: dict[int, list] = {}  # id(conv module) -> its taps
        self.z_nodes: dict[int, tuple[Layer, object]] = {}  # id(grad_fn of a recorded z) -> (layer, the node, kept alive)


class ConvRule(Rule):
    name = "conv"
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    gpu_one_pass = False

    def notes(self, capture) -> _Notes:
        return capture.scratch.setdefault(self.name, _Notes())

    def install(self, capture, claims) -> list:
        handles = super().install(capture, claims)
        layers = [layer for claim in claims for layer in claim.layers]
        options = capture.options
        if options.fold_pools and any(type(layer.module) is nn.Conv2d for layer in layers):
            handles += [m.register_forward_hook(self._pool_hook(capture)) for m in capture.model.modules() if type(m) is nn.MaxPool2d]
        if options.relu_taps and any(_tappable(layer.module) for layer in layers):
            relus = [m for m in capture.model.modules() if type(m) is nn.ReLU and not m.inplace]
            handles += [m.register_forward_hook(self._relu_hook(capture)) for m in relus]
        return handles

    def record_hook(self, capture, layer: Layer):
        taps = capture.options.relu_taps and _tappable(layer.module)

        def hook(module, args, output):
            replaced = None
            if capture.channels_last and type(module) is nn.Conv2d and to_channels_last(output):
                output = replaced = output.contiguous(memory_format=torch.channels_last)
            capture.record(layer, Record(args[0].detach(), output, output._version))
            if module in capture.cache.copy_output:
                return output.clone()  # the model continues on a copy; z keeps its value and its graph
            if taps and output.grad_fn is not None and output.device.type == "cpu":
                self.notes(capture).z_nodes[id(output.grad_fn)] = (layer, output.grad_fn)
            return replaced

        return hook

    def _pool_hook(self, capture):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):  # not with return_indices=True
                self.notes(capture).pools.append((output, output._version))

        return hook

    def _relu_hook(self, capture):
        def hook(module, args, output):
            t = args[0] if args else None
            if not (isinstance(t, torch.Tensor) and isinstance(output, torch.Tensor) and t.grad_fn is not None):
                return None
            notes = self.notes(capture)
            entry, through = notes.z_nodes.get(id(t.grad_fn)), None  # relu(z)
            if entry is None and type(t.grad_fn).__name__ == "AddBackward0" and getattr(t.grad_fn, "_saved_alpha", 1) == 1:
                # relu(z + y) (a residual block): ∂f/∂z is the ReLU's backward when z feeds only the sum
                for node, _ in t.grad_fn.next_functions:
                    if node is not None and id(node) in notes.z_nodes:
                        entry, through = notes.z_nodes[id(node)], t.grad_fn
                        break
            if entry is None:
                return None
            layer = entry[0]
            z = capture.records[id(layer)][-1].z
            if (through is None and t is not z) or z.shape != t.shape or not tappable_layout(z):
                return None
            r, tap = tapped_relu(t, output)
            tap.through = through  # the sum node between z and the ReLU, or None
            notes.taps.setdefault(id(layer.module), []).append(tap)
            return r

        return hook

    def accumulator(self, layer: Layer, record: Record, ctx: AccumulatorContext) -> Accumulator:
        module, a, z = layer.module, record.a, record.z
        if module.groups > 1:
            acc = GroupedConvGram(module, a, ctx.n_classes, ctx.workspace, ctx.strategy)
            acc.target = z
            return acc
        pooled = self._foldable_pool(module, a, z, ctx)
        if pooled is not None:  # contract at the pool's output: the backward passes stop there
            return PooledConvGram(module, a, z, pooled, ctx.n_classes, ctx.workspace)
        # a tap writes b_c when it is the only one on z and z feeds only the ReLU (or only a sum that feeds only the
        # ReLU): then the ReLU's backward is ∂f/∂z
        taps = self.notes(ctx.capture).taps.get(id(module), [])
        tap = taps[0] if len(taps) == 1 and ctx.graph.consumers.get(id(z.grad_fn), 0) == 1 else None
        if tap is not None and tap.through is not None and ctx.graph.consumers.get(id(tap.through), 0) != 1:
            tap = None
        acc = LayerGram(module, a, ctx.n_classes, ctx.workspace, ctx.strategy, tap_z=z if tap is not None else None)
        if tap is not None and acc.tapped:
            tap.slot = acc.slot
        acc.target = z
        return acc

    def _foldable_pool(self, module: nn.Module, a: torch.Tensor, z: torch.Tensor, ctx: AccumulatorContext):
        """(p, indices, relu) when the Conv2d feeds only [ReLU →] MaxPool2d and folding it pays; else None."""
        pools = self.notes(ctx.capture).pools
        if not (ctx.options.fold_pools and pools and type(module) is nn.Conv2d and z.device.type == "cpu"):
            return None
        pooled = pooled_output(z, pools, ctx.graph.consumers)
        if pooled is None:
            return None
        n, d = z.shape[:2]
        C = ctx.n_classes
        K, S = layer_dims(module, a)
        K1, S_pooled = K + int(module.bias is not None), pooled[0].shape[2] * pooled[0].shape[3]
        unfolded = min(contraction_costs(n, C, S, K, d, module.bias is not None).values())
        fits = d * K1 * S_pooled <= C * d * S
        return pooled if fits and pooled_cost(n, C, S_pooled, K1, d) <= 2 * unfolded else None
