"""Models nobody here wrote: each case once crashed the engine or gave a silent wrong answer; each now gives the
exact answer or a clear error (one test per case)."""

import warnings

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import Probe, structural_matrix
from optmech.errors import NonFiniteLogitsError, NonFiniteStructureError
from optmech.structure import GenericPathWarning, clear_cache

METHODS = ["auto", "gram", "jacobian", "loop"]


class Temperature(nn.Module):
    """A learned 0-d temperature multiplying the logits of a Linear (``scale * f(x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.scale = nn.Linear(4, 3), nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return self.scale * torch.tanh(self.fc(x))


class OnlyDirect(nn.Module):
    """Only 0-d parameters, used in ways no rule follows: ``auto`` picks ``jacobian``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(-1.2))

    def forward(self, x):
        return torch.sin(self.a * x) + torch.pow(x, 2) * self.b


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [Temperature, OnlyDirect])
def test_zero_dimensional_parameters_are_exact_in_every_method(make, method):
    model = make().double()
    x = torch.randn(5, 4 if make is Temperature else 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = structural_matrix(model, x, method=method)
    assert rel_err(result.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    if make is OnlyDirect and method == "auto":
        assert result.method == "jacobian"


@pytest.mark.parametrize("method", METHODS)
def test_inference_mode_probe_and_engine_work_as_outside_it(method):
    """Lightning's validate/test run under torch.inference_mode: inputs made there are inference tensors."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    expected = Probe(model, method=method).measure(x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "gram failed" warning, no fallback
            m = Probe(model, method=method).measure(xi, yi)
            A = structural_matrix(model, xi, method=method).A
    assert torch.allclose(m.gradient_norm, expected.gradient_norm, rtol=1e-12)
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


def test_a_model_built_under_inference_mode_is_refused_clearly():
    with torch.inference_mode():
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="model: expected parameters usable by autograd, got inference tensors"):
        structural_matrix(model, torch.randn(2, 3))


def test_one_logit_is_refused_by_the_probe_with_the_fix():
    """(B, 1) outputs give p = q = 1, E_f = 0 and a 'holding' bound on every sample: refused, not reported."""
    with pytest.raises(ValueError, match=r"expected logits for at least 2 classes, got shape \(4, 1\).*torch.cat\(\[-z, z\], 1\)"):
        Probe(nn.Linear(3, 1)).measure(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    # the structural matrix itself is defined for one output (a 1×1 ‖J‖²)
    model, x = nn.Linear(3, 1).double(), torch.randn(4, 3, dtype=torch.float64)
    assert rel_err(structural_matrix(model, x).A, structural_oracle(model, x)[0]) < 1e-13


@pytest.mark.parametrize("method", METHODS)
def test_a_wrong_input_width_names_the_inputs_without_a_fallback_warning(method):
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"inputs: the model's own forward fails on inputs of shape \(5, 4\).*mat1 and mat2"):
            structural_matrix(model, torch.randn(5, 4), method=method)


def test_a_meta_device_model_is_refused_clearly():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    for call in (lambda: structural_matrix(model, torch.randn(2, 4)),
                 lambda: Probe(model).measure(torch.randn(2, 4), torch.tensor([0, 1]))):
        with pytest.raises(ValueError, match="model: expected parameters that hold values, got parameters on the meta device"):
            call()
    with pytest.raises(ValueError, match="inputs: expected a tensor that holds values"):
        structural_matrix(nn.Linear(4, 3), torch.empty(2, 4, device="meta"))


class NaNLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * torch.where(x[:, :1] > 0, float("nan"), 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_nan_logits_raise_in_the_engine_as_in_the_probe(method):
    x = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [2.0, 1, 1]])
    with pytest.raises(NonFiniteLogitsError, match=r"model output: expected finite logits, got NaN or inf in samples \[0, 2\]"):
        structural_matrix(NaNLogits(), x, method=method)


def test_an_overflowing_structural_matrix_is_named_as_such():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.full((2, 3), 1e20)  # ‖x‖² = 3e40 overflows float32; the logits (3e20) do not
    with pytest.raises(NonFiniteStructureError, match=r"NaN or inf in samples \[0, 1\] with finite logits"):
        structural_matrix(model, x)


def test_a_fallback_to_the_generic_path_is_warned_once_naming_the_parameter_and_the_reason():
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.shift = nn.Linear(3, 2), nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.fc(x) - self.shift  # subtracted: no rule follows it

    model, x = Shift(), torch.randn(4, 3)
    clear_cache(model)
    with pytest.warns(GenericPathWarning, match=r"shift \(used directly in an op the fast path does not follow"):
        route = structural_matrix(model, x, method="gram").route
    assert route["shift"].form == "generic" and route["fc.weight"].rule == "linear"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        structural_matrix(model, x, method="gram")  # said once per model
