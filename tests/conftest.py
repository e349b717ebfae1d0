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
