"""Conv → ReLU: the ReLU's backward written straight into the convolution's ∂f/∂z buffer.

In each of the C backward passes, the gradient at a convolution output z that feeds only a ReLU is
the ReLU's backward, b_c = ∂f_c/∂z = [z > 0] ⊙ ∂f_c/∂relu(z). Autograd computes it into a fresh
tensor (on the CPU, glibc often hands that memory back between passes, so every pass page-faults it
in again), and ``gram`` then copies it into the layer's buffer of all C classes. A tap does both in
one pass over kept memory: the ReLU's output is handed to the model through a custom autograd
function whose backward runs ReLU's own backward kernel (``threshold_backward``, with its ``out``
argument) into the layer's slot for the current class (the ``slot`` the layer's accumulator
gives) and returns that slot as z's gradient, from which the backward pass continues into the
convolution: the same values, bit for bit, as without the tap.

Used by the standalone ``gram`` call only (the training-step capture must leave the step's graph
as the model builds it), for ``nn.ReLU`` modules that are not in-place, when z's only consumer in
the logits' graph is that ReLU, or a sum z + y (a residual block) whose only consumer is that ReLU
(the sum's backward hands its gradient on unchanged); the checks run on the graph after the
forward. Otherwise the tap's backward is the ReLU's backward into a fresh tensor, as without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ReluTap", "tapped_relu", "is_tap_node"]


class ReluTap:
    """Where one ReLU call's backward writes: ``slot`` None (a fresh tensor, as ReLU's own backward) or a
    callable returning the tensor, with z's shape and strides, that receives b_c in the current pass."""

    def __init__(self) -> None:
        self.slot: Callable[[], torch.Tensor] | None = None
        self.through = None  # a sum node between z and the ReLU (relu(z + y)), or None
        self.writes = 0  # backward passes that wrote into a slot (tests)


class _TappedRelu(torch.autograd.Function):
    """Forward: the ReLU module's own output r (passed on the side: a fresh tensor, not a view of an input).

    Backward: ReLU's own kernel, ``threshold_backward(g, r, 0)`` (0 where r ≤ 0, g elsewhere), into
    the tap's slot when it has one. r is saved like ReLU saves it, so modifying it in place
    afterwards raises in the backward exactly as it would without the tap.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, tap: ReluTap, holder: list) -> torch.Tensor:
        r = holder.pop()
        ctx.tap = tap
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (r,) = ctx.saved_tensors
        tap = ctx.tap
        if tap.slot is None:
            return torch.ops.aten.threshold_backward(g, r, 0), None, None
        out = torch.ops.aten.threshold_backward.grad_input(g, r, 0, grad_input=tap.slot())
        tap.writes += 1
        return out, None, None


def tapped_relu(z: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ReluTap]:
    """(the ReLU output to hand on, its tap) for r = relu(z) as the ReLU module computed it."""
    tap = ReluTap()
    return _TappedRelu.apply(z, tap, [r.detach()]), tap


def is_tap_node(node) -> bool:
    """Whether an autograd graph node is a tap's backward (a ReLU's, for the graph checks)."""
    return type(node).__name__ == "_TappedReluBackward"
