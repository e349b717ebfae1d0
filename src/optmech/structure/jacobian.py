"""A_x through ``torch.func``: vmap over samples of jacrev over parameters.

Cost: C reverse passes per sample (vectorised), memory chunk·C·|θ| for the materialised
per-sample Jacobians, then one contraction per parameter tensor:
A[b] = Σ_tensors J_b,t J_b,tᵀ. The batch is processed in chunks so that peak memory stays near
``memory_budget`` bytes whatever the batch size.

A forward that ``vmap`` cannot batch over samples (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their fused
kernels, outside ``gram``'s recomputation of them; a custom op with no batching rule) is taken one
sample at a time, one ``torch.autograd.grad`` per class over these parameters only (:mod:`.loop`'s
rows: faster than a per-sample ``jacrev`` on an LSTM, whose vectorised backward cannot run oneDNN's RNN
kernel). The model's cache remembers it, and a :class:`.route.SlowPathWarning` says so once.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ._context import add_group, forward_failure, layer_of, outside_stacklevel
from .cache import ModelCache, model_cache
from .loop import jacobian_rows_loop
from .route import SlowPathWarning

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of per-sample Jacobians

def default_chunk_size(n_params: int, n_classes: int, itemsize: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples per chunk so that chunk·C·|θ|·itemsize (times 2 for the backward) fits the budget."""
    return max(1, int(budget // max(1, 2 * n_params * n_classes * itemsize)))


def structural_matrix_jacobian(
    model: nn.Module,
    inputs: torch.Tensor,
    named_params: list[tuple[str, torch.Tensor]],
    *,
    n_classes: int,
    chunk_size: int | None = None,
    groups: dict[str, torch.Tensor] | None = None,
    cache: ModelCache | None = None,
) -> torch.Tensor:
    """A (batch, classes, classes) from per-sample Jacobians computed with vmap∘jacrev.

    With ``groups`` (a dict), each module's share J_l J_lᵀ is also added to ``groups[module path]``.
    ``cache``: the model's (:func:`.cache.model_cache`), which remembers a forward ``vmap`` cannot batch.
    """
    cache = model_cache(model) if cache is None else cache
    detached = {name: p.detach() for name, p in named_params}
    n_params = sum(p.numel() for p in detached.values())
    if chunk_size is None:
        chunk_size = default_chunk_size(n_params, n_classes, inputs.element_size() if inputs.is_floating_point() else 8)

    def logits_of_one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    jacobian_of_one = jacrev(logits_of_one)
    vectorised = vmap(jacobian_of_one, in_dims=(None, 0))

    def per_sample_jacobian(params: dict[str, torch.Tensor], xs: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: (chunk, C, *shape)}: vmapped over the samples, or one sample at a time where vmap fails."""
        if not cache.one_by_one:
            try:
                return vectorised(params, xs)
            except RuntimeError as err:  # e.g. "Batching rule not implemented for aten::lstm.input"
                if forward_failure(model, xs, err) is not None:
                    raise  # the model's own forward fails on these inputs: not a vmap limitation
                cache.one_by_one = True  # said once per model: the cache remembers it
                warnings.warn(
                    f"jacobian: torch.func cannot vmap {type(model).__name__}'s forward over samples "
                    f"({str(err).splitlines()[0]}); taking the Jacobians of {', '.join(n for n, _ in named_params[:4])}"
                    f"{' …' if len(named_params) > 4 else ''} one sample at a time (exact, slower)",
                    SlowPathWarning, stacklevel=outside_stacklevel(),
                )
        tensors = [p for _, p in named_params]
        with torch.enable_grad():
            rows = torch.stack([jacobian_rows_loop(model, x.unsqueeze(0), tensors) for x in xs])  # (chunk, C, |θ|)
        blocks = rows.split([p.numel() for p in tensors], dim=2)
        return {name: block for (name, _), block in zip(named_params, blocks)}

    dtype = next(iter(detached.values())).dtype
    out = torch.zeros(inputs.shape[0], n_classes, n_classes, dtype=dtype, device=inputs.device)
    # jacrev ignores an outer no_grad; no_grad only stops parameters outside θ (frozen, or handled by
    # another method) from recording a graph through the result.
    with torch.no_grad():
        for start in range(0, inputs.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            jac = per_sample_jacobian(detached, inputs[rows])
            for name, block in jac.items():
                flat = block.reshape(block.shape[0], block.shape[1], -1)  # (chunk, C, n_params of this tensor); 0-d too
                part = flat @ flat.transpose(1, 2)
                out[rows] += part
                add_group(groups, layer_of(name), rows, part, inputs.shape[0])
    return out
