"""Every example runs (DESIGN §4.9); an example that needs an extra (its docstring's "Requires:" line) is skipped
where that package is absent."""

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, capsys, tmp_path, monkeypatch):
    required = re.search(r"^Requires: ([\w, .-]+?)\s+(\(|$)", path.read_text(), re.MULTILINE)
    for package in (required.group(1).split(",") if required else []):
        pytest.importorskip(package.strip())
    monkeypatch.setenv("OPTMECH_EXAMPLES_OUT", str(tmp_path))
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()
