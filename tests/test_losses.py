"""Every loss: d ≥ 0, d = 0 at q = p, ∇_f d = p − q, ∇²_f d = ∂p/∂f; cross-checks with entmax and F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from optmech.losses import available_losses, get_loss, to_distribution

LOSS_SPECS = [("softmax", {}), ("sparsemax", {}), ("entmax15", {}), ("entmax", {"alpha": 1.3}), ("entmax", {"alpha": 3.0}), ("squared", {})]
IDS = [f"{n}{kw.get('alpha', '')}" for n, kw in LOSS_SPECS]


def _logits(seed=0, batch=6, classes=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2


def _targets(loss, seed=1, batch=6, classes=7):
    g = torch.Generator().manual_seed(seed)
    if loss.simplex:
        return torch.softmax(torch.randn(batch, classes, generator=g, dtype=torch.float64), -1)
    return torch.randn(batch, classes, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,kw", LOSS_SPECS, ids=IDS)
def test_gradient_is_prediction_minus_target(name, kw):
    loss = get_loss(name, **kw)
    f = _logits().requires_grad_()
    for q in (_targets(loss), torch.tensor([0, 1, 2, 3, 4, 6])):
        (grad,) = torch.autograd.grad(loss(f, q, reduction="sum"), f)
        qd = loss.targets(q, 7, torch.float64)
        assert torch.allclose(grad, loss.predict(f.detach()) - qd, atol=1e-12)


@pytest.mark.parametrize("name,kw", LOSS_SPECS, ids=IDS)
def test_nonnegative_and_zero_at_prediction(name, kw):
    loss = get_loss(name, **kw)
    f = _logits()
    for q in (_targets(loss), torch.arange(6) % 7):
        assert (loss(f, q, reduction="none") >= -1e-12).all()
    p = loss.predict(f)
    assert loss(f, p, reduction="none").abs().max() < 1e-12
    if loss.simplex:
        assert torch.allclose(p.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12) and (p >= 0).all()


@pytest.mark.parametrize("name,kw", LOSS_SPECS, ids=IDS)
def test_double_backward_is_jacobian_of_predict(name, kw):
    loss = get_loss(name, **kw)
    f = _logits(seed=3)
    q = _targets(loss, seed=4)
    hess = torch.func.vmap(torch.func.hessian(lambda z, t: loss(z[None], t[None], reduction="sum")))(f, q)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: loss.predict(z[None])[0]))(f)
    assert torch.allclose(hess, jac, atol=1e-10)
    # and by plain double backward
    fr = f.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(fr, q, reduction="sum"), fr, create_graph=True)
    rows = torch.stack([torch.autograd.grad(g[:, i].sum(), fr, retain_graph=True)[0] for i in range(7)], 1)
    assert torch.allclose(rows, jac, atol=1e-10)


@pytest.mark.parametrize("name,kw", LOSS_SPECS, ids=IDS)
def test_reductions(name, kw):
    loss = get_loss(name, **kw)
    f, q = _logits(), torch.arange(6) % 7
    per = loss(f, q, reduction="none")
    assert per.shape == (6,)
    assert torch.allclose(loss(f, q), per.mean()) and torch.allclose(loss(f, q, reduction="sum"), per.sum())


def test_sparse_maps_match_entmax_package():
    entmax = pytest.importorskip("entmax")
    f = _logits(seed=5, batch=20, classes=10)
    y = torch.arange(20) % 10
    for name, ref_map, ref_loss in (("sparsemax", entmax.sparsemax, entmax.SparsemaxLoss), ("entmax15", entmax.entmax15, entmax.Entmax15Loss)):
        loss = get_loss(name)
        assert (loss.predict(f) - ref_map(f, dim=-1)).abs().max() < 1e-6
        assert (loss(f, y, reduction="none") - ref_loss(reduction="none")(f, y)).abs().max() < 1e-6
    general = get_loss("entmax", alpha=1.7)
    assert (general.predict(f) - entmax.entmax_bisect(f, alpha=1.7, dim=-1, n_iter=80)).abs().max() < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_matches_cross_entropy(smoothing):
    f = _logits(seed=6).requires_grad_()
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    loss = get_loss("softmax", label_smoothing=smoothing)
    q = loss.targets(y, 7, torch.float64)
    entropy = -torch.special.xlogy(q, q).sum(-1)
    ours = loss(f, y, reduction="none")
    ref = F.cross_entropy(f, y, reduction="none", label_smoothing=smoothing)
    # d_Ω = cross-entropy − H(q): equal for one-hot targets, a constant shift with smoothing
    assert torch.allclose(ours, ref - entropy, atol=1e-12)
    assert torch.allclose(torch.autograd.grad(ours.sum(), f)[0], torch.autograd.grad(ref.sum(), f)[0], atol=1e-12)


def test_softmax_soft_targets_match_cross_entropy():
    f = _logits(seed=7)
    q = torch.softmax(_logits(seed=8), -1)
    ref = F.cross_entropy(f, q, reduction="none") + torch.special.xlogy(q, q).sum(-1)
    assert torch.allclose(get_loss("softmax")(f, q, reduction="none"), ref, atol=1e-12)


def test_label_smoothing_moves_targets_inside_simplex():
    q = to_distribution(torch.tensor([1]), 4, dtype=torch.float64, label_smoothing=0.2)
    assert torch.allclose(q, torch.tensor([[0.05, 0.85, 0.05, 0.05]], dtype=torch.float64))


def test_works_under_vmap_and_grad():
    loss = get_loss("entmax15")
    f, y = _logits(), torch.arange(6) % 7
    per_sample = torch.func.vmap(torch.func.grad(lambda z, t: loss(z[None], t[None])))(f, y)
    assert torch.allclose(per_sample, loss.predict(f) - F.one_hot(y, 7).double(), atol=1e-12)


def test_squared_loss_is_half_squared_distance():
    f, q = _logits(), torch.randn(6, 7, dtype=torch.float64)
    assert torch.allclose(get_loss("squared")(f, q, reduction="none"), 0.5 * ((f - q) ** 2).sum(-1))


def test_registry_names():
    assert set(available_losses()) == {"softmax", "sparsemax", "entmax15", "entmax", "squared"}
    assert get_loss("sparsemax").alpha == 2.0 and get_loss("entmax15").alpha == 1.5


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: get_loss("hinge"), "unknown name 'hinge'"),
        (lambda: get_loss("entmax", alpha=1.0), "alpha: expected a finite number > 1"),
        (lambda: get_loss("entmax", alpha=math.nan), "alpha"),
        (lambda: get_loss("softmax", label_smoothing=1.5), "label_smoothing"),
        (lambda: get_loss("softmax")(torch.randn(3), torch.tensor([0, 1, 2])), r"logits: expected shape \(batch, classes\)"),
        (lambda: get_loss("softmax")(torch.tensor([[0.0, math.nan]]), torch.tensor([0])), "NaN or inf in rows"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.tensor([0, 3])), r"class indices in \[0, 3\)"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.tensor([0, -1])), "class indices"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.zeros(2, 4)), r"shape \(batch, 3\)"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.full((2, 3), 0.5)), "probability vector"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.tensor([0, 1, 2])), "expected 2 rows"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.zeros(2, 3, 1)), "expected shape"),
        (lambda: get_loss("softmax")(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="avg"), "reduction"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_float_class_indices_are_a_type_error():
    with pytest.raises(TypeError, match="integer tensor"):
        get_loss("softmax")(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
