"""Every engine method against the float64 oracle, on every model family and the unusual models."""

import warnings

import pytest
import torch
from helpers import RTOL, accumulator, engine_cases, per_class_gradients, rel_err, unusual_models
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.models import build
from optmech.structure import (
    EngineMethod,
    EngineOptions,
    ForwardCapture,
    GenericPathWarning,
    SlowPathWarning,
    clear_cache,
    trainable_parameters,
)

METHODS = [m.value for m in EngineMethod]
CASES = engine_cases()


@pytest.fixture(scope="module")
def oracle_results():
    return {name: structural_oracle(model, x) for name, (model, x) in CASES.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_method_agrees_with_oracle(case, method, oracle_results):
    model, x = CASES[case]
    A_ref, J = oracle_results[case]
    A = structural_matrix(model, x, method=method).A
    assert A.dtype == torch.float64 and A.shape == A_ref.shape
    assert rel_err(A, A_ref) < RTOL[torch.float64], f"{case}/{method}: {rel_err(A, A_ref):.3e}"
    # symmetric PSD with trace ‖J‖_F²
    assert torch.equal(A, A.transpose(1, 2)) or rel_err(A, A.transpose(1, 2)) < 1e-14
    eig = torch.linalg.eigvalsh(A)
    assert (eig >= -1e-12 * eig[:, -1:].abs()).all()
    trace = A.diagonal(dim1=1, dim2=2).sum(-1)
    assert torch.allclose(trace, (J**2).sum((1, 2)), rtol=1e-10)


def test_paper_resnet_at_mnist_shape_matches_oracle():
    """The ResNet class at its real input size (28×28), float64, one sample per skip setting."""
    for skip in (False, True):
        model = build("resnet", depth=1, skip=skip, seed=0, dtype=torch.float64)
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        A_ref, _ = structural_oracle(model, x)
        for method in ("jacobian", "gram"):
            assert rel_err(structural_matrix(model, x, method=method).A, A_ref) < RTOL[torch.float64]


def test_float32_model_gives_float32_result_close_to_float64():
    model = build("snet", depth=1, input_shape=(1, 8, 8), seed=0)
    x = torch.randn(5, 1, 8, 8)
    A32 = structural_matrix(model, x).A
    A64 = structural_matrix(model.double(), x.double()).A
    assert A32.dtype == torch.float32 and rel_err(A32.double(), A64) < RTOL[torch.float32]


@pytest.mark.parametrize("method", ["jacobian", "gram"])
def test_chunking_does_not_change_the_result(method):
    model, x = CASES["cnn-skip"]
    full = structural_matrix(model, x, method=method).A
    assert rel_err(structural_matrix(model, x, method=method, chunk_size=1).A, full) < 1e-14


def test_engine_leaves_model_state_alone():
    model, x = unusual_models()["batchnorm_eval"]
    model.train()
    model.out.weight.grad = torch.ones_like(model.out.weight)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for method in METHODS:
        structural_matrix(model, x, method=method)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert torch.equal(model.out.weight.grad, torch.ones_like(model.out.weight))
    assert model.conv.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_probing_runs_in_ieee_float32_and_restores_the_tf32_settings():
    """TF32 (cuDNN's default on recent GPUs) would cost ~1e-3 relative on A_x: probing switches it off."""
    from optmech.structure._context import probing, tf32_enabled

    model = nn.Linear(3, 2)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        assert tf32_enabled()
        with pytest.raises(KeyError):
            with probing(model):
                assert not tf32_enabled()
                assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
                raise KeyError("restored even on errors")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_probing_works_where_precision_was_set_through_the_per_backend_api():
    """torch ≥ 2.9 refuses legacy reads once ``fp32_precision`` was set per backend in a way the legacy
    flags cannot express: the probe must then use that API (in a fresh process: the state is global)."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy TF32 flags")
    script = (
        "import torch\n"
        "from torch import nn\n"
        "from optmech import structural_matrix\n"
        "from optmech.structure._context import probing, tf32_enabled\n"
        "torch.backends.cudnn.conv.fp32_precision = 'none'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "assert tf32_enabled()\n"
        "with probing(nn.Linear(3, 2)):\n"
        "    assert not tf32_enabled()\n"
        "    assert torch.backends.cuda.matmul.fp32_precision == 'ieee' == torch.backends.cudnn.conv.fp32_precision\n"
        "assert torch.backends.cuda.matmul.fp32_precision == 'tf32' and torch.backends.cudnn.conv.fp32_precision == 'none'\n"
        "model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))\n"
        "structural_matrix(model, torch.randn(2, 1, 4, 4), method='gram').A\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_eval_semantics_dropout_is_off():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x = torch.randn(3, 4, dtype=torch.float64)
    A1, A2 = structural_matrix(model, x).A, structural_matrix(model, x).A
    assert torch.equal(A1, A2) and model.training


class Scaled(nn.Module):
    """A free parameter outside any Linear/Conv/norm layer, optionally after a Linear."""

    def __init__(self, with_linear: bool = False):
        super().__init__()
        self.fc = nn.Linear(3, 3) if with_linear else nn.Identity()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, -1.0]))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale


def test_auto_reports_the_method_and_falls_back_exactly(monkeypatch, caplog):
    class NotVmappable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.shift = nn.Parameter(torch.tensor([1.5, 0.5]))  # subtracted: no fast rule, the generic path

        def forward(self, x):
            if float(x.sum()) > 1e9:  # data-dependent Python control flow: vmap cannot run this
                return self.fc(x) * 2
            return self.fc(x) - self.shift

    model = NotVmappable().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(SlowPathWarning, match="cannot vmap NotVmappable's forward over samples"):
        _r = structural_matrix(model, x)
        A, ran = _r.A, _r.method
    assert ran in ("gram", "jacobian")  # the generic path went sample by sample, and said so
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    # a method that fails on the model for another reason: the loop, said in a warning
    from optmech.structure import engine

    def failing(*args, **kwargs):
        raise RuntimeError("an op this method cannot run")

    monkeypatch.setattr(engine, "structural_matrix_gram", failing)
    model = Scaled(with_linear=True).double()
    with pytest.warns(RuntimeWarning, match="falling back to the exact but slower 'loop'"):
        _r = structural_matrix(model, x)
        A, ran = _r.A, _r.method
    assert ran == "loop" and rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    monkeypatch.undo()
    _r = structural_matrix(nn.Linear(3, 2), torch.randn(2, 3))
    _, ran = _r.A, _r.method
    assert ran == "gram"
    _r = structural_matrix(nn.Sequential(nn.LayerNorm(3), nn.Tanh()), torch.randn(2, 3))
    _, ran = _r.A, _r.method
    assert ran == "gram"  # a norm's affine parameters are a fast layer too
    _r = structural_matrix(Scaled(), torch.randn(2, 3))
    _, ran = _r.A, _r.method
    assert ran == "jacobian"  # no Linear/Conv/norm layer at all


def test_linear_model_closed_form():
    """A single Linear layer: A_x = (‖x‖² + 1)·I exactly (the bias block gives I)."""
    model = nn.Linear(5, 4).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    A = structural_matrix(model, x).A
    expected = (1 + (x**2).sum(1))[:, None, None] * torch.eye(4, dtype=torch.float64)
    assert rel_err(A, expected) < 1e-14


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="gramm"), "unknown engine method 'gramm'"),
        (dict(method=3), "method: expected one of"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        structural_matrix(nn.Linear(3, 2), torch.randn(2, 3), **kwargs)


def test_bad_inputs_and_models():
    with pytest.raises(ValueError, match=r"inputs: expected finite values, got NaN or inf in samples \[1\]"):
        structural_matrix(nn.Linear(3, 2), torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]]))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        structural_matrix(lambda x: x, torch.randn(2, 3))
    for method in ("gram", "jacobian", "loop"):
        with pytest.raises(ValueError, match=r"model output: expected logits of shape \(\d, classes\), got shape \(\d, 2, 3, 3\)"):
            structural_matrix(nn.Conv2d(1, 2, 3), torch.randn(2, 1, 5, 5), method=method)

    class Ragged(nn.Module):  # C depends on the input: caught when gram's chunks disagree
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x)[:, : 2 + int(x[0, 0] > 0)]

    with pytest.raises(ValueError, match="expected 3 logits per sample in every chunk, got 2 for samples 1…1"):
        structural_matrix(Ragged(), torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]), method="gram", chunk_size=1)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        structural_matrix(frozen, torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-empty batch"):
        structural_matrix(nn.Linear(3, 2), torch.randn(0, 3))


@pytest.mark.parametrize("case", [c for c in CASES if "-" in c])  # the families
def test_gram_never_takes_the_generic_path_on_the_model_families(case, oracle_results):
    """Every parameter of the families is in a fast layer used once: a fallback would be exact but
    silently slow (a walk of the graph that let node ids be reused would miss layers' uses)."""
    model, x = CASES[case]
    _r = structural_matrix(model, x, method="auto")
    assert _r.method == "gram" and rel_err(_r.A, oracle_results[case][0]) < RTOL[torch.float64]
    assert not _r.route.generic() and set(_r.route.rules().values()) <= {"linear", "conv", "norm"}


def test_gram_strategies_agree_and_fallbacks_are_used():
    """Ghost and materialised forms give the same contribution; unknown/tied layers take the generic path."""
    model, x = unusual_models()["sequence_conv1d"]
    layers, C = per_class_gradients(model, x)
    assert [layer.name for layer, _, _ in layers] == ["conv", "per_position", "head"]
    for layer, a, bs in layers:
        forms = {}
        for strategy in ("ghost", "materialise"):
            acc = accumulator(layer, a, C, strategy)
            acc.add_classes(bs)
            forms[strategy] = acc.result()
        assert rel_err(forms["ghost"], forms["materialise"]) < 1e-13

    model, x = unusual_models()["grouped_partly_frozen"]
    route = structural_matrix(model, x, method="gram").route
    assert {n.rsplit(".", 1)[0] for n, r in route.items() if r.fast} == {"conv", "reflect", "out"}
    assert route["fc.weight"].reason == "its Linear has frozen parameters too (a rule takes a module whole)"
    assert "did not run exactly once" in route["twice.weight"].reason


class Paddings(nn.Module):
    """Every kind of convolution padding: "same" with an even kernel and dilation (one more on the far side),
    "valid", reflect, replicate and circular modes, a grouped "same" conv, a Conv1d "same" with an even kernel;
    a "same" conv → ReLU → MaxPool chain (contracted at the pool's output on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 4, (4, 3), padding="same", dilation=(2, 1))
        self.pooled = nn.Conv2d(4, 4, 2, padding="same")
        self.reflect = nn.Conv2d(4, 4, 3, padding=(1, 2), padding_mode="reflect")
        self.replicate = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="replicate", bias=False)
        self.circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=2)
        self.valid = nn.Conv2d(4, 3, 2, padding="valid")
        self.seq = nn.Conv1d(3, 2, 4, padding="same", padding_mode="reflect")
        self.pool, self.head = nn.MaxPool2d(3, stride=1, padding=1), nn.Linear(2 * 6, 3)

    def forward(self, x):  # (n, 2, 7, 8)
        h = torch.tanh(self.same(x))
        h = self.pool(torch.relu(self.pooled(h)))
        h = torch.tanh(self.replicate(torch.tanh(self.reflect(h))))  # (n, 4, 4, 5)
        h = torch.tanh(self.valid(torch.tanh(self.circular(h))))  # (n, 3, 3, 4)
        return self.head(torch.tanh(self.seq(h.flatten(2)[:, :, :6])).flatten(1))


@pytest.mark.parametrize("immediate_ratio", [0, 10**9])
def test_every_contraction_form_matches_the_oracle_on_strided_dilated_convs(monkeypatch, immediate_ratio):
    """Ghost, materialised-buffered and materialised-per-class forms, with and without bias, Conv1d/Conv2d/Linear."""
    from optmech.structure import layer_gram

    monkeypatch.setattr(layer_gram, "_IMMEDIATE_RATIO", immediate_ratio)  # 0: never per class; 10⁹: always
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), nn.Tanh(),
        nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 2 * 7, 5),
    ).double()
    x = torch.randn(3, 2, 9, 6, generator=g, dtype=torch.float64)
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    reference, ref_groups = _r.A, _r.per_layer
    for strategy in ("ghost", "materialise"):
        _r = structural_matrix(model, x, method="gram", per_layer=True, options=EngineOptions(contraction=strategy))
        A, groups = _r.A, _r.per_layer
        assert set(_r.route.forms().values()) == {strategy, "closed"}  # the logits layer in closed form
        assert _r.route["4.weight"].form == "closed"
        assert rel_err(A, reference) < 1e-12, strategy
        for name, part in groups.items():
            assert rel_err(part, ref_groups[name]) < 1e-12, (strategy, name)


@pytest.mark.parametrize("case", ["resnet-skip", "snet-plain", "layernorm_gelu", "tied_weights", "grouped_partly_frozen", "sequence_conv1d"])
def test_per_layer_shares_sum_to_A_and_agree_across_methods(case):
    model, x = CASES[case]
    results = {m: (lambda r: (r.A, r.per_layer))(structural_matrix(model, x, method=m, per_layer=True)) for m in ("loop", "jacobian", "gram")}
    A_loop, groups_loop = results["loop"]
    for method, (A, groups) in results.items():
        assert set(groups) == set(groups_loop), method
        assert rel_err(sum(groups.values()), A) < 1e-12
        for name, part in groups.items():
            assert rel_err(part, groups_loop[name]) < RTOL[torch.float64], (method, name)
    _r = structural_matrix(model, x, per_layer=True)
    A, groups, ran = _r.A, _r.per_layer, _r.method
    assert ran in ("gram", "jacobian") and rel_err(A, A_loop) < RTOL[torch.float64]


class Shifted(nn.Module):
    """A free parameter subtracted after a Linear: a use the fast path does not follow (generic)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.shift = nn.Parameter(torch.tensor([1.5, 0.5, -1.0]))

    def forward(self, x):
        return torch.tanh(self.fc(x)) - self.shift


@pytest.mark.parametrize("slow", ["gram", "jacobian"])
def test_auto_times_gram_against_jacobian_once_when_some_parameters_are_outside_fast_layers(monkeypatch, caplog, slow):
    """A free parameter makes gram = fast layers + jacobian on the rest: auto measures both, keeps the faster."""
    import time as time_module

    from optmech.structure import engine

    model, x = Shifted().double(), torch.randn(5, 3, dtype=torch.float64)
    calls = []
    for method, attr in (("gram", "structural_matrix_gram"), ("jacobian", "structural_matrix_jacobian")):
        original = getattr(engine, attr)

        def timed(*args, _method=method, _original=original, **kw):
            calls.append(_method)
            if _method == slow:
                time_module.sleep(0.2)  # the slower one by a margin no machine noise covers
            return _original(*args, **kw)

        monkeypatch.setattr(engine, attr, timed)
    reference = structural_matrix(model, x, method="loop").A
    with caplog.at_level("INFO", logger="optmech.structure"):
        _r = structural_matrix(model, x)
        A, ran = _r.A, _r.method
    fast = "jacobian" if slow == "gram" else "gram"
    assert calls == ["gram", "jacobian"] and ran == fast and rel_err(A, reference) < RTOL[torch.float64]
    assert f"using {fast} for this model and shape" in caplog.text
    calls.clear()
    _r = structural_matrix(model, x)  # remembered: no second trial
    A, ran = _r.A, _r.method
    assert calls == [fast] and ran == fast and rel_err(A, reference) < RTOL[torch.float64]
    structural_matrix(model, x[:2])  # another shape: measured again
    assert calls == [fast, "gram", "jacobian"]


def test_auto_does_not_time_jacobian_when_gram_found_every_parameter_a_fast_rule(monkeypatch, caplog):
    """A parameter used directly (a scale after a Linear) is known to be fast only once gram's forward has run:
    then jacobian is not timed on the CPU, and the choice is remembered."""
    from optmech.structure import engine

    model, x = Scaled(with_linear=True).double(), torch.randn(5, 3, dtype=torch.float64)
    monkeypatch.setattr(engine, "structural_matrix_jacobian", lambda *a, **k: pytest.fail("jacobian ran"))
    with caplog.at_level("INFO", logger="optmech.structure"):
        _r = structural_matrix(model, x)
        A, ran = _r.A, _r.method
    assert ran == "gram" and rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert "gram took every parameter on its fast path" in caplog.text
    assert _r.route["scale"].rule == "direct"
    monkeypatch.undo()
    calls, trial = [], engine._auto_trial
    monkeypatch.setattr(engine, "_auto_trial", lambda *a, **k: calls.append(1) or trial(*a, **k))
    assert structural_matrix(model, x).method == "gram" and calls == []  # remembered in the model's cache
    clear_cache(model)
    structural_matrix(model, x)
    assert calls == [1]  # a cleared cache measures again


def test_auto_does_not_measure_when_every_parameter_is_in_a_fast_layer(monkeypatch):
    from optmech.structure import engine

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    monkeypatch.setattr(engine, "structural_matrix_jacobian", lambda *a, **k: pytest.fail("jacobian ran"))
    assert structural_matrix(model, torch.randn(3, 1, 6, 6, dtype=torch.float64)).method == "gram"


def test_norm_layers_are_contracted_exactly_without_the_generic_path(monkeypatch):
    """BatchNorm (running statistics), LayerNorm over sequences, GroupNorm, with and without affine parts."""
    g = torch.Generator().manual_seed(3)

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.bn2 = nn.BatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)
            self.ln = nn.LayerNorm(4, bias=False)
            self.fc = nn.Linear(4, 6)
            self.bn1 = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.gn(self.bn2(self.conv(x))))  # (n, 4, 3, 3)
            h = self.ln(h.flatten(2).transpose(1, 2))  # (n, 9 positions, 4)
            h = self.bn1(self.fc(h).mean(1))
            return self.head(torch.tanh(h))

    model = Norms().double()
    model.train()
    for _ in range(3):  # running statistics that are not the defaults
        model(torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    reference, ref_groups = _r.A, _r.per_layer
    _r = structural_matrix(model, x, method="gram", per_layer=True)
    A, groups = _r.A, _r.per_layer
    assert not _r.route.generic()
    assert {n for n, rule in _r.route.rules().items() if rule == "norm"} == {
        n for n, _ in model.named_parameters() if n.split(".")[0] in ("bn2", "gn", "ln", "bn1")}
    assert rel_err(A, reference) < 1e-12 and set(groups) == set(ref_groups)
    for name, part in groups.items():
        assert rel_err(part, ref_groups[name]) < 1e-12, name
    # batch statistics even in eval (no running statistics): not per-sample, left to the generic path
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    claimed = ForwardCapture(no_stats, trainable_parameters(no_stats), EngineOptions())
    assert claimed.unclaimed == ["1.weight", "1.bias"]


def test_embeddings_with_repeated_and_padding_tokens_match_the_oracle():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3, padding_idx=0)
            self.pos = nn.Embedding(6, 3)
            self.head = nn.Linear(3, 4)

        def forward(self, t):  # t: (n, 2, 3) token grid
            h = self.emb(t).flatten(1, 2) + self.pos(torch.arange(6).expand(t.shape[0], 6))
            return self.head(torch.tanh(h).sum(1))

    model = Tokens().double()
    tokens = torch.tensor([[[1, 1, 0], [3, 0, 1]], [[0, 0, 0], [2, 2, 2]], [[6, 5, 4], [3, 2, 1]]])
    _r = structural_matrix(model, tokens, method="loop", per_layer=True)
    reference, ref_groups = _r.A, _r.per_layer
    _r = structural_matrix(model, tokens, method="gram", per_layer=True)
    A, groups = _r.A, _r.per_layer
    assert not _r.route.generic() and _r.route["emb.weight"].rule == "embedding"
    assert rel_err(A, reference) < 1e-12
    for name in ("emb", "pos", "head"):
        assert rel_err(groups[name], ref_groups[name]) < 1e-12, name


def test_outputs_overwritten_in_place_take_the_fast_path_from_the_second_call():
    """ReLU(inplace=True) after Conv/Linear (torchvision style): exact on the first call (generic path for
    those layers), then the capture keeps z intact and no layer needs the generic path."""
    model, x = unusual_models()["inplace_relu"]
    reference = structural_matrix(model, x, method="loop").A
    first = structural_matrix(model, x, method="gram")
    assert rel_err(first.A, reference) < RTOL[torch.float64]
    assert any("modified in place" in reason for reason in first.route.generic().values())
    for _ in range(2):
        again = structural_matrix(model, x, method="gram")
        assert rel_err(again.A, reference) < RTOL[torch.float64] and not again.route.generic()

    logits = structural_matrix(model, x, method="gram").logits  # the forward that ran on the copies
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("immediate_ratio", [0, 10**9])
def test_padded_input_buffers_of_equal_shape_but_other_padding_are_kept_apart(monkeypatch, immediate_ratio):
    """Padded inputs live in buffers kept between calls, zero border written once: a 28×28 input padded
    by 1 and a 26×26 one padded by 2 are both 30×30, and must not share a buffer (each border would
    hold the other's interior). Exact on repeated calls with new inputs, per class and buffered."""
    from optmech.structure import layer_gram

    monkeypatch.setattr(layer_gram, "_IMMEDIATE_RATIO", immediate_ratio)
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Tanh(),
        nn.Conv2d(2, 2, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3),
    ).double()
    for _ in range(2):
        x = torch.randn(2, 2, 28, 28, generator=g, dtype=torch.float64)
        _r = structural_matrix(model, x, method="gram")
        assert rel_err(_r.A, structural_oracle(model, x)[0]) < 1e-12 and not _r.route.generic()


def test_finite_inputs_whose_sum_overflows_are_accepted():
    """The finiteness check sums first; an overflowing sum of finite values must not be taken for inf."""
    from optmech.structure._context import prepare_inputs

    model = nn.Linear(2, 2)
    x = torch.full((2, 2), 3e38)
    assert torch.isinf(x.sum())
    assert torch.equal(prepare_inputs(model, x), x)
    with pytest.raises(ValueError, match=r"got NaN or inf in samples \[0\]"):
        prepare_inputs(model, torch.tensor([[float("inf"), 0.0], [1.0, 2.0]]))


def test_gram_says_once_which_parameters_go_through_the_generic_path_and_why():
    model, x = unusual_models()["tied_weights"]
    clear_cache(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        structural_matrix(model, x, method="gram")
        route = structural_matrix(model, x, method="gram").route
    said = [str(w.message) for w in caught if issubclass(w.category, GenericPathWarning)]
    assert len(said) == 1, said
    assert route["enc.weight"].reason == "it is used outside its layer too" and route["enc.weight"].form == "generic"
    assert "enc.weight, enc.bias (it is used outside its layer too)" in said[0]
    assert "shared.weight" in said[0] and "did not run exactly once" in said[0]


class RMSNormNet(nn.Module):
    """RMSNorm over the last dimension (sequence-first: the samples along dim 1) and over the last two dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(3, 4), nn.RMSNorm(4, eps=1e-6)
        self.norm2, self.head = nn.RMSNorm((5, 4)), nn.Linear(4, 2)

    def forward(self, x):  # (n, 5, 3)
        h = self.norm(torch.nn.functional.silu(self.fc(x.transpose(0, 1))))  # (5, n, 4)
        return self.head(self.norm2(h.transpose(0, 1)).mean(1))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch ≥ 2.4")
@pytest.mark.parametrize("n", [4, 5])  # n = 5: as many samples as positions (the samples' dimension is found)
def test_rmsnorm_is_fast_and_exact(n):
    torch.manual_seed(7)
    model = RMSNormNet().double()
    x = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    reference, ref_groups = _r.A, _r.per_layer
    _r = structural_matrix(model, x, method="gram", per_layer=True)
    A, groups = _r.A, _r.per_layer
    assert rel_err(A, reference) < RTOL[torch.float64] and not _r.route.generic()
    assert {"norm", "norm2"} <= set(groups)
    for name, part in groups.items():
        assert rel_err(part, ref_groups[name]) < RTOL[torch.float64], name


class Volumes(nn.Module):
    """Conv3d: strided and dilated with "same"-free integer padding, grouped with "same" padding (odd total on the
    far side), replicate-padded without bias; then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1))
        self.b = nn.Conv3d(4, 4, (2, 3, 3), padding="same", groups=2)
        self.c = nn.Conv3d(4, 3, 3, padding=1, padding_mode="replicate", bias=False)
        self.head = nn.Linear(3, 3)

    def forward(self, x):  # (n, 2, 5, 6, 4)
        h = self.c(torch.tanh(self.b(torch.relu(self.a(x)))))
        return self.head(torch.tanh(h).mean((2, 3, 4)))


CONVOLUTIONS = {  # model, input shape, seeds
    "paddings": (Paddings, (3, 2, 7, 8), 3),
    "conv3d": (Volumes, (3, 2, 5, 6, 4), 9),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("strategy", ["ghost", "materialise", None])
@pytest.mark.parametrize("case", list(CONVOLUTIONS))
def test_every_padding_and_convolution_dimension_is_fast_and_exact(case, strategy):
    make, shape, seed = CONVOLUTIONS[case]
    torch.manual_seed(seed)
    model = make().double()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    reference, ref_groups = _r.A, _r.per_layer
    options = EngineOptions(contraction=strategy or "auto")
    for _ in range(2):  # kept padded buffers on the second call
        _r = structural_matrix(model, x, method="gram", per_layer=True, options=options)
        A, groups = _r.A, _r.per_layer
        assert rel_err(A, reference) < 1e-12 and not _r.route.generic()
    for name, part in groups.items():
        assert rel_err(part, ref_groups[name]) < 1e-12, name


@pytest.mark.parametrize("method", ["gram", "jacobian", "auto", "probe"])
def test_what_the_engine_keeps_does_not_keep_the_model_alive(method):
    """The per-model cache is keyed weakly by the model: nothing it keeps may refer back to the model or its layers,
    or every model ever probed (a depth sweep's, a hyperparameter search's) would stay in memory with its weights."""
    import gc
    import weakref

    from optmech import Probe

    x = torch.randn(2, 4)
    for make in (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), lambda: nn.Linear(4, 3)):  # (a claimed root)
        model = make()
        if method == "probe":
            Probe(model).measure(x, torch.tensor([0, 2]))
        else:
            structural_matrix(model, x, method=method)
        alive = [weakref.ref(m) for m in model.modules()]
        del model
        gc.collect()
        assert not any(ref() is not None for ref in alive)
