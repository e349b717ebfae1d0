"""Many classes: the engine stays exact at C = 100 and C = 1000 (float64 oracle), and the logits layer is
contracted in closed form, (‖a‖² + 1)·I, with the other layers' passes seeded at its input."""

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import Probe, structural_matrix


def mlp(C: int) -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, C))


def cnn(C: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, C))


CASES = {"mlp": (mlp, (12,)), "cnn": (cnn, (1, 8, 8))}


@pytest.mark.parametrize("C", [100, 1000])
@pytest.mark.parametrize("name", list(CASES))
def test_many_classes_match_the_oracle_and_the_logits_layer_is_closed_form(name, C, passes):
    make, shape = CASES[name]
    torch.manual_seed(C)
    model = make(C).double()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = structural_matrix(model, x, method="gram", per_layer=True)
    reference = structural_oracle(model, x)[0]
    assert result.A.shape == (3, C, C) and rel_err(result.A, reference) < RTOL[torch.float64]
    head = [p for p in result.route if p.endswith("weight")][-1]
    assert result.route[head].form == "closed" and not result.route.generic()
    a = model[:-1](x).detach()  # the logits layer's input
    expected = ((a * a).sum(1) + 1)[:, None, None] * torch.eye(C, dtype=torch.float64)
    assert rel_err(result.per_layer[head.rsplit(".", 1)[0]], expected) < 1e-13
    assert passes  # the other layers' backward ran (seeded at the logits layer's input)


def test_a_logits_layer_alone_needs_no_backward_pass(passes):
    model, x = nn.Linear(5, 300).double(), torch.randn(4, 5, dtype=torch.float64)
    A = structural_matrix(model, x, method="gram").A
    assert passes == [] and rel_err(A, structural_oracle(model, x)[0]) < 1e-14


class SkipToLogits(nn.Module):
    """The logits layer's input also feeds the logits directly: the passes cannot start at it."""

    def __init__(self, C: int = 50) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, C), nn.Linear(C, C)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return h + self.head(h)


def test_the_seed_is_not_used_where_the_logits_layers_input_feeds_elsewhere():
    model, x = SkipToLogits().double(), torch.randn(3, 6, dtype=torch.float64)
    result = structural_matrix(model, x, method="gram")
    assert rel_err(result.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert result.route["head.weight"].form != "closed"  # z is not the logits: no closed form either


@pytest.mark.slow
def test_the_probe_is_exact_at_a_thousand_classes():
    torch.manual_seed(3)
    model = mlp(1000).double()
    x, y = torch.randn(2, 12, dtype=torch.float64), torch.tensor([3, 999])
    m = Probe(model, check=True).measure(x, y)  # ‖g‖² = eᵀAe against autograd on every sample
    assert bool(m.bound_holds.all()) and m.A.shape == (2, 1000, 1000)
