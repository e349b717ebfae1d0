import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py and tests/oracles.py


import pytest  # noqa: E402


@pytest.fixture
def passes(monkeypatch):
    """The ``batched`` argument (one vmapped pass for all classes, or C passes) of every backward-streaming call, in order."""
    from optmech.structure import capture

    seen: list[bool] = []
    inner = capture.stream_logit_jacobians

    def spy(out, zs, n_classes, sinks, batched, keep_graph=False, **kw):
        seen.append(batched)
        return inner(out, zs, n_classes, sinks, batched, keep_graph, **kw)

    monkeypatch.setattr(capture, "stream_logit_jacobians", spy)
    return seen
