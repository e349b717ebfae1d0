"""``optmech reproduce``: every experiment of the paper as resumable jobs, run in parallel processes or on Ray.

    config = load_preset("quick")
    result = reproduce(config, "runs/quick", jobs=2)

The run directory::

    reproduce.json                 config, versions, status, per-job wall times
    train/<model>-k<kk>-s<seed>-<init>/   one training run each (Figs 2–4, 6–9), see experiments.train
    sweep/<init>/depth_sweep/      Fig. 5 depth sweep at initialisation, one arm per scheme
    theory/<name>.parquet          the theory experiments (experiments.theory_runs)

Every job is resumable on its own (training runs from their checkpoints, sweeps per (model, k)
part, theory tables are written whole), so re-running the same command skips finished jobs and
completes interrupted ones. The claims and the report are built afterwards from these records
(:func:`optmech.experiments.claims.evaluate_claims`, :func:`optmech.report.build_report`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import data as datasets
from ..records import read_json, write_json_atomic, write_parquet_atomic
from .config import TrainConfig
from .depth_sweep import DepthSweepConfig, depth_sweep
from .executors import Events, Executor, InProcess, LocalPool, RayExecutor
from .registry import EXPERIMENTS, Job
from .reproduce_config import ReproduceConfig
from .theory_runs import run_theory_experiment
from .train import RunDirError, check_device, environment_versions, train

__all__ = ["Job", "plan_jobs", "job_done", "run_job", "reproduce", "ReproduceResult", "ReproduceError"]


def plan_jobs(config: ReproduceConfig) -> list[Job]:
    """Every job of every experiment in :data:`EXPERIMENTS`, each once, longest first."""
    jobs = {job.key: job for experiment in EXPERIMENTS for job in experiment.jobs(config)}
    return sorted(jobs.values(), key=lambda j: (-j.cost, j.key))


def _sweep_config(config: ReproduceConfig, init: str, model: str) -> DepthSweepConfig:
    s = config.sweep
    return DepthSweepConfig(models=[model], depths=s.depths, seeds=s.seeds, n_probe=s.n_probe, dataset=config.dataset,
                            data_dir=config.data_dir, init=init, mapping=config.mapping)


def job_done(job: Job, run_dir: Path, config: ReproduceConfig) -> bool:
    """Whether the job's output is complete on disk."""
    if job.kind == "train":
        meta = run_dir / job.key / "run.json"
        return meta.is_file() and read_json(meta).get("status") == "complete"
    if job.kind == "sweep":
        init, model = job.params
        folder = run_dir / "sweep" / init / "depth_sweep"
        return all((folder / f"{model}-k{k:02d}-{init}.parquet").is_file() for k in config.sweep.depths)
    return (run_dir / f"{job.key}.parquet").is_file()


def run_job(job: Job, run_dir: str, config_json: dict, threads: int | None = None, progress=None) -> tuple[str, float]:
    """Run (or continue) one job; returns (key, wall seconds). Top-level, so that any executor's workers can call it
    (:mod:`.executors`); idempotent: a finished job's files are rewritten equal, an interrupted one resumes.

    ``progress``: anything with ``put((key, step, total, pid))`` (a queue of the executor), told about a training
    job's steps about a hundred times per run."""
    if threads:
        torch.set_num_threads(threads)
    config = ReproduceConfig(**config_json)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if job.kind == "train":
        model, depth, seed, init = job.params
        out = run_dir / job.key
        if out.exists() and not (out / "run.json").is_file():
            shutil.rmtree(out)  # killed before its run.json: nothing to keep
        on_step = None
        if progress is not None:
            def on_step(info: dict) -> None:
                if info["step"] % max(1, info["total"] // 100) == 0 or info["step"] == info["total"]:
                    progress.put((job.key, info["step"], info["total"], os.getpid()))
        train(config.train_config(model, depth, seed, init), out, resume=(out / "run.json").is_file(), on_step=on_step)
    elif job.kind == "sweep":
        init, model = job.params
        depth_sweep(_sweep_config(config, init, model), run_dir / "sweep" / init)
    elif job.kind == "theory":
        (name,) = job.params
        write_parquet_atomic(run_theory_experiment(name, config.theory), run_dir / f"{job.key}.parquet")
    else:  # pragma: no cover - plan_jobs makes only these
        raise AssertionError(job.kind)
    return job.key, time.perf_counter() - t0


def _check_dataset(config: ReproduceConfig) -> None:
    """Fail before any job starts when the preset's dataset is missing, saying what runs offline."""
    try:
        datasets.load(config.dataset, root=config.data_dir, split="test")
    except datasets.DatasetNotFoundError as exc:
        raise datasets.DatasetNotFoundError(
            f"preset {config.name!r} needs dataset {config.dataset!r}: {exc} The presets 'quick' (bundled MNIST-5k) "
            "runs offline with no files: optmech reproduce --preset quick."
        ) from None


class ReproduceError(RuntimeError):
    """Some jobs of a reproduction failed; the others finished (the message lists the failures)."""


@dataclasses.dataclass
class ReproduceResult:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    wall_s: float


def _start_meta(run_dir: Path, config: ReproduceConfig, overwrite: bool) -> dict:
    meta_path = run_dir / "reproduce.json"
    wanted = config.model_dump(mode="json")
    if meta_path.is_file():
        stored = read_json(meta_path)
        try:  # through the model, so that fields added later with defaults do not count as differences
            before = ReproduceConfig(**stored.get("config", {})).model_dump(mode="json")
        except ValueError:
            before = stored.get("config", {})
        if before != wanted:
            if not overwrite:
                diff = sorted(k for k in set(wanted) | set(before) if before.get(k) != wanted.get(k))
                raise RunDirError(f"{run_dir}: holds a reproduction with another config (differs in {diff}). Re-run with the "
                                  "same preset and overrides to continue it, use --overwrite to replace it, or choose another --out.")
            shutil.rmtree(run_dir)
        else:
            stored.update(status="running", versions=environment_versions())
            return stored
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: expected a new or empty directory or an optmech reproduction, got another folder. Choose another --out.")
    return {"config": wanted, "status": "running", "versions": environment_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "experiments": {e.id: {"title": e.title, "figures": list(e.figures), "claims": list(e.claims),
                                   "jobs": [j.key for j in e.jobs(config)]} for e in EXPERIMENTS},
            "jobs": {}, "sessions": []}


def reproduce(
    config: ReproduceConfig,
    out: str | Path,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    on_event: Callable[[dict], None] | None = None,
    executor: Executor | None = None,
) -> ReproduceResult:
    """Run every job of ``config`` that is not finished in ``out``, on ``executor``.

    ``executor`` (:mod:`.executors`): by default ``jobs`` local processes (:class:`.executors.LocalPool`; this process
    when ``jobs == 1``); :class:`.executors.RayExecutor` runs them as Ray tasks. Spawned local workers re-import the
    calling script: call ``reproduce`` under ``if __name__ == "__main__":`` there (the CLI does). Re-running with the
    same config continues the reproduction; a different config is refused unless ``overwrite``. ``on_event``
    receives {"event": "start"|"queued"|"done"|"skip"|"failed", "key", "done", "total"} ("start" when run in this
    process, "queued" when handed to a worker), and {"event": "progress", "key", "step", "steps", "pid"} as a
    training job advances. A failed job does not stop the others; :class:`ReproduceError` lists the failures at
    the end.
    """
    if jobs < 1:
        raise ValueError(f"jobs: expected a positive number of processes, got {jobs}.")
    run_dir = executor.check_run_dir(out) if isinstance(executor, RayExecutor) else Path(out)
    _check_dataset(config)
    check_device(TrainConfig(**config.train))  # a missing GPU fails here, not in every training job
    meta = _start_meta(run_dir, config, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "reproduce.json", meta)
    started = time.perf_counter()
    planned = plan_jobs(config)
    todo = [j for j in planned if not job_done(j, run_dir, config)]
    skipped = [j.key for j in planned if j not in todo]
    total, n_done = len(planned), len(skipped)
    emit = on_event or (lambda info: None)
    for key in skipped:
        emit({"event": "skip", "key": key, "done": n_done, "total": total})

    def finished(key: str, wall: float) -> None:
        nonlocal n_done
        n_done += 1
        meta["jobs"][key] = {"wall_s": round(wall, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(run_dir / "reproduce.json", meta)
        emit({"event": "done", "key": key, "done": n_done, "total": total, "wall_s": wall})

    failures: dict[str, str] = {}

    def failed(key: str, error: str) -> None:
        failures[key] = error
        emit({"event": "failed", "key": key, "done": n_done, "total": total, "error": error})

    events = Events(
        queued=lambda key: emit({"event": "queued", "key": key, "done": n_done, "total": total}),
        start=lambda key: emit({"event": "start", "key": key, "done": n_done, "total": total}),
        progress=lambda key, step, steps, pid=None: emit({"event": "progress", "key": key, "step": step, "steps": steps, "pid": pid}),
        done=finished,
        failed=failed,
    )
    if executor is None:
        executor = InProcess() if jobs == 1 or len(todo) <= 1 else LocalPool(jobs)
    executor.run(todo, run_dir, config.model_dump(mode="json"), events)
    wall = time.perf_counter() - started
    meta["sessions"].append({"ran": [j.key for j in todo], "wall_s": round(wall, 3), "jobs": jobs, "executor": executor.name,
                             "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    meta["status"] = "failed" if failures else "complete"
    meta["failures"] = failures
    write_json_atomic(run_dir / "reproduce.json", meta)
    if failures:
        listed = "; ".join(f"{k}: {v}" for k, v in failures.items())
        hint = ""
        if any(v.startswith("BrokenProcessPool") for v in failures.values()):
            hint = (" Worker processes died: killed, out of memory, or started from a script without an "
                    "`if __name__ == '__main__':` guard (spawned workers re-import the main module). Add the guard, or use jobs=1.")
        raise ReproduceError(f"{len(failures)} of {len(todo)} jobs failed ({listed}).{hint} The other jobs finished and are kept; "
                             "fix the cause and re-run the same command to complete the failed ones.")
    return ReproduceResult(run_dir=run_dir, ran=[j.key for j in todo], skipped=skipped, wall_s=wall)
