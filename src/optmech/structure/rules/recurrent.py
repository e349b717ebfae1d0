"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` on the fast path: their weights as Linear layers over time steps.

One layer and direction of a recurrent module, on a batch-first sequence x (n, L, d_in), computes at
each step t (the reverse direction from t = L−1 down to 0, its "previous" state being h_{t+1})

    u_t = W_ih x_t + b_ih,    w_t = W_hh h_{t−1} + b_hh        (G·H rows: G gates of width H)
    LSTM: [i, f, g, o] = u_t + w_t,  c_t = σ(f)⊙c_{t−1} + σ(i)⊙tanh(g),  h_t = σ(o)⊙tanh(c_t)
    RNN:  h_t = tanh(u_t + w_t)  (or relu)
    GRU:  [r, z] = σ(u_t^{rz} + w_t^{rz}),  n_t = tanh(u_t^n + r⊙w_t^n),  h_t = (1 − z)⊙n_t + z⊙h_{t−1}

so, with g_t = ∂f_c/∂u_t, the per-sample gradients are ∂f_c/∂W_ih = Σ_t g_t x_tᵀ, ∂f_c/∂b_ih = Σ_t g_t
and, since ∂f_c/∂w_t = g_t for LSTM and RNN and g_t ⊙ [1, 1, r_t] for GRU (only the n gate's
hidden part is scaled by r), ∂f_c/∂W_hh = Σ_t (∂f_c/∂w_t) h_{t−1}ᵀ, ∂f_c/∂b_hh = Σ_t ∂f_c/∂w_t: Linear
layers over the L positions (:mod:`.linear`'s Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'})), whose inputs are
x_t and h_{t−1} (values of the forward) and whose output gradients all come from the one tensor
u = W_ih x + b_ih (n, L, G·H), which the backward passes reach as any layer output. For LSTM and RNN
the two are one Linear over positions with input a_t = [x_t, h_{t−1}, √2] (the biases b_ih and b_hh
have the same gradient, so their Gram is twice that of one: the constant column √2 gives it); for
GRU there are two, [x_t, 1] and [h_{t−1}, 1], the second with b_c ⊙ [1, 1, r_t].

Claims every ``weight_ih_l*``, ``weight_hh_l*``, ``bias_ih_l*``, ``bias_hh_l*``.

The module runs its fused kernel, where no hook reaches u_t, so in the standalone ``gram`` call a
forward hook recomputes the call step by step from the module's own parameters (``F.linear`` for u
over all positions at once, then the recurrence) and hands the model that output in place of the
module's, after checking it against the module's own (as :mod:`.attention` does; a call that does
not match or is not covered keeps the module's output, and its parameters go to the generic path).

Covered: every layer count, ``bidirectional``, ``batch_first`` either way, ``bias`` on or off, RNN's
tanh and relu, an initial state given or not, 3-D (batched) inputs. Not covered (generic): packed
sequences, unbatched 2-D inputs, LSTM's ``proj_size``. Not in the training-step capture, which must
leave the step's graph as the model builds it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..stand_in import MATCH, matches, stand_in
from .base import Claim, Layer, Record, Rule
from .linear import LinearRule

__all__ = ["RecurrentRule", "recurrent_steps", "recompute_recurrent"]

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}

def _covered(module: nn.Module) -> bool:
    return type(module) in _GATES and getattr(module, "proj_size", 0) == 0


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _parts(module: nn.RNNBase) -> list[tuple[str, int, int, list[str], int]]:
    """(kind, layer, direction, parameter attribute names, input width of the stand-in) of each Linear over positions.

    kind "ihh": LSTM/RNN, W_ih and W_hh as one Linear on [x_t, h_{t−1}, √2]; GRU: "ih" on [x_t, 1] and "hh" on [h_{t−1}, 1].
    """
    H, gru = module.hidden_size, type(module) is nn.GRU
    out = []
    for layer in range(module.num_layers):
        d_in = module.input_size if layer == 0 else H * (2 if module.bidirectional else 1)
        for direction in range(2 if module.bidirectional else 1):
            s = _suffix(layer, direction)
            const = int(module.bias)
            if gru:
                out.append(("ih", layer, direction, [f"weight_ih{s}"] + ([f"bias_ih{s}"] if module.bias else []), d_in + const))
                out.append(("hh", layer, direction, [f"weight_hh{s}"] + ([f"bias_hh{s}"] if module.bias else []), H + const))
            else:
                names = [f"weight_ih{s}", f"weight_hh{s}"] + ([f"bias_ih{s}", f"bias_hh{s}"] if module.bias else [])
                out.append(("ihh", layer, direction, names, d_in + H + const))
    return out


@dataclasses.dataclass
class RecurrentStep:
    """What one Linear over positions of a recomputed call hands the capture: its input a (n, L, width),
    the output u whose gradient it reads (n, L, G·H), and the factor on that gradient (GRU's hh: [1, 1, r]) or None."""

    key: tuple
    a: torch.Tensor
    u: torch.Tensor
    scale: torch.Tensor | None


def _direction(module: nn.RNNBase, layer: int, direction: int, xs: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One layer and direction on batch-first xs (n, L, d_in) from state h (n, H) (and c for LSTM):
    (outputs (n, L, H), last h, last c, [RecurrentStep])."""
    s = _suffix(layer, direction)
    W_ih, W_hh = getattr(module, f"weight_ih{s}"), getattr(module, f"weight_hh{s}")
    b_ih, b_hh = (getattr(module, f"bias_ih{s}"), getattr(module, f"bias_hh{s}")) if module.bias else (None, None)
    kind = type(module)
    n, L, _ = xs.shape
    u = F.linear(xs, W_ih, b_ih)  # (n, L, G·H), all positions at once: the tensor the backward passes reach
    # W_hh and b_hh enter the graph once each (the steps read Wt and bh): a second use elsewhere is then seen
    Wt = W_hh.t()
    bh = b_hh.expand(n, -1) if b_hh is not None else None
    ut = u.unbind(1)  # one node, whose backward stacks the L steps' gradients (L selects: L full-size zero tensors)
    hs: list[torch.Tensor | None] = [None] * L
    prev: list[torch.Tensor | None] = [None] * L
    rs: list[torch.Tensor | None] = [None] * L
    for t in (range(L - 1, -1, -1) if direction else range(L)):
        prev[t] = h
        w = torch.addmm(bh, h, Wt) if bh is not None else h @ Wt
        if kind is nn.LSTM:
            i, f, g, o = (ut[t] + w).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif kind is nn.GRU:
            ur, uz, un = ut[t].chunk(3, 1)
            wr, wz, wn = w.chunk(3, 1)
            r, z = torch.sigmoid(ur + wr), torch.sigmoid(uz + wz)
            h = torch.lerp(torch.tanh(un + r * wn), h, z)  # (1 − z)·n + z·h
            rs[t] = r.detach()
        else:
            h = torch.tanh(ut[t] + w) if module.nonlinearity == "tanh" else torch.relu(ut[t] + w)
        hs[t] = h
    with torch.no_grad():
        h_prev = torch.stack(prev, 1)  # (n, L, H): h_{t−1} (h_{t+1} in reverse)
        if kind is nn.GRU:
            ones = torch.ones(n, L, 1, dtype=xs.dtype, device=xs.device)
            const = [ones] if module.bias else []
            r_all = torch.stack(rs, 1)
            scale = torch.cat([torch.ones_like(r_all), torch.ones_like(r_all), r_all], 2)
            steps = [RecurrentStep(("ih", layer, direction), torch.cat([xs.detach(), *const], 2), u, None),
                     RecurrentStep(("hh", layer, direction), torch.cat([h_prev, *const], 2), u, scale)]
        else:
            const = [torch.full((n, L, 1), math.sqrt(2.0), dtype=xs.dtype, device=xs.device)] if module.bias else []
            steps = [RecurrentStep(("ihh", layer, direction), torch.cat([xs.detach(), h_prev, *const], 2), u, None)]
    return torch.stack(hs, 1), h, c, steps


def recurrent_steps(module: nn.RNNBase, x: torch.Tensor, hx) -> tuple[list[RecurrentStep], torch.Tensor, object]:
    """([RecurrentStep] of every layer and direction, output (n, L, D·H), final state as the module returns it)
    for batch-first x (n, L, input_size) and the module's ``hx`` (None, h0, or (h0, c0); (D·layers, n, H))."""
    n = x.shape[0]
    D, H = 2 if module.bidirectional else 1, module.hidden_size
    lstm = type(module) is nn.LSTM
    if hx is None:
        zeros = torch.zeros(D * module.num_layers, n, H, dtype=x.dtype, device=x.device)
        h0, c0 = zeros, (zeros if lstm else None)
    else:
        h0, c0 = hx if lstm else (hx, None)
    steps, h_n, c_n = [], [], []
    for layer in range(module.num_layers):
        outs = []
        for direction in range(D):
            i = layer * D + direction
            o, h, c, parts = _direction(module, layer, direction, x, h0[i], c0[i] if lstm else None)
            outs.append(o)
            h_n.append(h)
            c_n.append(c)
            steps += parts
        x = torch.cat(outs, 2) if D == 2 else outs[0]
    state = torch.stack(h_n)
    return steps, x, ((state, torch.stack(c_n)) if lstm else state)


def _arguments(args: tuple, kwargs: dict):
    """(input, hx) of a call ``module(input, hx=None)``, or None when the call has another form."""
    if len(args) + len(kwargs) > 2 or set(kwargs) - {"input", "hx"} or not args and "input" not in kwargs:
        return None
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def _state_ok(hx, module: nn.RNNBase, x: torch.Tensor, n: int) -> bool:
    D = 2 if module.bidirectional else 1
    shape = (D * module.num_layers, n, module.hidden_size)
    if type(module) is nn.LSTM and not (isinstance(hx, tuple) and len(hx) == 2):
        return False
    states = hx if type(module) is nn.LSTM else (hx,)
    return all(isinstance(s, torch.Tensor) and tuple(s.shape) == shape and s.dtype == x.dtype for s in states)


def recompute_recurrent(module: nn.RNNBase, args: tuple, kwargs: dict, output) -> tuple[list[RecurrentStep], tuple] | None:
    """([RecurrentStep] of each layer and direction, the output to hand on in the module's layout) for a covered
    call whose recomputation matches the module's own output, or None (leave the call alone)."""
    got = _arguments(args, kwargs)
    if got is None or not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor)):
        return None
    x, hx = got
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in MATCH or x.shape[-1] != module.input_size:
        return None  # a PackedSequence, an unbatched sequence, an unexpected width
    xb = x if module.batch_first else x.transpose(0, 1)
    if hx is not None and not _state_ok(hx, module, x, xb.shape[0]):
        return None
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return None
    steps, y, state = recurrent_steps(module, xb, hx)
    mine = y if module.batch_first else y.transpose(0, 1)
    own_states = output[1] if isinstance(output[1], tuple) else (output[1],)
    my_states = state if isinstance(state, tuple) else (state,)
    if not all(matches(own, new) for own, new in zip((output[0], *own_states), (mine, *my_states))):
        return None
    return steps, (mine, state)


class RecurrentRule(Rule):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` as Linear layers over time steps (a recompute hook; the module docstring)."""

    name = "recurrent"
    kinds = tuple(_GATES)
    recomputes = True

    def matches(self, module: nn.Module) -> bool:
        return _covered(module)

    def parameters(self, module: nn.Module) -> list[torch.Tensor]:
        return [getattr(module, attr) for _, _, _, attrs, _ in _parts(module) for attr in attrs]

    def claims(self, path: str, module: nn.Module, names: list[str], capture) -> list[Claim]:
        """One claim per module; one layer per (kind, layer, direction), each grouped under the module's path."""
        G, H = _GATES[type(module)], module.hidden_size
        layers, i = [], 0
        for kind, layer, direction, attrs, width in _parts(module):
            own = names[i : i + len(attrs)]
            i += len(attrs)
            key = (kind, layer, direction)
            layers.append(Layer(path or "(root)", stand_in(capture.cache, module, key, width, G * H, False), own, self, key=key))
        return [Claim(self, module, names, layers)]

    def install(self, capture, claims: list[Claim]) -> list:
        return [claim.module.register_forward_hook(self._hook(capture, claim), with_kwargs=True) for claim in claims]

    def _hook(self, capture, claim: Claim):
        by_key = {layer.key: layer for layer in claim.layers}

        def hook(module, args, kwargs, output):
            got = recompute_recurrent(module, args, kwargs, output)
            if got is None:  # not covered, or not a match: the module's output stands, its parameters go generic
                return None
            steps, handed = got
            for step in steps:
                capture.record(by_key[step.key], Record(step.a, step.u, step.u._version, scale=step.scale))
            return handed

        return hook

    def accumulator(self, layer, record, ctx):
        return LinearRule().accumulator(layer, record, ctx)
