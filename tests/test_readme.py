"""The README's Python snippets run (DESIGN §4.9)."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 3
    from optmech.experiments import load_preset, reproduce
    from optmech.models import build

    tiny = Path(__file__).parent / "data" / "tiny_preset.toml"
    small = ["bounds_models=['c']", "depth_models=[]", "sweep.models=['c']", "sweep.inits=['pytorch']"]
    reproduce(load_preset(tiny, overrides=small), tmp_path / "repro", jobs=1)
    namespace = {
        "run_dir": tmp_path / "repro",
        "model": build("snet", depth=1, seed=0),
        "x": torch.randn(3, 1, 28, 28),
        "x_probe": torch.randn(4, 1, 28, 28),
        "y_probe": torch.tensor([0, 1, 2, 3]),
        "y": torch.tensor([0, 1, 2]),
    }
    import importlib.util

    has_transformers = importlib.util.find_spec("transformers") is not None
    for block in blocks:
        if "import torch, transformers" in block and not has_transformers:
            continue  # the Hugging Face example needs the extra
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["A"].shape == (3, 10, 10)
    assert sum(namespace["shares"].values()).shape == (3, 10, 10)
    assert namespace["m"].bound_holds.all() and len(namespace["m"]) == 3
    assert namespace["net"](torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert namespace["verdicts"]["X.Thm3"] == "holds" and namespace["config"].seeds == [1, 2]
    assert namespace["records"]["bound_holds"].all()
    if has_transformers:
        assert namespace["m_bert"].bound_holds.all() and len(namespace["m_bert"]) == 4
