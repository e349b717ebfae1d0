"""The engine and the probe on a CUDA device, against the float64 oracle run on the CPU.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch
from helpers import RTOL, engine_cases, rel_err
from oracles import structural_oracle

from optmech import COLUMNS, Probe, structural_matrix
from optmech.models import build
from optmech.structure import EngineMethod

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = engine_cases()
METHODS = [m.value for m in EngineMethod]
CUDA = torch.device("cuda")


def on_cuda(model, x):
    """A copy of the model and the inputs on the GPU (``Module.to`` moves in place: the CPU case stays)."""
    return copy.deepcopy(model).to(CUDA), x.to(CUDA)


@pytest.fixture(scope="module")
def oracle_results():
    return {name: structural_oracle(model, x)[0] for name, (model, x) in CASES.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_method_on_cuda_agrees_with_the_cpu_oracle(case, method, oracle_results):
    model, x = on_cuda(*CASES[case])
    _r = structural_matrix(model, x, method=method, per_layer=True)
    A, groups, ran = _r.A, _r.per_layer, _r.method
    assert A.device.type == "cuda" and A.dtype == torch.float64
    assert rel_err(A.cpu(), oracle_results[case]) < RTOL[torch.float64], f"{case}/{method}→{ran}"
    assert rel_err(sum(groups.values()), A) < 1e-12
    again = structural_matrix(model, x, method=method).A  # the engine's kept GPU buffers, second use
    assert rel_err(again, A) < 1e-13


def test_float32_on_cuda_is_close_to_float64():
    model = build("resnet", depth=1, skip=True, seed=0, dtype=torch.float64)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = structural_matrix(model, x, method="gram").A
    m32, x32 = on_cuda(model.float(), x.float())
    # TF32 matmuls (if a user enabled them) would be off by ~1e-3; the default keeps full float32
    A = structural_matrix(m32, x32, method="gram").A
    assert A.dtype == torch.float32 and rel_err(A.double().cpu(), ref) < RTOL[torch.float32]


@pytest.mark.parametrize("family", ["snet", "resnet", "mlp"])
def test_probe_on_cuda_matches_the_cpu_probe(family):
    model = build(family, depth=2, skip=True, input_shape=(1, 8, 8), seed=1, dtype=torch.float64)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(6) % 10
    cpu = Probe(model, per_layer=True).measure(x, y)
    gm, gx = on_cuda(model, x)
    gpu = Probe(gm, per_layer=True, check=True).measure(gx, y)  # targets may stay on the CPU
    assert gpu.A.device.type == "cuda"
    for col in ("fitting_error", "gradient_norm", "lambda_min", "lambda_max", "upper", "lower"):
        assert torch.allclose(getattr(gpu, col).cpu(), getattr(cpu, col), rtol=1e-9), col
    assert bool(gpu.bound_holds.all())
    frame = gpu.to_frame()
    assert set(COLUMNS) <= set(frame.columns) and len(frame) == 6


def test_capture_on_cuda_reuses_the_training_forward():
    model = build("resnet", depth=1, skip=True, input_shape=(1, 8, 8), seed=0, dtype=torch.float64).train()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.arange(5)
    model, x, y = model.to(CUDA), x.to(CUDA), y.to(CUDA)
    probe = Probe(model)
    expected = probe.measure(x, y)
    with probe.capture() as step:
        logits = model(x)
    m = step.measure(x, y, logits)
    assert torch.allclose(m.gradient_norm, expected.gradient_norm, rtol=1e-10)
    torch.nn.functional.cross_entropy(logits, y).backward()  # the graph is still there for the step
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters())


def test_probing_on_cuda_leaves_rng_modes_and_buffers_alone():
    model = build("mlp", depth=2, input_shape=(1, 8, 8), dropout=0.3, seed=0).to(CUDA).train()
    x = torch.randn(4, 1, 8, 8, device=CUDA)
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    A1 = structural_matrix(model, x, method="gram").A
    A2 = structural_matrix(model, x, method="gram").A
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(A1, A2)  # eval semantics: dropout off, same answer twice


def test_auto_on_cuda_times_both_methods_once_even_when_every_layer_is_fast(caplog):
    model = build("snet", depth=1, input_shape=(1, 8, 8), seed=0, dtype=torch.float64).to(CUDA)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, device=CUDA)
    with caplog.at_level("INFO", logger="optmech.structure"):
        _r = structural_matrix(model, x)
        A, ran = _r.A, _r.method
        _r = structural_matrix(model, x)
        again, ran_again = _r.A, _r.method
    assert sum("measured gram" in r.message for r in caplog.records) == 1  # remembered after the first call
    assert ran in ("gram", "jacobian") and ran_again == ran
    ref = structural_matrix(model, x, method="loop").A
    assert rel_err(A, ref) < RTOL[torch.float64] and rel_err(again, ref) < RTOL[torch.float64]


def test_a_training_run_on_cuda_starts_from_the_cpu_runs_weights_and_records_the_same_first_measurement(tmp_path):
    from optmech.experiments.config import TrainConfig
    from optmech.experiments.train import train
    from optmech.records import read_records

    kw = dict(model="c", depth=1, dataset="digits", max_steps=4, n_probe=3, dtype="float64", check=True, records_per_part=2)
    on_gpu = train(TrainConfig(device="cuda", **kw), tmp_path / "gpu")
    train(TrainConfig(**kw), tmp_path / "cpu")
    assert on_gpu.summary["theorem3_violations"] == 0 and on_gpu.summary["steps"] == 4
    gpu, cpu = read_records(tmp_path / "gpu"), read_records(tmp_path / "cpu")
    first = lambda r: r[r["step"] == 0].sort_values("sample_id")[["gradient_norm", "lambda_min", "lambda_max", "U"]].to_numpy()  # noqa: E731
    assert abs(first(gpu) - first(cpu)).max() <= 1e-9 * abs(first(cpu)).max()  # same initial weights, float64
    assert (gpu.columns == cpu.columns).all() and len(gpu) == len(cpu)


def test_the_probe_runs_in_ieee_float32_even_where_tf32_is_on(monkeypatch):
    """cuDNN convolutions default to TF32 on Ampere and later (~1e-3 relative): the probe's own passes
    switch it off, so A_x is float32-accurate and check=True holds at float32's 1e-3; in capture mode
    (the training forward may be TF32) the check allows 1e-2."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        model = build("resnet", depth=2, skip=True, seed=0).to(CUDA)
        x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(CUDA)
        y = torch.arange(6, device=CUDA) % 10
        reference = structural_oracle(copy.deepcopy(model).double().cpu(), x.double().cpu())[0]
        probe = Probe(model, method="gram", check=True)
        m = probe.measure(x, y)
        assert rel_err(m.A.cpu(), reference) < 1e-5  # IEEE: ~6e-7 on an H100; with TF32: ~9e-5
        with probe.capture() as step:
            logits = model(x)
        step.measure(x, y, logits)  # check=True: no ConsistencyError
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
