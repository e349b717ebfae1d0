"""The C backward passes of ``gram``: b_c = ∂f_c/∂z of every fast layer, handed to the layers' accumulators."""

from __future__ import annotations

import torch
from torch import nn

from .plan import GraphUses, LayerPlan, _backward_runs

#: on the CPU, C classes share one backward pass only while one class's ∂f/∂z of all layers is at most this many bytes
_PASS_BYTES = 4 * 2**20

#: autograd node names (parts of) whose backward rules out the one vmapped pass (see :func:`_one_pass`)
_CONVOLUTION, _ATTENTION = ("Convolution",), ("ScaledDotProduct",)


def _one_pass(out: torch.Tensor, zs: list[torch.Tensor], fast: list[LayerPlan], sinks: list, graph: GraphUses) -> bool:
    """Whether :func:`_stream_logit_jacobians` runs one backward pass for all C classes, or C passes.

    All C at once (one vmapped backward) saves C − 1 walks of the graph, i.e. autograd's and the
    kernels' fixed cost per node, which dominates on small layers; one at a time keeps each pass's
    tensors C× smaller. Measured on the 2-core CPU, in-process against each other (benchmarks/README.md):

    - a backward that runs a convolution's backward: one class per pass (the vmapped convolution
      backward works on a C× larger batch and took 1.2–1.7× as long on the paper's CNNs);
    - a backward that runs scaled-dot-product attention's fused backward (``nn.MultiheadAttention``,
      :mod:`.attention`): one class per pass, on every device (torch has no batching rule for it: vmap
      falls back to a loop over the classes and warns);
    - a ReLU tap writing into a layer's buffer (:mod:`.relu_tap`): one class per pass (slot c per pass);
    - otherwise all C at once while one class's ∂f/∂z over all layers is at most ``_PASS_BYTES``
      (4 MiB): SNet (the convolution contracted at its pool's output) 0.75–0.88× the time of one class
      per pass at batch 64–256 (0.4–1.6 MB per class), CNet k = 1 0.90× at batch 64 and 128 (1.6 and
      3.2 MB), the MLPs 0.66–0.73× at batch 64; above it, fresh C-fold tensors cost more than the walks
      save (CNet k = 1 at batch 256, 6.4 MB: 1.20×; an MLP of width 1024 at batch 2048, 8.5 MB: 1.14×).

    On a GPU (no page faults, launch-bound), as measured on an H100 (benchmarks/README.md): all C at once
    unless the model has a convolution layer (or the backward runs attention's fused kernel).
    """
    if out.device.type != "cpu":
        return not any(isinstance(p.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for p in fast) and not _backward_runs(out, zs, graph, _ATTENTION)
    if any(getattr(s, "tapped", False) for s in sinks):
        return False
    per_class = sum(z.numel() * z.element_size() for z in zs)
    return per_class <= _PASS_BYTES and not _backward_runs(out, zs, graph, _CONVOLUTION + _ATTENTION)


def _stream_logit_jacobians(
    out: torch.Tensor, zs: list[torch.Tensor], n_classes: int, sinks: list, batched: bool, keep_graph: bool = False
) -> None:
    """Feed b_c = ∂f_c/∂z (shape (n, *z.shape[1:])) of every layer to ``sinks[i].add`` for c = 0…C−1.

    ``batched``: one backward of the C one-hot cotangents at once (``is_grads_batched``, a vmap over
    the cotangents), whose (C, n, ...) result goes to ``sink.add_classes`` (no
    per-class slicing and restacking: mlp256 0.81×, SNet 0.95× the per-class hand-over, in-process);
    otherwise C backward passes, each batched over the samples. See
    :func:`_one_pass` for the choice. The batched form falls back to the C passes for graphs whose
    backward cannot be vmapped (exact either way).
    """
    n = out.shape[0]
    if batched:
        eye = torch.eye(n_classes, dtype=out.dtype, device=out.device).unsqueeze(1).expand(n_classes, n, n_classes)
        try:
            # (the graph is kept: a node without a batching rule may raise after others have run)
            grads = torch.autograd.grad(out, zs, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            grads = None  # not vmappable: the loop below is exact too
        if grads is not None:
            for sink, g, z in zip(sinks, grads, zs):
                sink.add_classes(torch.zeros(n_classes, *z.shape, dtype=z.dtype, device=z.device) if g is None else g)
            return
    for c in range(n_classes):
        # (a one-hot grad_outputs tensor instead of the sum raised the peak memory by ~40 MB on SNet)
        last = not keep_graph and c == n_classes - 1
        grads = torch.autograd.grad(out[:, c].sum(), zs, retain_graph=not last, allow_unused=True)
        for sink, g, z in zip(sinks, grads, zs):
            sink.add(torch.zeros_like(z) if g is None else g)
