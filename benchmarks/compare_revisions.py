"""Two revisions of optmech timed side by side on the same models, interleaved, with a null for the noise.

    .venv/bin/python benchmarks/compare_revisions.py --base ca17800                  # the working tree against ca17800
    .venv/bin/python benchmarks/compare_revisions.py --base HEAD~3 --models a1 mlp256 --rounds 9

The base revision's ``src/`` is extracted with ``git archive`` into a temporary directory. Three worker
processes each import one copy of the package: **head** (this working tree) and two independent copies of
**base** (``base`` and ``base'``). The workers build the same models from the same seeds
(:mod:`benchmarks.models`), batch 64, float32, and call ``structural_matrix(model, x, method=...)`` (two warm
calls first). Round by round, in a new shuffled order of models and of workers each round (seeded), the
driver asks each worker for one timing: the median of as many calls as take about 0.1 s (one for the large
models, up to 15 for the small ones); only one worker runs at a time.

Per model it prints the median time of each worker, the median over rounds of the per-round ratio
head/base, and the null: the same ratio for base'/base, two runs of the same code. A head/base ratio inside
the null's 5–95 % range is "within noise"; above it, "slower"; below it, "faster".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.models import MODELS  # noqa: E402

WORKER = r"""
import json, sys, time
import torch
from benchmarks.models import BATCH, make_model
from optmech import structural_matrix

def once(model, x, method):
    start = time.perf_counter()
    structural_matrix(model, x, method=method)
    return time.perf_counter() - start

models = {}
for line in sys.stdin:
    ask = json.loads(line)
    name, method = ask["model"], ask["method"]
    if name not in models:
        model = make_model(name).eval()
        x = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        warm = min(once(model, x, method) for _ in range(2))
        models[name] = (model, x, max(1, min(15, round(0.1 / warm))))  # calls per ask: about 0.1 s
    model, x, calls = models[name]
    times = sorted(once(model, x, method) for _ in range(calls))
    print(json.dumps({"seconds": times[len(times) // 2]}), flush=True)
"""


def extract(revision: str, into: Path) -> Path:
    """``src/`` of ``revision`` under ``into``; returns the path to put on PYTHONPATH."""
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def start_worker(src: Path) -> subprocess.Popen:
    # ROOT for `benchmarks.models`, after `src` so that the chosen copy of optmech is the one imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def ask(worker: subprocess.Popen, model: str, method: str) -> float:
    worker.stdin.write(json.dumps({"model": model, "method": method}) + "\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker died on {model}; run it alone to see its error")
    return json.loads(line)["seconds"]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--method", default="gram")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base_src = extract(args.base, Path(tmp))
        workers = {"head": start_worker(ROOT / "src"), "base": start_worker(base_src), "base'": start_worker(base_src)}
        times: dict[str, dict[str, list[float]]] = {m: {w: [] for w in workers} for m in args.models}
        try:
            for r in range(args.rounds):
                order = list(args.models)
                rng.shuffle(order)
                for model in order:
                    who = list(workers)
                    rng.shuffle(who)
                    for w in who:
                        times[model][w].append(ask(workers[w], model, args.method))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for w in workers.values():
                w.stdin.close()
                w.wait()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"structural_matrix(method={args.method!r}), batch 64, float32, {args.rounds} rounds; head = working tree at {head}"
          f"{' (with changes)' if subprocess.run(['git', 'diff', '--quiet', 'HEAD'], cwd=ROOT).returncode else ''}, base = {args.base}")
    print(f"{'model':<9} {'base ms':>8} {'head ms':>8} {'head/base':>10} {'null base/base 5–95 %':>22}  verdict")
    for model in args.models:
        t = times[model]
        ratio = [h / b for h, b in zip(t["head"], t["base"])]
        null = [b2 / b for b2, b in zip(t["base'"], t["base"])]
        lo, hi, mid = quantile(null, 0.05), quantile(null, 0.95), statistics.median(ratio)
        verdict = "within noise" if lo <= mid <= hi else ("slower" if mid > hi else "faster")
        print(f"{model:<9} {1e3 * statistics.median(t['base']):>8.1f} {1e3 * statistics.median(t['head']):>8.1f} "
              f"{mid:>10.2f} {f'{statistics.median(null):.2f} ({lo:.2f}–{hi:.2f})':>22}  {verdict}")


if __name__ == "__main__":
    main()
