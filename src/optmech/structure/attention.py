"""``nn.MultiheadAttention`` on the fast path: its two projections as Linear layers over positions.

A self-attention call y = MHA(x, x, x) (x of shape (n, L, E) batch-first, or (L, n, E)) is

    P = x W_inᵀ + b_in                  (n, L, 3E)   the in-projection: q, k, v side by side
    O = attention(q, k, v; masks)       (n, L, E)    no parameters
    y = O W_outᵀ + b_out                (n, L, E)    the out-projection

so in_proj_weight/in_proj_bias contribute like a Linear over positions with input x and output P,
and out_proj.weight/out_proj.bias like one with input O and output y (:mod:`.gram`'s formula,
Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + the bias term). The module computes P and O inside
``F.multi_head_attention_forward``, where no hook reaches them, so in the standalone ``gram`` call
a forward hook recomputes the call in these three steps from the module's own parameters and
arguments (``F.linear``, ``F.scaled_dot_product_attention`` with the module's masks merged as
``F.multi_head_attention_forward`` merges them) and hands the model that output in place of the
module's: the backward passes then reach P and y. The recomputed output is checked against the
module's own (largest difference at most 1e-10 of the largest value in float64, 1e-4 in
float32); a call that does not match, or that the recomputation does not cover, is left as the
module made it, and its parameters go to the generic path (exact either way).

Covered: ``query is key is value`` (self-attention), 3-D inputs, one packed in-projection
(``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v``, no ``add_zero_attn``, with or without
biases, ``batch_first`` either way, ``key_padding_mask`` and ``attn_mask`` (bool or float,
2-D or 3-D), ``is_causal``, ``need_weights`` (the weights returned are the module's own: if the
model uses them, the parameters have a second use and go to the generic path). Not in the
training-step capture, which must leave the step's graph as the model builds it.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .plan import LayerPlan

__all__ = ["AttentionPlan", "attention_plans", "self_attention"]

#: largest |recomputed − module output| allowed, relative to the largest |module output|, per dtype
_MATCH = {torch.float64: 1e-10, torch.float32: 1e-4}

#: per MultiheadAttention module: the two stand-in Linear modules that its projections' plans and
#: buffers are keyed by (made on the meta device: no memory), kept while the module lives
_STAND_INS: "weakref.WeakKeyDictionary[nn.MultiheadAttention, tuple[nn.Linear, nn.Linear]]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class AttentionPlan:
    """One MultiheadAttention module on the fast path: its module path and the plans of its two projections."""

    name: str
    module: nn.MultiheadAttention
    in_proj: LayerPlan
    out_proj: LayerPlan


def _covered(module: nn.Module) -> bool:
    """A MultiheadAttention whose parameters are exactly the packed in-projection and the out-projection."""
    return (
        type(module) is nn.MultiheadAttention
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and type(module.out_proj) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    )


def _stand_ins(module: nn.MultiheadAttention) -> tuple[nn.Linear, nn.Linear]:
    """Linear modules with the projections' shapes (meta tensors): what the layer accumulators read."""
    if module not in _STAND_INS:
        E = module.embed_dim
        _STAND_INS[module] = (
            nn.Linear(E, 3 * E, bias=module.in_proj_bias is not None, device="meta"),
            nn.Linear(E, E, bias=module.out_proj.bias is not None, device="meta"),
        )
    return _STAND_INS[module]


def attention_plans(model: nn.Module, named_params: list[tuple[str, torch.Tensor]], names: set[str]) -> list[AttentionPlan]:
    """The covered MultiheadAttention modules all of whose parameters are in θ and among ``names``
    (those no fast layer claimed). Their plans are named like the generic path's groups: the module's
    path for the in-projection, ``….out_proj`` for the out-projection."""
    by_id = {id(p): n for n, p in named_params}
    plans = []
    for path, module in model.named_modules():
        if not _covered(module):
            continue
        own = [module.in_proj_weight, module.in_proj_bias, module.out_proj.weight, module.out_proj.bias]
        params = [by_id.get(id(p)) for p in own if p is not None]
        if any(n is None or n not in names for n in params):
            continue  # a frozen or shared parameter: the generic path
        k = 1 + (module.in_proj_bias is not None)
        prefix = f"{path}." if path else ""
        stand_in, stand_out = _stand_ins(module)
        plans.append(AttentionPlan(
            path, module,
            LayerPlan(path or "(root)", stand_in, params[:k]),
            LayerPlan(f"{prefix}out_proj", stand_out, params[k:]),
        ))
    return plans


_SIGNATURE: dict[type, inspect.Signature] = {}


def _arguments(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name (defaults filled in), or None if they do not bind."""
    sig = _SIGNATURE.setdefault(type(module), inspect.signature(type(module).forward))
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: not attended) as 0/−inf, a float mask as it is (both are added to the scores)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def self_attention(
    module: nn.MultiheadAttention, x: torch.Tensor, key_padding_mask=None, attn_mask=None, is_causal: bool = False,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, O, y) of the self-attention call on batch-first x (n, L, E): the in-projection's output, the
    attention output (the out-projection's input) and the out-projection's output, as in the module docstring."""
    n, L, E = x.shape
    H = module.num_heads
    P = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    q, k, v = P.unflatten(-1, (3, H, E // H)).permute(2, 0, 3, 1, 4)  # each (n, H, L, E/H)
    if is_causal and key_padding_mask is None and not need_weights:
        mask, causal = None, True  # as F.multi_head_attention_forward: the hint stands for attn_mask
    else:
        mask, causal = None, False
        if attn_mask is not None:
            mask = _float_mask(attn_mask, x.dtype)
            mask = mask.view(n, H, L, L) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, x.dtype).view(n, 1, 1, L)
            mask = kpm if mask is None else mask + kpm
    O = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=causal)
    O = O.transpose(1, 2).reshape(n, L, E)
    return P, O, F.linear(O, module.out_proj.weight, module.out_proj.bias)


def recompute(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> tuple | None:
    """((x, P), (O, y), the output to hand on) for a covered self-attention call, or None (leave the call alone).

    x, P, O, y are batch-first (n, L, ·); the output handed on has the module's layout and its
    attention weights.
    """
    a = _arguments(module, args, kwargs)
    if a is None or set(a) - {"self", "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                              "average_attn_weights", "is_causal"}:
        return None
    query = a["query"]
    if not (query is a["key"] is a["value"] and isinstance(output, tuple) and len(output) == 2):
        return None
    own = output[0]
    if query.dim() != 3 or query.dtype not in _MATCH or own.shape != query.shape or (module.training and module.dropout > 0):
        return None
    x = query if module.batch_first else query.transpose(0, 1)
    kpm, mask = a["key_padding_mask"], a["attn_mask"]
    if (kpm is not None and kpm.dim() != 2) or (mask is not None and mask.dim() not in (2, 3)):
        return None
    P, O, y = self_attention(module, x, kpm, mask, bool(a["is_causal"]), bool(a["need_weights"]))
    mine = y if module.batch_first else y.transpose(0, 1)
    with torch.no_grad():
        scale = own.abs().nan_to_num(0.0).max().clamp_min(torch.finfo(own.dtype).tiny)
        both_nan = mine.isnan() & own.isnan()
        if (mine - own).abs().masked_fill(both_nan, 0.0).max().nan_to_num(float("inf")) > _MATCH[own.dtype] * scale:
            return None
    return (x, P), (O, y), (mine, output[1])
