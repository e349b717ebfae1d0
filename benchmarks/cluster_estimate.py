"""What each job of a reproduction costs, and how long a preset would take on N workers, from measured costs.

    .venv/bin/python benchmarks/cluster_estimate.py runs/quick                      # per-job costs of a finished run
    .venv/bin/python benchmarks/cluster_estimate.py runs/quick --preset paper fashion --workers 1 2 8 26 52
    .venv/bin/python benchmarks/cluster_estimate.py runs/quick --memory             # + peak memory of the largest jobs

Reads a finished reproduction (``reproduce.json`` and each training run's ``run.json``: its training, probing,
writing and evaluating seconds; every job ran with one torch thread under ``--jobs 2`` on this 2-core machine, so
its wall seconds are its CPU-seconds). For a target preset each training job's cost is scaled from the measured
job of the same (model, depth, init) by what differs between the two presets' settings:

- training: × steps ratio (same batch size and model);
- probing: × records ratio (steps / probe_every) × probes ratio (n_probe);
- evaluating: × held-out images evaluated (eval points × eval_samples, plus the final pass over the whole split);
- sweeps and theory: × (depths × seeds) ratio for sweeps; theory as measured.

The jobs of the target (its seeds, models, depths, inits) are then scheduled longest first on N identical
one-CPU workers (what ``optmech reproduce --executor ray`` does with ``--cpus-per-job 1``), and the makespan is
printed with the total CPU-hours. An estimate, valid for inputs of the measured shape (MNIST-sized images; for
``cifar10`` measure a short reproduction of that preset first and pass its folder). ``--memory`` runs the
measured run's two largest training jobs for 30 steps, each in a fresh process, and prints its peak resident set.
"""

from __future__ import annotations

import argparse
import heapq
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from optmech.experiments.reproduce import plan_jobs  # noqa: E402
from optmech.experiments.reproduce_config import ReproduceConfig, load_preset  # noqa: E402

HELDOUT = {"mnist": 10_000, "fashion-mnist": 10_000, "mnist5k": 1_000, "cifar10": 10_000, "digits": 360}
TRAINING = {"mnist": 60_000, "fashion-mnist": 60_000, "mnist5k": 4_000, "cifar10": 50_000, "digits": 1_437}


def _steps(config: ReproduceConfig) -> int:
    """A training run's steps: ``steps``, else its epochs over the training split (the last batch partial)."""
    t = config.train
    if t.get("steps"):
        return t["steps"]
    per_epoch = -(-TRAINING[config.dataset] // t.get("batch_size", 64))
    return min(per_epoch * t.get("epochs", 1), t.get("max_steps") or 10**9)


def _evaluated(config: ReproduceConfig) -> float:
    """Held-out images evaluated along a training run and at its end."""
    t = config.train
    points = _steps(config) // t.get("eval_every", 100) + 1
    held = HELDOUT.get(config.dataset, 10_000)
    return points * min(t.get("eval_samples") or held, held) + held


def _records(config: ReproduceConfig) -> float:
    t = config.train
    return _steps(config) / t.get("probe_every", 1) * t.get("n_probe", 16)


def measured_costs(run_dir: Path) -> tuple[ReproduceConfig, dict[str, dict]]:
    meta = json.loads((run_dir / "reproduce.json").read_text())
    config = ReproduceConfig(**meta["config"])
    costs = {}
    for key, job in meta["jobs"].items():
        entry = {"wall_s": job["wall_s"]}
        run = run_dir / key / "run.json"
        if run.is_file():
            s = json.loads(run.read_text())["summary"]
            entry.update({k: s[k] for k in ("training_s", "probing_s", "writing_s", "evaluating_s")})
        costs[key] = entry
    return config, costs


def _train_key(key: str) -> tuple[str, str, str]:
    """(model, kNN, init) of train/<model>-kNN-sS-<init>."""
    model, depth, _, init = key.split("/")[1].split("-", 3)
    return model, depth, init


def estimate(measured: ReproduceConfig, costs: dict[str, dict], target: ReproduceConfig) -> dict[str, float]:
    """{job key of the target: estimated CPU-seconds}."""
    by_run = {_train_key(k): c for k, c in costs.items() if k.startswith("train/") and "training_s" in c}
    steps = _steps(target) / _steps(measured)
    probes = _records(target) / _records(measured)
    evals = _evaluated(target) / _evaluated(measured)
    sweep = (len(target.sweep.depths) * len(target.sweep.seeds)) / (len(measured.sweep.depths) * len(measured.sweep.seeds))
    out = {}
    for job in plan_jobs(target):
        if job.kind == "train":
            c = by_run.get(_train_key(job.key))
            if c is None:
                raise SystemExit(f"{job.key}: no measured run of that model, depth and init in the measured reproduction")
            out[job.key] = c["training_s"] * steps + (c["probing_s"] + c["writing_s"]) * probes + c["evaluating_s"] * evals
        elif job.kind == "sweep":
            same = [c["wall_s"] for k, c in costs.items() if k.startswith("sweep/") and k.split("/")[2] == job.key.split("/")[2]]
            out[job.key] = (max(same) if same else 0.0) * sweep
        else:
            out[job.key] = costs.get(job.key, {"wall_s": 0.0})["wall_s"]
    return out


def makespan(costs: list[float], workers: int) -> float:
    """Longest-first list scheduling on identical workers (what a task queue does with the jobs sorted by cost)."""
    loads = [0.0] * workers
    heapq.heapify(loads)
    for c in sorted(costs, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + c)
    return max(loads)


def peak_memory(run_dir: Path, keys: list[str]) -> dict[str, float]:
    """Peak resident set (MiB) of each job run for 30 steps in a fresh process."""
    meta = json.loads((run_dir / "reproduce.json").read_text())
    out = {}
    for key in keys:
        code = (
            "import json, resource, sys, tempfile\n"
            "from optmech.experiments.reproduce import plan_jobs, run_job\n"
            "from optmech.experiments.reproduce_config import ReproduceConfig\n"
            f"meta = json.loads({json.dumps(json.dumps(meta['config']))})\n"
            "meta['train']['steps'] = 30\n"
            "config = ReproduceConfig(**meta)\n"
            f"job = next(j for j in plan_jobs(config) if j.key == {key!r})\n"
            "run_job(job, tempfile.mkdtemp(), config.model_dump(mode='json'), threads=1)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        out[key] = float(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished reproduction (reproduce.json, train/*/run.json)")
    parser.add_argument("--preset", nargs="*", default=["paper", "fashion"], help="presets to estimate")
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2, 8, 32, 78])
    parser.add_argument("--memory", action="store_true", help="measure the peak memory of the two largest training jobs")
    args = parser.parse_args()
    measured, costs = measured_costs(args.run_dir)
    kinds = defaultdict(list)
    for key, c in costs.items():
        kinds[key.split("/")[0] if not key.startswith("train/") else "train " + "-".join(_train_key(key)[:2])].append(c["wall_s"])
    print(f"measured: {args.run_dir} (preset {measured.name}, {len(costs)} jobs, one torch thread each)")
    print(f"{'job kind':16s} {'jobs':>5s} {'CPU-s each':>14s}")
    for kind, walls in sorted(kinds.items()):
        print(f"{kind:16s} {len(walls):5d} {min(walls):6.0f} – {max(walls):5.0f}")
    total = sum(c["wall_s"] for c in costs.values())
    print(f"{'all':16s} {len(costs):5d} {total:14.0f}   (= {total / 3600:.2f} CPU-hours)")
    if args.memory:
        largest = sorted((k for k in costs if k.startswith("train/")), key=lambda k: -costs[k]["wall_s"])[:2]
        for key, mib in peak_memory(args.run_dir, largest).items():
            print(f"peak resident set of {key} (30 steps, fresh process): {mib:.0f} MiB")
    for name in args.preset:
        target = load_preset(name)
        est = estimate(measured, costs, target)
        cpu = sum(est.values())
        print(f"\npreset {name}: {len(est)} jobs, {cpu / 3600:.1f} CPU-hours; longest job {max(est.values()) / 60:.0f} min")
        print(f"{'workers':>8s} {'wall (h:mm)':>12s}")
        for n in args.workers:
            span = makespan(list(est.values()), n)
            print(f"{n:8d} {int(span // 3600):9d}:{int(span % 3600 // 60):02d}")


if __name__ == "__main__":
    main()
