"""The paper's quantities: exact identities on every sample, edge cases flagged, never a silent inf."""

import math

import numpy as np
import pytest
import torch
from helpers import unusual_models
from oracles import per_sample_jacobian
from torch import nn

from optmech import COLUMNS, Probe
from optmech.errors import NonFiniteLogitsError
from optmech.losses import get_loss
from optmech.metrics import measure_from, theorem3_holds
from optmech.models import FAMILIES, build
from optmech.probe import ConsistencyError, mode_dependent_modules

LOSSES = [("softmax", {}), ("sparsemax", {}), ("entmax15", {}), ("entmax", {"alpha": 1.8}), ("squared", {}), ("softmax", {"label_smoothing": 0.1})]


def _batch(n=6, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("loss,kw", LOSSES, ids=[f"{n}{kw}" for n, kw in LOSSES])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_norm_and_theorem3_on_every_sample(family, loss, kw):
    model = build(family, depth=1, skip=True, input_shape=(1, 8, 8), seed=1, dtype=torch.float64)
    x, y = _batch()
    m = Probe(model, loss, check=True, extras=("perp", "gic"), **kw).measure(x, y)  # check: eᵀAe vs autograd to 1e-8
    rel = (m.gradient_norm_autograd - m.gradient_norm).abs() / m.gradient_norm.clamp_min(1e-300)
    assert (rel[m.gradient_norm > 0] < 1e-8).all()
    assert m.bound_holds.all()
    ok = ~m.rank_deficient & ~m.exact_fit
    assert (m.lower[ok] <= m.log_fitting_error[ok] + 1e-9).all() and (m.log_fitting_error[ok] <= m.upper[ok] + 1e-9).all()
    assert torch.allclose(m.G[ok], (m.U - m.L)[ok]) and (m.G[ok] >= -1e-12).all()
    if get_loss(loss, **kw).simplex:
        assert m.bound_perp_holds.all()
        assert (m.lower_perp[ok] >= m.lower[ok] - 1e-9).all() and (m.upper_perp[ok] <= m.upper[ok] + 1e-9).all()


def test_quantities_match_definitions_from_an_explicit_jacobian():
    model = build("snet", depth=1, input_shape=(1, 8, 8), seed=2, dtype=torch.float64)
    x, y = _batch(4)
    m = Probe(model).measure(x, y)
    J = per_sample_jacobian(model.eval(), x)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    e = p - torch.nn.functional.one_hot(y, 10).double()
    g = torch.einsum("bcp,bc->bp", J, e)
    lam = torch.linalg.eigvalsh(J @ J.transpose(1, 2))
    assert torch.allclose(m.gradient_norm, (g**2).sum(1), rtol=1e-10)
    assert torch.allclose(m.fitting_error, (e**2).sum(1), rtol=1e-12)
    assert torch.allclose(m.U, -torch.log2(lam[:, 0]), rtol=1e-9)
    assert torch.allclose(m.L, -torch.log2(lam[:, -1]), rtol=1e-9)
    assert torch.allclose(m.lower, torch.log2((g**2).sum(1)) - torch.log2(lam[:, -1]), rtol=1e-9)
    assert torch.allclose(m.structural_error, 2 * m.U, rtol=1e-12)  # (1, 1, 1) weights: S = 2U


def test_structural_error_weights():
    model = build("mlp", depth=1, input_shape=(1, 8, 8), seed=0, dtype=torch.float64)
    x, y = _batch(3)
    m = Probe(model, weights=(0.5, 2.0, 3.0)).measure(x, y)
    ok = ~m.rank_deficient
    assert torch.allclose(m.structural_error[ok], (0.5 * m.G + 2 * m.U + 3 * m.L)[ok])
    with pytest.raises(ValueError, match="weights"):
        Probe(model, weights=(1, 0, 1))


def test_unusual_models_through_the_probe():
    for name, (model, x) in unusual_models().items():
        with torch.no_grad():
            n_classes = model.eval()(x).shape[1]
        y = torch.arange(x.shape[0]) % n_classes
        m = Probe(model, check=True).measure(x, y)
        assert m.bound_holds.all(), name


def test_rank_deficient_sample_is_flagged_not_silent():
    """ReLU on the logits (the authors' LNet, READING F2): dead logits give λmin = 0."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-100.0, 10.0, 10.0, 10.0, 10.0]))  # logit 0 dead, the others alive
    x = torch.randn(3, 4, dtype=torch.float64)
    m = Probe(model).measure(x, torch.tensor([1, 2, 3]))
    assert m.rank_deficient.all()
    assert torch.isinf(m.U).all() and (m.U > 0).all() and torch.isinf(m.upper).all() and torch.isinf(m.G).all()
    assert torch.isfinite(m.L).all() and torch.isfinite(m.lower).all()
    assert m.bound_holds.all()  # the lower side still holds; the upper side is vacuous
    frame = m.to_frame()
    assert frame["rank_deficient"].all() and np.isinf(frame["U"]).all()


def test_exact_fit_is_flagged():
    """Sparsemax reaches p = q exactly: E_f = ‖g‖² = 0 and the log columns are −inf, flagged."""
    model = nn.Linear(3, 4).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    m = Probe(model, "sparsemax").measure(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 0]))
    assert m.exact_fit.all() and (m.fitting_error == 0).all() and (m.gradient_norm == 0).all()
    assert torch.isneginf(m.log_fitting_error).all() and m.bound_holds.all()


def test_biased_output_layer_forces_lambda_min_at_least_one_plus_h():
    """READING F1: with a final biased Linear z = W h + b, A_x ⪰ (1 + ‖h‖²) I, so U ≤ 0."""
    model = build("resnet", depth=1, skip=True, input_shape=(1, 8, 8), seed=0, dtype=torch.float64)
    x, y = _batch(4)
    m = Probe(model).measure(x, y)
    with torch.no_grad():
        h = model.pool(model.blocks(model.stem(x)))
    assert (m.lambda_min >= (1 + (h**2).sum(1)) * (1 - 1e-10)).all() and (m.U <= 0).all()


def test_theorem3_holds_detects_a_violation():
    E_f = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    g2 = torch.tensor([2.0, 0.4, 5.0], dtype=torch.float64)
    lam_min = torch.ones(3, dtype=torch.float64)
    lam_max = torch.full((3,), 4.0, dtype=torch.float64)
    holds = theorem3_holds(E_f, g2, lam_min, lam_max, torch.zeros(3, dtype=torch.bool))
    assert holds.tolist() == [True, False, False]  # 0.4 < E_f·λmin fails the upper side; 5 > E_f·λmax the lower


@pytest.mark.parametrize("narrow_head", [False, True])
def test_consistency_check_catches_a_wrong_structural_matrix(monkeypatch, narrow_head):
    """A doubled A, or doubled factors of a narrow logits layer (A = s·I + Q M Qᵀ), fails the autograd check."""
    import dataclasses

    import optmech.probe as probe_module

    if narrow_head:  # the probe's quantities come from the factors, A is not formed
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    else:
        model = nn.Linear(3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    probe = Probe(model, check=True)
    original = probe_module.structural_matrix

    def doubled(*a, **k):
        result = original(*a, **k)
        assert (result.head is not None) == narrow_head and (result.A is None) == narrow_head
        if narrow_head:
            head = result.head
            return dataclasses.replace(result, head=dataclasses.replace(head, core=2 * head.core, scale=2 * head.scale))
        return dataclasses.replace(result, A=2 * result.A)

    monkeypatch.setattr(probe_module, "structural_matrix", doubled)
    with pytest.raises(ConsistencyError, match="autograd gives"):
        probe.measure(x, torch.tensor([0, 1]))


def test_frame_has_every_documented_column_and_float32_models_work():
    model = build("cnn", depth=1, input_shape=(1, 8, 8), seed=0)
    x, y = _batch(5)
    m = Probe(model, check=True).measure(x.float(), y)
    frame = m.to_frame()
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 5 and len(m) == 5
    assert m.lambda_min.dtype == torch.float64 and m.bound_holds.all()


def test_probe_leaves_training_state_alone():
    model = build("mlp", depth=1, input_shape=(1, 8, 8), dropout=0.3, seed=0).train()
    x, y = _batch(3)
    rng = torch.get_rng_state()
    Probe(model, check=True).measure(x.float(), y)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "inputs,targets,match",
    [
        (torch.full((2, 1, 8, 8), math.nan), torch.tensor([0, 1]), "inputs: expected finite values"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([0, 1, 2]), "targets: expected 2 targets"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([0, 10]), r"class indices in \[0, 10\)"),
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, 9), r"distributions of shape \(batch, 10\)"),
        (torch.zeros(2, 1, 8, 8), [0, 1], "targets: expected a torch.Tensor"),
    ],
)
def test_probe_bad_input(inputs, targets, match):
    model = build("mlp", depth=0, input_shape=(1, 8, 8), seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        Probe(model).measure(inputs, targets)


def test_nan_logits_are_reported():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x) * torch.tensor(float("inf"))

    for method in ("gram", "jacobian", "loop"):
        with pytest.raises(NonFiniteLogitsError, match=r"model output: expected finite logits, got NaN or inf in samples \[0, 1\]"):
            Probe(Broken(), method=method).measure(torch.ones(2, 2), torch.tensor([0, 1]))


def test_measure_from_validates_weights():
    A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    p = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="weights"):
        measure_from(A, p, p, torch.zeros(2), simplex=True, weights=(1, 1, -1))


def test_per_layer_trace_columns():
    model = build("resnet", depth=1, skip=True, input_shape=(1, 8, 8), seed=0, dtype=torch.float64)
    x, y = _batch(3)
    m = Probe(model, per_layer=True).measure(x, y)
    frame = m.to_frame()
    layer_cols = [c for c in frame.columns if c.startswith("layer_trace:")]
    assert "layer_trace:fc" in layer_cols and "layer_trace:stem.0" in layer_cols
    total = m.A.diagonal(dim1=1, dim2=2).sum(-1).numpy()
    assert np.allclose(frame[layer_cols].sum(axis=1).to_numpy(), total, rtol=1e-12)


def test_capture_reuses_the_training_forward_and_matches_measure():
    model = build("snet", depth=1, skip=True, input_shape=(1, 8, 8), seed=0, dtype=torch.float64).train()
    x, y = _batch(5)
    probe = Probe(model, per_layer=True)
    expected = probe.measure(x, y)
    with probe.capture() as step:
        logits = model(x)
    m = step.measure(x, y, logits)
    for col in ("gradient_norm", "lambda_min", "lambda_max", "lower", "upper"):
        assert torch.allclose(getattr(m, col), getattr(expected, col), rtol=1e-10), col
    assert set(m.per_layer) == set(expected.per_layer)
    # the graph is still there for the training step
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_capture_refuses_models_with_active_dropout():
    model = build("mlp", depth=1, input_shape=(1, 8, 8), dropout=0.2, seed=0).train()
    with pytest.raises(ValueError, match="active dropout/BatchNorm modules"):
        Probe(model).capture()
    model.eval()
    Probe(model).capture()  # fine in eval mode


@pytest.mark.parametrize("make, active", [
    (lambda: nn.MultiheadAttention(4, 2, dropout=0.1), True),  # dropout on the attention weights, no Dropout submodule
    (lambda: nn.MultiheadAttention(4, 2), False),
    (lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.1), True),
    (lambda: nn.LSTM(4, 4, num_layers=1), False),
    (lambda: nn.InstanceNorm1d(4, track_running_stats=True), True),
    (lambda: nn.InstanceNorm1d(4), False),
])
def test_mode_dependence_includes_dropout_held_as_a_float_and_running_statistics(make, active):
    model = nn.Sequential(make()).train()
    assert mode_dependent_modules(model) == (["0"] if active else [])
    assert mode_dependent_modules(model.eval()) == []


def test_local_pearson_matches_pandas_rolling_corr():
    import pandas as pd

    from optmech.metrics import local_pearson

    rng = np.random.default_rng(0)
    a = np.cumsum(rng.normal(size=300))
    b = a + rng.normal(scale=2.0, size=300)
    ours = local_pearson(a, b, window=50)
    ref = pd.Series(a).rolling(50).corr(pd.Series(b)).to_numpy()
    assert np.isnan(ours[:49]).all() and np.allclose(ours[49:], ref[49:], atol=1e-10)
    flat = local_pearson(np.ones(60), b[:60], window=50)
    assert np.isnan(flat).all()  # zero variance: NaN, never a made-up 0
    grown = local_pearson(a, b, window=50, growing_from=10)
    assert np.isnan(grown[:9]).all() and np.isfinite(grown[9:]).all()
    assert np.allclose(grown[49:], ours[49:])
    with pytest.raises(ValueError, match="equal length"):
        local_pearson(a, b[:10])


def test_gic_diagnostics_from_an_explicit_jacobian():
    from optmech.metrics import gic_diagnostics

    model = build("snet", depth=1, input_shape=(1, 8, 8), seed=4, dtype=torch.float64)
    x, y = _batch(3)
    m = Probe(model, extras=("gic",)).measure(x, y)
    J = per_sample_jacobian(model.eval(), x)
    norms = J.norm(dim=2)
    Jn = J / norms.unsqueeze(-1)
    cos = (Jn @ Jn.transpose(1, 2)).abs() - torch.eye(10, dtype=torch.float64)
    assert torch.allclose(m.gic_norm_ratio, norms.min(1).values / norms.max(1).values, rtol=1e-10)
    assert torch.allclose(m.gic_max_cos, cos.flatten(1).max(1).values, rtol=1e-9)
    # exact GIC: orthogonal rows of equal norm
    ratio, max_cos = gic_diagnostics(4.0 * torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    assert torch.allclose(ratio, torch.ones(2, dtype=torch.float64)) and (max_cos == 0).all()
    ratio, _ = gic_diagnostics(torch.zeros(1, 3, 3, dtype=torch.float64))
    assert torch.isnan(ratio).all()


def test_check_tolerance_covers_float32_rounding_of_e_but_stays_tight_in_float64():
    """The case that motivated the √(‖g‖²·λmax) term: a well-fitted float32 sample of model b (k = 5,
    Fashion-MNIST, step 400) where autograd's float32 e = p − q gave ‖g‖² = 0.0038349 against the
    exact 0.0038244 (float64 engine and float64 autograd agree to 1e-15)."""
    import torch

    from optmech.probe import check_tolerance

    g2, lam_max, e_f = torch.tensor([0.0038244]), torch.tensor([52987.5]), torch.tensor([1.376e-6])
    observed = 0.003834909753 - 0.00382437958326
    assert float(check_tolerance(g2, lam_max, e_f, 10, torch.float32)) > observed
    assert float(check_tolerance(g2, lam_max, e_f, 10, torch.float64)) < 1.01e-8 * float(g2)  # float64: rtol 1e-8, rounding negligible
    # an engine error of 1 % on an ordinary sample is still caught in float32
    g2, lam_max, e_f = torch.tensor([80.0]), torch.tensor([2000.0]), torch.tensor([0.5])
    assert float(check_tolerance(g2, lam_max, e_f, 10, torch.float32)) < 0.01 * 80.0


@pytest.mark.parametrize("method", ["gram", "jacobian", "loop"])
def test_measure_takes_the_logits_from_the_engine_forward_when_it_has_one(method):
    """gram: one forward per measure (its own, eval semantics); the others: their forwards plus one for the logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 6 * 6, 10)).double().train()
    x, y = _batch(5)
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    m = Probe(model, method=method).measure(x, y)
    seen = list(calls)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    ce = torch.nn.functional.cross_entropy(expected, y, reduction="none")
    assert torch.allclose(m.loss, ce, rtol=1e-13, atol=0)  # logits under eval semantics: dropout off
    if method == "gram":
        assert seen == [5] and m.method == "gram"
    else:
        assert seen[-1] == 5 and len(seen) > 1


def test_capture_measures_on_its_own_forward_when_the_training_forward_would_go_generic(caplog, monkeypatch):
    """A transformer: the training capture cannot recompute attention (it must leave the step's graph alone) nor
    watch direct uses, so it would hand those parameters to the generic path; the probe measures on a forward
    of its own instead, where they are fast, and leaves the training forward unhooked and its graph intact."""
    from optmech.structure import capture as capture_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(8 * 4, 3)).double().train()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    probe = Probe(model, check=True)
    expected = probe.measure(x, y)
    hooked = []
    original = capture_module.ForwardCapture.__enter__
    monkeypatch.setattr(capture_module.ForwardCapture, "__enter__",
                        lambda self: (hooked.append(self.options.recompute), original(self))[1])
    with caplog.at_level("INFO", logger="optmech.probe"):
        with probe.capture() as step:
            logits = model(x)
        m = step.measure(x, y, logits)
    assert hooked == [True]  # only the standalone call's capture (attention recomputed), not the training forward's
    assert not probe.route.generic() and "attention" in probe.route.rules().values()
    assert torch.allclose(m.gradient_norm, expected.gradient_norm, rtol=1e-12)
    assert "forward of its own" in caplog.text
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_capture_reuses_the_forward_when_every_parameter_is_in_a_fast_layer():
    model = build("snet", depth=1, skip=True, input_shape=(1, 8, 8), seed=0, dtype=torch.float64).train()
    x, y = _batch(5)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    probe = Probe(model)
    with probe.capture() as step:
        logits = model(x)
    assert step.reuse
    step.measure(x, y, logits)
    assert calls == [1]  # the training forward only


def test_a_structural_matrix_that_overflowed_is_a_clear_error():
    from optmech.metrics import NonFiniteStructureError, measure_from

    A = torch.eye(3).repeat(2, 1, 1)
    A[1, 0, 0] = float("inf")
    p = torch.full((2, 3), 1 / 3)
    q = torch.eye(3)[:2]
    with pytest.raises(NonFiniteStructureError, match=r"NaN or inf in samples \[1\].*overflowed torch.float32"):
        measure_from(A, p, q, torch.zeros(2), simplex=True)


def test_extension_columns_are_computed_only_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    x, y = _batch(4)
    plain = Probe(model).measure(x, y)
    full = Probe(model, extras=("perp", "gic")).measure(x, y)
    for column in ("lambda_min_perp", "lower_perp", "gic_norm_ratio", "gic_max_cos"):
        assert torch.isnan(getattr(plain, column)).all() and not torch.isnan(getattr(full, column)).any(), column
    assert torch.equal(plain.upper, full.upper) and torch.equal(plain.lambda_min, full.lambda_min)
    with pytest.raises(ValueError, match=r"extras: expected a subset of \['perp', 'gic'\], got \['nope'\]"):
        Probe(model, extras=("nope",))


@pytest.mark.parametrize("C", [5, 40, 130])  # one operation for small batches, one sample at a time above 1 MiB
def test_symmetric_float64_is_the_symmetric_part_in_float64_and_leaves_A_alone(C):
    from optmech.metrics import symmetric_float64

    for dtype in (torch.float32, torch.float64):
        A = torch.randn(9, C, C, generator=torch.Generator().manual_seed(C), dtype=dtype)
        before = A.clone()
        S = symmetric_float64(A)
        assert S.dtype == torch.float64 and torch.equal(S, S.mT)
        assert torch.allclose(S, (A.double() + A.double().mT) / 2, rtol=0, atol=1e-15 * float(A.abs().max()))
        assert torch.equal(A, before)
