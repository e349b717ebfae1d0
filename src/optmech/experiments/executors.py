"""Where ``reproduce``'s jobs run: this process, a local pool of processes, or a Ray cluster.

Every executor runs the same job function, :func:`.reproduce.run_job` ``(job, run_dir, config_json, threads,
progress)``, which writes its results into the run directory atomically and resumes from what a previous attempt
left there; an executor only decides where and how many at a time, and reports back through :class:`Events`:
``queued``/``start`` when a job is handed out, ``progress`` as a training job advances (with the worker's pid),
``done`` with the job's wall time, ``failed`` with the error. A new executor (Slurm through submitit, say) is one
class with a ``run`` method.

- :class:`InProcess`: one job after another in this process.
- :class:`LocalPool`: ``jobs`` spawned worker processes (fresh interpreters), each with ``cpu_count // jobs`` torch
  threads.
- :class:`RayExecutor`: every job a Ray task (``num_cpus`` = its torch threads; one GPU per training job with
  ``--device cuda``), retried by Ray when its worker or node is lost (the retry resumes from the job's last
  checkpoint). Needs ``pip install optmech[ray]``; the run directory must be a path every node sees.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import queue as queue_module
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .registry import Job

__all__ = ["Events", "Executor", "InProcess", "LocalPool", "RayExecutor", "make_executor", "EXECUTORS"]

EXECUTORS = ("local", "ray")


@dataclasses.dataclass
class Events:
    """Callbacks an executor reports through (each called on the driver, in its thread)."""

    queued: Callable[[str], None]
    start: Callable[[str], None]
    progress: Callable[[str, int, int, int | None], None]  # key, step, steps, worker pid
    done: Callable[[str, float], None]  # key, wall seconds
    failed: Callable[[str, str], None]  # key, "ErrorType: message"


class Executor(Protocol):
    name: str

    def run(self, jobs: list[Job], run_dir: Path, config_json: dict, events: Events) -> None:
        """Run every job, reporting through ``events``; return when all have finished or failed."""


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Relay:
    """A job's progress sink in this process: run_job calls ``put((key, step, steps, pid))``."""

    def __init__(self, events: Events) -> None:
        self.events = events

    def put(self, item) -> None:
        self.events.progress(*item)


class InProcess:
    """One job after another in this process (``--jobs 1``)."""

    name = "in-process"

    def run(self, jobs: list[Job], run_dir: Path, config_json: dict, events: Events) -> None:
        from .reproduce import run_job

        for job in jobs:
            events.start(job.key)
            try:
                events.done(*run_job(job, str(run_dir), config_json, progress=_Relay(events)))
            except Exception as exc:  # noqa: BLE001 - one failed job must not stop the others
                events.failed(job.key, _error(exc))


#: a pool worker's progress queue, set by the pool's initializer
_PROGRESS = None


def _init_worker(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _pool_job(job: Job, run_dir: str, config_json: dict, threads: int):
    from .reproduce import run_job

    return run_job(job, run_dir, config_json, threads, progress=_PROGRESS)


class LocalPool:
    """``jobs`` spawned worker processes on this machine, ``cpu_count // jobs`` torch threads each (``--jobs N``).

    Spawned workers re-import the calling script: call ``reproduce`` under ``if __name__ == "__main__":`` there.
    """

    name = "local"

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)

    def run(self, jobs: list[Job], run_dir: Path, config_json: dict, events: Events) -> None:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP state
        queue = ctx.Queue()  # the workers' progress, handed over when each worker starts
        pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,))

        def drain() -> None:
            while True:
                try:
                    events.progress(*queue.get_nowait())
                except queue_module.Empty:
                    return

        try:
            futures = {}
            for job in jobs:
                futures[pool.submit(_pool_job, job, str(run_dir), config_json, self.threads)] = job
                events.queued(job.key)
            pending = set(futures)
            while pending:
                ready, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                drain()
                for fut in ready:
                    try:
                        events.done(*fut.result())
                    except Exception as exc:  # noqa: BLE001 - the other jobs go on; failures are reported at the end
                        events.failed(futures[fut].key, _error(exc))
        except BaseException:  # interrupted: stop the workers now (their finished parts and checkpoints are kept)
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        drain()


class _RayProgress:
    """A task's progress sink: each item sent to the driver's queue actor without waiting for the reply. A task that
    waits on ``ray.get`` lends its CPU back to Ray, which then starts another task on it: with a blocking ``put``
    every progress report let one more job run than the cluster has CPUs."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def put(self, item) -> None:
        self.queue.actor.put_nowait.remote(item)


class RayExecutor:
    """Every job a Ray task; Ray schedules them over the cluster's resources and retries a task whose worker or node
    was lost (up to ``max_retries`` times; the retry resumes from the job's checkpoint, so no row is lost or written
    twice). Errors raised by a job itself are not retried: they are reported, as with the local pool.

    Args:
        address: the cluster (``"auto"``: the one ``ray start`` runs on this machine; ``"HOST:PORT"``); None starts
            a local Ray instance for the duration (or uses the one this process already initialised).
        cpus_per_job: CPUs Ray reserves for each job, and its torch threads.
        gpus_per_train_job: GPUs reserved for each training job (1 with ``--device cuda``).
        max_retries: retries of a task whose worker died.
        init: more arguments of ``ray.init`` when this executor starts Ray.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_job: int = 1, gpus_per_train_job: float = 0,
                 max_retries: int = 3, **init) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as err:
            raise ImportError("executor: 'ray' needs Ray: `pip install optmech[ray]` (or `pip install ray`).") from err
        if not isinstance(cpus_per_job, int) or cpus_per_job < 1:
            raise ValueError(f"cpus_per_job: expected a positive integer, got {cpus_per_job!r} instead.")
        self.address, self.cpus_per_job, self.gpus_per_train_job = address, cpus_per_job, gpus_per_train_job
        self.max_retries, self.init = max_retries, init

    def check_run_dir(self, out: str | Path) -> Path:
        """The run directory as every task will see it: a cluster needs an absolute path (shared storage); a relative
        one would resolve against each worker's own working directory."""
        path = Path(out)
        if self.address is not None and not path.is_absolute():
            raise ValueError(
                f"out: expected an absolute path on storage every Ray node sees (a shared file system), got the relative "
                f"path {str(out)!r}, which only this driver resolves. Pass e.g. --out /shared/runs/paper."
            )
        return path.resolve()

    def run(self, jobs: list[Job], run_dir: Path, config_json: dict, events: Events) -> None:
        import ray
        from ray.util.queue import Empty, Queue

        from .reproduce import run_job

        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init)
        try:
            queue = Queue()
            task = ray.remote(max_retries=self.max_retries, retry_exceptions=False)(run_job)
            refs = {}
            for job in jobs:
                gpus = self.gpus_per_train_job if job.kind == "train" else 0
                ref = task.options(num_cpus=self.cpus_per_job, num_gpus=gpus, name=job.key).remote(
                    job, str(run_dir), config_json, self.cpus_per_job, _RayProgress(queue))
                refs[ref] = job
                events.queued(job.key)

            def drain() -> None:
                while True:
                    try:
                        events.progress(*queue.get_nowait())
                    except Empty:
                        return

            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                    drain()
                    for ref in ready:
                        try:
                            events.done(*ray.get(ref))
                        except Exception as exc:  # noqa: BLE001 - reported at the end, as with the local pool
                            cause = getattr(exc, "cause", None) or exc
                            events.failed(refs[ref].key, _error(cause))
            except BaseException:  # interrupted: cancel what is left (finished parts and checkpoints are kept)
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            drain()
        finally:
            if started:
                ray.shutdown()


def make_executor(name: str, *, jobs: int = 1, address: str | None = None, device: str = "cpu",
                  cpus_per_job: int | None = None) -> Executor:
    """The executor the CLI's ``--executor`` names: ``local`` (``jobs`` processes; this process when 1) or ``ray``
    (``cpus_per_job`` CPUs per task: by default ``cpu_count // jobs`` on a local Ray instance, 1 on a cluster)."""
    if name == "local":
        return InProcess() if jobs == 1 else LocalPool(jobs)
    if name == "ray":
        if cpus_per_job is None:
            cpus_per_job = max(1, (os.cpu_count() or 1) // jobs) if address is None else 1
        return RayExecutor(address, cpus_per_job=cpus_per_job, gpus_per_train_job=1 if str(device).startswith("cuda") else 0)
    raise ValueError(f"executor: expected one of {list(EXECUTORS)}, got {name!r} instead.")
