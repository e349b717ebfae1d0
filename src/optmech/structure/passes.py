"""The C backward passes of ``gram``: b_c = ∂f_c/∂z of every fast layer, handed to the layers' accumulators."""

from __future__ import annotations

import torch

from .graph import GraphUses, backward_runs

#: autograd node names (parts of) whose backward rules out the one vmapped pass (see :func:`one_pass`)
_CONVOLUTION, _ATTENTION = ("Convolution",), ("ScaledDotProduct",)


def one_pass(out: torch.Tensor, zs: list[torch.Tensor], gpu_one_pass: bool, sinks: list, graph: GraphUses, pass_bytes: int) -> bool:
    """Whether :func:`stream_logit_jacobians` runs one backward pass for all C classes, or C passes.

    All C at once (one vmapped backward) saves C − 1 walks of the graph, i.e. autograd's and the
    kernels' fixed cost per node, which dominates on small layers; one at a time keeps each pass's
    tensors C× smaller. On the CPU (the measurements behind each case are in docs/engine.md):

    - a backward that runs a convolution's backward: one class per pass (the vmapped convolution
      backward works on a C× larger batch);
    - a backward that runs scaled-dot-product attention's fused backward: one class per pass, on every
      device (torch has no batching rule for it: vmap falls back to a loop over the classes and warns);
    - a ReLU tap writing into a layer's buffer (:mod:`.relu_tap`): one class per pass (slot c per pass);
    - otherwise all C at once while one class's ∂f/∂z over all layers is at most ``pass_bytes``
      (``EngineOptions.pass_bytes``); above it, fresh C-fold tensors cost more than the walks save.

    On a GPU (no page faults, launch-bound): all C at once unless some layer's rule says otherwise
    (``gpu_one_pass`` False: convolutions) or the backward runs attention's fused kernel.
    """
    if out.device.type != "cpu":
        return gpu_one_pass and not backward_runs(out, zs, graph, _ATTENTION)
    if any(getattr(s, "tapped", False) for s in sinks):
        return False
    per_class = sum(z.numel() * z.element_size() for z in zs)
    return per_class <= pass_bytes and not backward_runs(out, zs, graph, _CONVOLUTION + _ATTENTION)


def stream_logit_jacobians(
    out: torch.Tensor, zs: list[torch.Tensor], n_classes: int, sinks: list, batched: bool, keep_graph: bool = False,
    seed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Feed b_c = ∂f_c/∂z (shape (n, *z.shape[1:])) of every layer to ``sinks[i].add`` for c = 0…C−1.

    ``batched``: one backward of the C cotangents at once (``is_grads_batched``, a vmap over the
    cotangents), whose (C, n, ...) result goes to ``sink.add_classes`` (no per-class slicing and
    restacking); otherwise C backward passes, each batched over the samples. See :func:`one_pass` for the
    choice. The batched form falls back to the C passes for graphs whose backward cannot be vmapped
    (exact either way).

    ``seed`` (h, W): the passes start at h (n, d), the input of the logits layer f = h Wᵀ + b, with the
    cotangents ∂f_c/∂h = W[c] broadcast over the samples (views: nothing of size C × C is formed); every z
    must lie upstream of h. Otherwise they start at the logits with the one-hot cotangents.
    """
    n = out.shape[0]
    if seed is not None:
        h, W = seed
        source = h
        cotangent = lambda c: W[c].expand_as(h)  # noqa: E731
        all_classes = lambda: W[:, None, :].expand(n_classes, *h.shape)  # noqa: E731
    else:
        source = out
        cotangent = None
        all_classes = lambda: torch.eye(n_classes, dtype=out.dtype, device=out.device).unsqueeze(1).expand(n_classes, n, n_classes)  # noqa: E731
    if batched:
        try:
            # (the graph is kept: a node without a batching rule may raise after others have run)
            grads = torch.autograd.grad(source, zs, grad_outputs=all_classes(), retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:
            grads = None  # not vmappable: the loop below is exact too
        if grads is not None:
            for sink, g, z in zip(sinks, grads, zs):
                sink.add_classes(torch.zeros(n_classes, *z.shape, dtype=z.dtype, device=z.device) if g is None else g)
            return
    for c in range(n_classes):
        last = not keep_graph and c == n_classes - 1
        if cotangent is None:
            # the gradient of the class's sum over samples (no one-hot grad_outputs tensor: less peak memory)
            grads = torch.autograd.grad(out[:, c].sum(), zs, retain_graph=not last, allow_unused=True)
        else:
            grads = torch.autograd.grad(source, zs, grad_outputs=cotangent(c), retain_graph=not last, allow_unused=True)
        for sink, g, z in zip(sinks, grads, zs):
            sink.add(torch.zeros_like(z) if g is None else g)
