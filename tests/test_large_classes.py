"""Many classes: the engine stays exact at C = 100 and C = 1000 (float64 oracle), and the logits layer is
contracted in closed form, (‖a‖² + 1)·I, with the other layers' passes seeded at its input; a logits layer
narrower than C factors A = s·I + Q M Qᵀ (structure/head.py), and the probe's spectrum comes from the factors."""

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import EngineOptions, Probe, structural_matrix
from optmech.metrics import eigvalsh
from optmech.structure.head import factoring_pays


def mlp(C: int) -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, C))


def cnn(C: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, C))


CASES = {"mlp": (mlp, (12,)), "cnn": (cnn, (1, 8, 8))}


@pytest.mark.parametrize("factor", [True, False])
@pytest.mark.parametrize("C", [100, 1000])
@pytest.mark.parametrize("name", list(CASES))
def test_many_classes_match_the_oracle_and_the_logits_layer_is_closed_form(name, C, factor, passes):
    make, shape = CASES[name]
    torch.manual_seed(C)
    model = make(C).double()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = structural_matrix(model, x, method="gram", per_layer=True, options=EngineOptions(factor_head=factor))
    reference = structural_oracle(model, x)[0]
    assert result.A.shape == (3, C, C) and rel_err(result.A, reference) < RTOL[torch.float64]
    assert (result.head is not None) == factor  # logits layers of width 16 and 36, narrower than C
    if factor:
        assert rel_err(result.head.form(torch.float64), reference) < RTOL[torch.float64]
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


def test_the_factors_give_the_spectrum_and_lambda_min_is_the_logits_layers_share():
    """A = s·I + Q M Qᵀ: its eigenvalues are s (C − d times) and s + eig(M), so λmin = s = ‖h‖² + 1."""
    from optmech.metrics import head_spectrum, symmetric_float64

    torch.manual_seed(0)
    model, C = mlp(300).double(), 300
    x = torch.randn(4, 12, dtype=torch.float64)
    result = structural_matrix(model, x, method="gram")
    head = result.head
    assert head.basis.shape == (C, 16) and head.core.shape == (4, 16, 16)
    assert torch.allclose(head.basis.T @ head.basis, torch.eye(16, dtype=torch.float64), atol=1e-13)
    dense = torch.linalg.eigvalsh(symmetric_float64(result.A))
    factored = head_spectrum(head.scale, symmetric_float64(head.core), C)
    assert (factored - dense).abs().max() <= 1e-10 * dense[:, -1].max()
    h = model[:-1](x).detach()
    assert torch.allclose(factored[:, 0], (h * h).sum(1) + 1, rtol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_the_probe_measures_from_the_factors_what_it_measures_from_A(name):
    make, shape = CASES[name]
    torch.manual_seed(1)
    model, C = make(200).double(), 200
    x, y = torch.randn(5, *shape, dtype=torch.float64), torch.randint(0, C, (5,))
    factored = Probe(model, check=True).measure(x, y)
    dense = Probe(model, options=EngineOptions(factor_head=False)).measure(x, y)
    assert factored.head is not None and factored.given_A is None and dense.head is None
    a, b = factored.to_frame(), dense.to_frame()
    for column in ("gradient_norm", "lambda_min", "lambda_max", "U", "L", "G", "lower", "upper"):
        assert torch.allclose(torch.tensor(a[column].values), torch.tensor(b[column].values), rtol=1e-10), column
    assert bool(factored.bound_holds.all()) and (a["bound_holds"] == b["bound_holds"]).all()
    assert (factored.eigenvalues - dense.eigenvalues).abs().max() <= 1e-10 * dense.lambda_max.max()
    assert rel_err(factored.A, dense.A) < 1e-12  # formed from the factors when read
    shares = Probe(model, per_layer=True).measure(x, y)  # per-layer shares, the logits layer's included
    assert shares.given_A is None and rel_err(sum(shares.per_layer.values()), dense.A) < 1e-12
    # the extras read A: formed from the factors, same values
    extra = Probe(model, extras=("perp", "gic")).measure(x, y).to_frame()
    extra_dense = Probe(model, extras=("perp", "gic"), options=EngineOptions(factor_head=False)).measure(x, y).to_frame()
    for column in ("lambda_min_perp", "lambda_max_perp", "gic_max_cos"):
        assert torch.allclose(torch.tensor(extra[column].values), torch.tensor(extra_dense[column].values), rtol=1e-10)


def test_the_training_step_capture_uses_the_factors_too():
    torch.manual_seed(2)
    model = mlp(150).double()
    x, y = torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 150, (4,))
    probe = Probe(model, check=True)
    with probe.capture() as step:
        logits = model(x)
    m = step.measure(x, y, logits)
    reference = Probe(model, options=EngineOptions(factor_head=False)).measure(x, y)
    assert m.head is not None and torch.allclose(m.lambda_max, reference.lambda_max, rtol=1e-10)
    assert torch.allclose(m.gradient_norm, reference.gradient_norm, rtol=1e-10)


def test_factoring_for_a_dense_A_only_where_it_pays():
    """One hidden layer as wide as the logits layer's input: through the factors A would cost more (d³ + C·d² +
    C²·d against C²·d); the probe, which needs no dense A, factors all the same."""
    assert not factoring_pays(90, 100, 90) and factoring_pays(256, 1000, 512) and factoring_pays(10, 1000, 20)
    model = nn.Sequential(nn.Linear(5, 90), nn.Tanh(), nn.Linear(90, 100)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert structural_matrix(model, x, method="gram").head is None
    lazy = structural_matrix(model, x, method="gram", dense=False)
    assert lazy.A is None and lazy.head is not None
    assert rel_err(lazy.head.form(torch.float64), structural_oracle(model, x)[0]) < RTOL[torch.float64]


def test_chunks_left_to_the_factors_are_formed_when_another_chunk_needs_A_whole():
    """An in-place ReLU on a layer's output sends it generic in the first chunk (fast from the next on): that chunk
    is not of the factored form, the later ones are, and A comes back whole and exact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 40)).double()
    x = torch.randn(6, 6, dtype=torch.float64)
    result = structural_matrix(model, x, method="gram", chunk_size=2, dense=False)
    assert sorted(result.route.generic()) == ["0.bias", "0.weight"]  # in the first chunk
    assert result.head is None and result.A is not None
    assert rel_err(result.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    again = structural_matrix(model, x, method="gram", chunk_size=2, dense=False)  # every chunk fast now: A left to the factors
    assert again.A is None and rel_err(again.head.form(), result.A) < 1e-12


def test_the_threaded_eigensolver_matches_torch_and_restores_the_thread_count():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 70, 80, generator=g, dtype=torch.float64)
    S = X @ X.mT
    threads = torch.get_num_threads()
    assert torch.allclose(eigvalsh(S), torch.linalg.eigvalsh(S), rtol=1e-11, atol=1e-9)
    assert torch.get_num_threads() == threads


def test_the_logits_weights_QR_is_reused_until_the_weight_changes():
    from optmech.structure import model_cache

    torch.manual_seed(6)
    model = mlp(300).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    structural_matrix(model, x, method="gram")
    basis = model_cache(model).head_basis[1]
    structural_matrix(model, x, method="gram")
    assert model_cache(model).head_basis[1] is basis  # unchanged weight: the same QR
    with torch.no_grad():
        model[-1].weight.mul_(-2.0)  # an optimiser step writes in place
    result = structural_matrix(model, x, method="gram")
    assert model_cache(model).head_basis[1] is not basis
    assert rel_err(result.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    model[-1].weight = nn.Parameter(torch.randn_like(model[-1].weight))  # a new weight tensor
    result = structural_matrix(model, x, method="gram")
    assert rel_err(result.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


def test_a_formed_A_is_scanned_for_overflow_only_where_its_factors_do_not_bound_it():
    from optmech.errors import NonFiniteStructureError
    from optmech.structure.head import LowRankHead

    Q = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
    formed = torch.full((2, 6, 6), float("nan"))  # stands for an A that the factors' bound would let through
    small = LowRankHead(torch.ones(2), Q, torch.eye(2).expand(2, 2, 2).clone())
    small.check_finite(formed=formed)  # (d + 1)·max|M, s| = 3 is far inside float32: A is not read
    huge = LowRankHead(torch.ones(2), Q, torch.full((2, 2, 2), 1e38))
    with pytest.raises(NonFiniteStructureError, match=r"NaN or inf in samples \[0, 1\]"):
        huge.check_finite(formed=formed)  # near float32's range: A itself is checked
    with pytest.raises(NonFiniteStructureError, match=r"NaN or inf in samples \[1\]"):
        LowRankHead(torch.ones(2), Q, torch.stack([torch.eye(2), torch.full((2, 2), float("inf"))])).check_finite()


def test_the_factored_path_raises_on_overflow_like_the_dense_one():
    from optmech.errors import NonFiniteStructureError

    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 40))
    with torch.no_grad():
        model[0].weight.fill_(1e19)
    x = torch.ones(4, 3)
    for factor in (True, False):
        with pytest.raises(NonFiniteStructureError):
            structural_matrix(model, x, method="gram", options=EngineOptions(factor_head=factor))
