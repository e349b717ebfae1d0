"""benchmarks/jax_port.py replays the paper's models in JAX with the same weights (only where JAX is
installed, as in the neural-tangents environment of benchmarks/neural_tangents_env.md)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.mark.parametrize("linear", ["stored", "torch"])
@pytest.mark.parametrize("name", ["a1", "b5", "c1", "d5", "mlp256", "sep"])
def test_jax_port_matches_the_torch_model_in_float64(name, linear):
    jax.config.update("jax_enable_x64", True)
    from benchmarks.jax_port import to_jax
    from benchmarks.models import make_model

    model = make_model(name).double()
    apply, params = to_jax(model, np.float64, linear=linear)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(np.asarray(apply(params, jax.numpy.asarray(x.numpy()))) - ref).max() < 1e-12
