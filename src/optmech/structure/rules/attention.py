"""``nn.MultiheadAttention`` on the fast path: its projections as Linear layers over positions.

An attention call y = MHA(query, key, value) (inputs (n, L, ·) batch-first, or (L, n, ·)) is

    q = query W_qᵀ + b_q, k = key W_kᵀ + b_k, v = value W_vᵀ + b_v     the in-projection
    O = attention(q, k, v; masks)       (n, L_q, E)   no parameters
    y = O W_outᵀ + b_out                (n, L_q, E)   the out-projection

with [W_q; W_k; W_v] the packed ``in_proj_weight`` (or three weights ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ from ``embed_dim``) and [b_q; b_k; b_v] ``in_proj_bias``. Each block of rows
is a Linear over positions with its own input, so it contributes :mod:`.linear`'s formula
Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + the bias term; the blocks of one packed weight are disjoint
rows of it, so the weight's Gram is the sum of theirs. Blocks with the same input tensor and
adjacent rows are one Linear: self-attention (``query is key is value``) one E → 3E projection,
cross-attention with ``key is value`` (a decoder's memory, an attention-pooling head) an E → E one
for the queries and an E → 2E one for the keys and values. out_proj.weight/out_proj.bias contribute
like a Linear over positions with input O and output y.

The module computes these inside ``F.multi_head_attention_forward``, where no hook reaches them, so
in the standalone ``gram`` call a forward hook recomputes the call in these steps from the module's
own parameters and arguments (``F.linear`` per block, the weight split once,
``F.scaled_dot_product_attention`` with the module's masks merged as
``F.multi_head_attention_forward`` merges them) and hands the model that output in place of the
module's: the backward passes then reach the blocks' outputs and y. The recomputed output is
checked against the module's own (largest difference at most 1e-10 of the largest value in float64,
1e-4 in float32); a call that does not match, or that the recomputation does not cover, is left as
the module made it, and its parameters go to the generic path (exact either way).

Claims ``in_proj_weight`` (or ``q/k/v_proj_weight``), ``in_proj_bias``, ``out_proj.weight`` and ``out_proj.bias``;
the in-projection's blocks are fast together or not at all (they share the packed weight).

Covered: any query/key/value (self-attention, cross-attention, all three different), 3-D inputs,
a packed in-projection or separate q/k/v weights, with or without biases, ``batch_first`` either
way, ``key_padding_mask`` and ``attn_mask`` (bool or float, 2-D or 3-D), ``is_causal``,
``need_weights`` (the weights returned are the module's own: if the model uses them, the
in-projection has a second use and goes to the generic path). Not covered (generic):
``add_bias_kv``, ``add_zero_attn``. Not in the training-step capture, which must leave the step's
graph as the model builds it.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..stand_in import MATCH, matches, stand_in
from .base import Claim, Layer, Record, Rule
from .linear import LinearRule

__all__ = ["AttentionRule", "attention_steps", "recompute"]

_ROLES = "qkv"


def _covered(module: nn.Module) -> bool:
    """A MultiheadAttention whose parameters are its in-projection (packed or q/k/v) and out-projection."""
    if not (type(module) is nn.MultiheadAttention and module.bias_k is None and module.bias_v is None and not module.add_zero_attn):
        return False
    packed = module._qkv_same_embed_dim and module.in_proj_weight is not None
    separate = not module._qkv_same_embed_dim and all(
        getattr(module, f"{r}_proj_weight", None) is not None for r in _ROLES
    )
    return (packed or separate) and type(module.out_proj) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _in_projection(module: nn.MultiheadAttention) -> list[torch.Tensor]:
    """The in-projection's parameters: [in_proj_weight] or [q_proj_weight, k_proj_weight, v_proj_weight], then in_proj_bias."""
    weights = [module.in_proj_weight] if module._qkv_same_embed_dim else [getattr(module, f"{r}_proj_weight") for r in _ROLES]
    return weights + ([module.in_proj_bias] if module.in_proj_bias is not None else [])


@functools.cache
def _signature(kind: type) -> inspect.Signature:
    return inspect.signature(kind.forward)


def _arguments(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name (defaults filled in), or None if they do not bind."""
    sig = _signature(type(module))
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


def _runs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: bool) -> list[tuple[str, torch.Tensor]]:
    """The in-projection's blocks as (roles, input): adjacent roles with the same input tensor share one
    block of a packed weight ("qkv" for self-attention, "q" and "kv" when key is value); separate weights: one each."""
    runs: list[tuple[str, torch.Tensor]] = []
    for role, x in zip(_ROLES, (query, key, value)):
        if packed and runs and runs[-1][1] is x:
            runs[-1] = (runs[-1][0] + role, x)
        else:
            runs.append((role, x))
    return runs


def attention_steps(
    module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
    attn_mask=None, is_causal: bool = False, need_weights: bool = False,
) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """([(roles, input, output) of each in-projection block], O, y) of the call on batch-first inputs
    (query (n, L_q, E), key and value (n, L_k, ·)): the blocks as :func:`_runs` groups them, the
    attention output (the out-projection's input, (n, L_q, E)) and the out-projection's output."""
    n, Lq, E = query.shape
    Lk, H = key.shape[1], module.num_heads
    packed = module._qkv_same_embed_dim
    runs = _runs(query, key, value, packed)
    b = module.in_proj_bias
    if packed and len(runs) == 1:
        weights, biases = [module.in_proj_weight], [b]
    elif packed:  # one split of the packed weight: the parameter keeps a single use in the graph
        sizes = [len(roles) * E for roles, _ in runs]
        weights = module.in_proj_weight.split(sizes)
        biases = b.split(sizes) if b is not None else [None] * len(runs)
    else:
        weights = [getattr(module, f"{r}_proj_weight") for r in _ROLES]
        biases = b.chunk(3) if b is not None else [None] * 3
    blocks, heads = [], []
    for (roles, x), w, bias in zip(runs, weights, biases):
        P = F.linear(x, w, bias)
        blocks.append((roles, x, P))
        heads += P.unflatten(-1, (len(roles), H, E // H)).permute(2, 0, 3, 1, 4).unbind(0)  # each (n, H, L, E/H)
    q, k, v = heads
    if is_causal and key_padding_mask is None and not need_weights:
        mask, causal = None, True  # as F.multi_head_attention_forward: the hint stands for attn_mask
    else:
        mask, causal = None, False
        if attn_mask is not None:
            mask = _float_mask(attn_mask, query.dtype)
            mask = mask.view(n, H, Lq, Lk) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, query.dtype).view(n, 1, 1, Lk)
            mask = kpm if mask is None else mask + kpm
    O = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=causal)
    O = O.transpose(1, 2).reshape(n, Lq, E)
    return blocks, O, F.linear(O, module.out_proj.weight, module.out_proj.bias)


def recompute(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> tuple | None:
    """([(roles, input, output) per in-projection block], (O, y), the output to hand on) for a covered
    call, or None (leave the call alone).

    Inputs, outputs, O and y are batch-first (n, L, ·); the output handed on has the module's layout
    and its attention weights.
    """
    a = _arguments(module, args, kwargs)
    if a is None or set(a) - {"self", "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                              "average_attn_weights", "is_causal"}:
        return None
    query, key, value = a["query"], a["key"], a["value"]
    if not (isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in (query, key, value))):
        return None
    own = output[0]
    if (any(t.dim() != 3 or t.dtype != query.dtype for t in (key, value)) or query.dim() != 3 or query.dtype not in MATCH
            or own.shape != query.shape or (module.training and module.dropout > 0)):
        return None
    batch_first: dict[int, torch.Tensor] = {}  # one transposed view per distinct input: the blocks follow identity
    inputs = [batch_first.setdefault(id(t), t if module.batch_first else t.transpose(0, 1)) for t in (query, key, value)]
    kpm, mask = a["key_padding_mask"], a["attn_mask"]
    if (kpm is not None and kpm.dim() != 2) or (mask is not None and mask.dim() not in (2, 3)):
        return None
    blocks, O, y = attention_steps(module, *inputs, kpm, mask, bool(a["is_causal"]), bool(a["need_weights"]))
    mine = y if module.batch_first else y.transpose(0, 1)
    if not matches(own, mine):
        return None
    return blocks, (O, y), (mine, output[1])


class AttentionRule(Rule):
    """``nn.MultiheadAttention`` as its projections (a recompute hook; the module docstring)."""

    name = "attention"
    kinds = (nn.MultiheadAttention,)
    recomputes = True

    def matches(self, module: nn.Module) -> bool:
        return _covered(module)

    def parameters(self, module: nn.Module) -> list[torch.Tensor]:
        return _in_projection(module) + [p for p in (module.out_proj.weight, module.out_proj.bias) if p is not None]

    def claims(self, path: str, module: nn.Module, names: list[str], capture) -> list[Claim]:
        """The in-projection (layers made by each forward, one per block; grouped under the module's path, as the
        generic path groups it) and the out-projection (``….out_proj``), each a Linear over positions."""
        n_in = len(_in_projection(module))
        in_names, out_names = names[:n_in], names[n_in:]
        E = module.embed_dim
        out = stand_in(capture.cache, module, "out", E, E, module.out_proj.bias is not None)
        prefix = f"{path}." if path else ""
        return [Claim(self, module, in_names, [], whole=True),
                Claim(self, module, out_names, [Layer(f"{prefix}out_proj", out, out_names, self)])]

    def _block(self, capture, claim: Claim, path: str, roles: str, d_in: int) -> Layer:
        """The layer of the in-projection block ``roles`` ("qkv", "q", "kv", …) with input width ``d_in``."""
        if roles not in claim.made:
            m = claim.module
            weights = claim.params[:1] if m._qkv_same_embed_dim else [claim.params[_ROLES.index(roles)]]
            bias = claim.params[-1:] if m.in_proj_bias is not None else []
            block = stand_in(capture.cache, m, roles, d_in, len(roles) * m.embed_dim, m.in_proj_bias is not None)
            claim.made[roles] = Layer(path, block, weights + bias, self)
        return claim.made[roles]

    def install(self, capture, claims: list[Claim]) -> list:
        handles = []
        for in_claim, out_claim in zip(claims[::2], claims[1::2]):
            handles.append(in_claim.module.register_forward_hook(self._hook(capture, in_claim, out_claim), with_kwargs=True))
        return handles

    def _hook(self, capture, in_claim: Claim, out_claim: Claim):
        path = out_claim.layers[0].name.rsplit(".", 1)[0] if "." in out_claim.layers[0].name else "(root)"

        def hook(module, args, kwargs, output):
            got = recompute(module, args, kwargs, output)
            if got is None:  # not covered, or not a match: the module's output stands, its parameters go generic
                return None
            blocks, (O, y), handed = got
            for roles, x, P in blocks:
                capture.record(self._block(capture, in_claim, path, roles, x.shape[-1]), Record(x.detach(), P, P._version))
            capture.record(out_claim.layers[0], Record(O.detach(), y, y._version))
            return handed

        return hook

    def accumulator(self, layer, record, ctx):
        return LinearRule().accumulator(layer, record, ctx)
