"""DESIGN §1: lower layers never import higher ones; `import optmech` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "optmech"

# layer -> modules it may import from optmech (besides itself)
ALLOWED = {
    "errors": set(),
    "losses": set(),
    "structure": set(),
    "models": set(),
    "data": set(),
    "metrics": set(),
    "probe": {"losses", "metrics", "structure"},
    "records": set(),
    "theory": set(),
    "report": {"metrics", "records", "theory"},
    "experiments": {"data", "losses", "models", "probe", "records", "structure", "metrics", "theory"},
    "integrations": {"metrics", "probe", "records"},  # sinks and callbacks: above the probe, beside the experiments
    "cli": {"experiments", "data", "records", "probe", "report", "integrations"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


def _imports(path: Path, layer: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package layout
                parts = list(path.relative_to(SRC).parts[:-1])
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = (base + (node.module.split(".") if node.module else []))
                if target:
                    found.add(target[0].removesuffix(".py"))
            elif node.module and node.module.startswith("optmech."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("optmech.")}
    return found - {layer}


def test_lower_layers_do_not_import_higher_ones():
    for path in SRC.rglob("*.py"):
        layer = _layer(path)
        if layer == "__init__":
            continue
        bad = _imports(path, layer) - ALLOWED[layer] - {"errors"}  # errors.py is the leaf every layer may raise from
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_import_optmech_is_light():
    code = "import sys, optmech; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
