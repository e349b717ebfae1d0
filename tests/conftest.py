import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py and tests/oracles.py


import pytest  # noqa: E402


@pytest.fixture
def generic(monkeypatch):
    """The parameter names of every call ``gram`` makes to the generic (torch.func) path, in order."""
    from optmech.structure import capture

    calls: list[list[str]] = []
    original = capture.structural_matrix_jacobian

    def spy(model, x, named, **kw):
        calls.append([name for name, _ in named])
        return original(model, x, named, **kw)

    monkeypatch.setattr(capture, "structural_matrix_jacobian", spy)
    return calls


@pytest.fixture
def passes(monkeypatch):
    """The ``batched`` argument (one vmapped pass for all classes, or C passes) of every backward-streaming call, in order."""
    from optmech.structure import capture

    seen: list[bool] = []
    inner = capture._stream_logit_jacobians

    def spy(out, zs, n_classes, sinks, batched, keep_graph=False):
        seen.append(batched)
        return inner(out, zs, n_classes, sinks, batched, keep_graph)

    monkeypatch.setattr(capture, "_stream_logit_jacobians", spy)
    return seen


@pytest.fixture
def contraction(monkeypatch):
    """``force(strategy)``: every layer accumulator (ungrouped and grouped convolutions, Linear) contracts in
    ``"ghost"`` or ``"materialise"`` form whatever the cost model says; ``force(None)`` gives the choice back."""
    from optmech.structure import grouped, sinks

    originals = {module: module.contraction_costs for module in (sinks, grouped)}

    def force(strategy: str | None) -> None:
        for module, original in originals.items():
            chosen = original if strategy is None else (lambda *a, _o=original, **k: {strategy: _o(*a, **k)[strategy]})
            monkeypatch.setattr(module, "contraction_costs", chosen)

    return force
