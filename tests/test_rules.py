"""Every rule of the registry, written once and run over the registry (DESIGN §4.3): on a model where it takes
its parameters, the route names it, each layer's share matches the float64 oracle's, and a mutation of its
formula (its accumulator's result off by a rank-one term of relative size 1e-6) is caught by the same check."""

import pytest
import torch
from helpers import RTOL, rel_err
from torch import nn

from optmech import structural_matrix
from optmech.structure.rules import DIRECT, MODULE_RULES


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)).mean(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Transposed(nn.Module):
    """ConvTranspose2d (strided, dilated, padded, output_padding) then ConvTranspose1d without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2))
        self.up1 = nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, bias=False)
        self.head = nn.LazyLinear(3)

    def forward(self, x):  # (n, 2, 4, 3)
        h = torch.tanh(self.up2(x)).mean(3)  # (n, 3, 8)
        return self.head(torch.tanh(self.up1(h)).flatten(1))


class Direct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.pos, self.scale = nn.Linear(4, 4), nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (n, 5, 4)
        return self.head((torch.tanh(self.fc(x) + self.pos) * self.scale).mean(1))


g = torch.Generator().manual_seed(0)
#: rule name -> (a model on which it takes parameters, inputs)
CASES = {
    "linear": lambda: (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(5, 4, generator=g)),
    "conv": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 2, groups=2), nn.Tanh(),
                                   nn.Flatten(), nn.Linear(4 * 2 * 2, 3)),
                     torch.randn(4, 2, 8, 8, generator=g)),
    "conv_transpose": lambda: (Transposed(), torch.randn(4, 2, 4, 3, generator=g)),
    "norm": lambda: (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(5, 4, generator=g)),
    "embedding": lambda: (Tokens(), torch.randint(0, 7, (5, 6), generator=g)),
    "attention": lambda: (Attention(), torch.randn(4, 5, 4, generator=g)),
    "recurrent": lambda: (Recurrent(), torch.randn(4, 6, 4, generator=g)),
    "direct": lambda: (Direct(), torch.randn(4, 5, 4, generator=g)),
}


def test_every_rule_of_the_registry_has_a_case():
    assert {rule.name for rule in (*MODULE_RULES, DIRECT)} == set(CASES)


def _mutated(rule, monkeypatch):
    """The rule's accumulators return their share plus a rank-one term of 1e-6 of its scale."""
    make = type(rule).accumulator

    def accumulator(self, layer, record, ctx):
        acc = make(self, layer, record, ctx)
        result = acc.result

        def off():
            A = result()
            u = torch.ones(A.shape[-1], dtype=A.dtype, device=A.device)
            return A + 1e-6 * A.abs().amax() * torch.outer(u, u)

        acc.result = off
        return acc

    monkeypatch.setattr(type(rule), "accumulator", accumulator)


@pytest.mark.parametrize("mutate", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_matches_the_oracle_and_a_mutated_formula_does_not(name, mutate, monkeypatch):
    torch.manual_seed(3)
    model, x = CASES[name]()
    model(x)  # materialise lazy layers
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    reference = structural_matrix(model, x, method="loop", per_layer=True)
    rule = next(r for r in (*MODULE_RULES, DIRECT) if r.name == name)
    if mutate:
        _mutated(rule, monkeypatch)
    result = structural_matrix(model, x, method="gram", per_layer=True)
    taken = [p for p, r in result.route.items() if r.rule == name]
    assert taken and not result.route.generic()
    groups = {p.rsplit(".", 1)[0] if "." in p else "(root)" for p in taken}
    errors = {g: rel_err(result.per_layer[g], reference.per_layer[g]) for g in groups}
    if mutate:  # the check that passes the rule fails its mutation, on every group it takes
        assert all(e > RTOL[torch.float64] for e in errors.values()), errors
    else:
        assert all(e < RTOL[torch.float64] for e in errors.values()), errors
        assert rel_err(result.A, reference.A) < RTOL[torch.float64]
