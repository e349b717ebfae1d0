"""The standalone ``gram`` call runs the model on channels-last convolution outputs (CPU): still exact.

Each Conv2d output is handed on in channels-last (the layers after keep that layout), the backward
passes stop at that copy, and a model whose forward cannot take the layout (a ``.view`` of a
convolution's output) is retried in its own layout, for good.
"""

import logging

import pytest
import torch
from helpers import RTOL, captured_gram, family_cases, rel_err, unusual_models
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.models import build
from optmech.structure import EngineOptions, ForwardCapture, layout, model_cache, probing, trainable_parameters
from optmech.structure.rules import conv as conv_rule

CASES = {k: v for k, v in {**family_cases(), **unusual_models()}.items() if any(type(m) is nn.Conv2d for m in v[0].modules())}


@pytest.fixture
def conversions(monkeypatch):
    """Counts the Conv2d outputs handed on in channels-last."""
    seen = []
    original = conv_rule.to_channels_last

    def spy(z):
        converted = original(z)
        seen.append(converted)
        return converted

    monkeypatch.setattr(conv_rule, "to_channels_last", spy)
    return seen


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_gram_matches_the_oracle_with_and_without_channels_last(case, enabled, conversions):
    options = EngineOptions(channels_last=enabled)
    model, x = CASES[case]
    A_ref, _ = structural_oracle(model, x)
    for _ in range(2):  # the second call also runs with the layers' kept buffers
        _r = structural_matrix(model, x, method="gram", per_layer=True, options=options)
        A, layers = _r.A, _r.per_layer
        assert rel_err(A, A_ref) < RTOL[torch.float64], f"{case}: {rel_err(A, A_ref):.2e}"
        assert rel_err(sum(layers.values()), A) < 1e-12
    claims = ForwardCapture(model, trainable_parameters(model), options).claims
    fast_convs = any(type(layer.module) is nn.Conv2d for claim in claims for layer in claim.layers)
    assert any(conversions) == (enabled and fast_convs), "channels-last applied exactly when enabled"


def test_the_logits_are_the_models_own_and_the_model_is_left_as_it_was(conversions):
    model, x = CASES["resnet-skip"]
    strides = {name: p.stride() for name, p in model.named_parameters()}
    logits = structural_matrix(model, x, method="gram").logits
    assert any(conversions)
    with torch.no_grad(), probing(model):
        assert rel_err(logits, model(x)) < 1e-13
    assert {name: p.stride() for name, p in model.named_parameters()} == strides
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_float32_results_agree_with_and_without_channels_last_and_with_the_float64_oracle():
    model = build("resnet", depth=1, skip=True, seed=0)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with_layout = structural_matrix(model, x, method="gram").A
    without = structural_matrix(model, x, method="gram", options=EngineOptions(channels_last=False)).A
    reference = structural_oracle(model.double(), x.double())[0]
    assert with_layout.dtype == torch.float32
    assert rel_err(with_layout.double(), without.double()) < 1e-5
    assert rel_err(with_layout.double(), reference) < RTOL[torch.float32]


class ViewAfterConv(nn.Module):
    """A forward that flattens a convolution's output with ``.view``: fails on a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_a_forward_that_cannot_take_channels_last_is_retried_in_its_own_layout(caplog, conversions):
    model = ViewAfterConv().double()
    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = structural_oracle(model, x)[0]
    with caplog.at_level(logging.INFO, logger="optmech.structure"):
        _r = structural_matrix(model, x, method="auto")
        A, ran = _r.A, _r.method
    assert ran == "gram" and rel_err(A, reference) < RTOL[torch.float64]
    assert model_cache(model).own_layout
    assert "does not run on channels-last convolution outputs" in caplog.text and "view" in caplog.text
    conversions.clear()
    assert rel_err(structural_matrix(model, x, method="gram", chunk_size=3).A, reference) < RTOL[torch.float64]
    assert not any(conversions), "not tried again"


def test_errors_that_are_not_about_the_layout_still_surface(monkeypatch):
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            raise RuntimeError("the model's own bug")

    with pytest.raises(ValueError, match="the model's own forward fails .*the model's own bug"):
        structural_matrix(Broken(), torch.randn(2, 1, 5, 5), method="gram")


def test_a_model_already_in_channels_last_is_not_converted(conversions):
    model = build("cnn", depth=2, skip=False, input_shape=(3, 8, 8), seed=1, dtype=torch.float64)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    A = structural_matrix(model, x, method="gram").A
    assert conversions and not any(conversions)
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


def test_the_training_step_capture_leaves_the_layout_alone(conversions):
    """The probe's capture inside a training step must not change what the training forward computes."""
    model, x = CASES["resnet-plain"]
    _, out, A = captured_gram(model, x)
    with torch.no_grad(), probing(model):
        assert torch.equal(out, model(x))
    assert not any(conversions)
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


@pytest.mark.parametrize("family", ["resnet", "snet"])
def test_the_recorded_outputs_are_the_channels_last_copies_and_the_pool_fold_still_applies(family):
    """z must be the tensor the model continues on: the backward passes then stop at it, and the
    Conv → ReLU → MaxPool chain (z → relu → pool) is still recognised and folded."""
    model = build(family, depth=1, skip=False, seed=0, dtype=torch.float64)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cap = ForwardCapture(model, trainable_parameters(model), EngineOptions.training_step().replace(channels_last=True))
    with probing(model):
        with cap, torch.enable_grad():
            out = model(x)
        convs = [r.z for records in cap.records.values() for r in records if r.z.dim() == 4]
        assert convs and all(layout.is_channels_last(z) for z in convs)
        A, routes = cap.structural_matrix(out, x, n_classes=out.shape[1])
    assert "pooled" in {r.form for r in routes.values()}
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
