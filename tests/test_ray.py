"""`reproduce` on a local Ray cluster (``ray.init`` with 2 CPUs, started and stopped here): the same claims and rows as
the local executor, and a worker killed mid-training-job is retried by Ray and resumes from its checkpoint.
Skipped where Ray is not installed (``pip install optmech[ray]``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from optmech.experiments.claims import evaluate_claims, run_table, write_claims  # noqa: E402
from optmech.experiments.executors import RayExecutor, make_executor  # noqa: E402
from optmech.experiments.reproduce import job_done, plan_jobs, reproduce  # noqa: E402
from optmech.experiments.reproduce_config import load_preset  # noqa: E402
from optmech.records import read_reproduction  # noqa: E402

TINY = Path(__file__).parent / "data" / "tiny_preset.toml"
ONE_MODEL = ["bounds_models=['c']", "depth_models=[]", "sweep.models=['c']", "sweep.inits=['pytorch']"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _claims(run_dir: Path) -> list[dict]:
    rep = read_reproduction(run_dir)
    write_claims(evaluate_claims(rep), run_dir / "claims.json", run_table(rep))
    return json.loads((run_dir / "claims.json").read_text())["claims"]


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every Parquet file of a reproduction, by path relative to it."""
    return {str(p.relative_to(run_dir)): pd.read_parquet(p) for p in sorted(run_dir.rglob("*.parquet"))}


def test_ray_gives_the_local_executors_claims_and_rows(cluster, tmp_path):
    config = load_preset(TINY)
    local = reproduce(config, tmp_path / "local", jobs=2)
    events = []
    remote = reproduce(config, tmp_path / "ray", executor=RayExecutor(), on_event=events.append)
    assert sorted(remote.ran) == sorted(local.ran) == sorted(j.key for j in plan_jobs(config))
    assert json.loads((tmp_path / "ray" / "reproduce.json").read_text())["sessions"][-1]["executor"] == "ray"
    assert {e["key"] for e in events if e["event"] == "progress"} == {j.key for j in plan_jobs(config) if j.kind == "train"}
    assert _claims(tmp_path / "ray") == _claims(tmp_path / "local")
    ours, theirs = _tables(tmp_path / "ray"), _tables(tmp_path / "local")
    assert sorted(ours) == sorted(theirs) and len(ours) > 20
    for name, frame in theirs.items():
        pd.testing.assert_frame_equal(ours[name], frame, check_exact=True, obj=name)
    again = reproduce(config, tmp_path / "ray", executor=RayExecutor())  # the driver rerun: nothing left to do
    assert again.ran == []


def _running_tasks() -> int:
    """Ray worker processes executing a job now (Ray titles them ``ray::<task name>``; jobs are named by key)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(line.startswith(("ray::train/", "ray::sweep/", "ray::theory/")) for line in out.splitlines())


def test_no_more_jobs_run_at_once_than_the_cluster_has_cpus(cluster, tmp_path):
    """A task waiting in ray.get lends its CPU to another task: progress reports must not wait (they did, and the
    quick preset ran three training jobs at once on two CPUs)."""
    config = load_preset(TINY, overrides=["depth_models=['a', 'b']", "depths=[0, 1]", "bounds_models=['c']", "train.steps=40"])
    counts, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            counts.append(_running_tasks())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reproduce(config, tmp_path / "r", executor=RayExecutor(cpus_per_job=1))
    finally:
        stop.set()
        watcher.join()
    assert max(counts) == 2, max(counts)  # both CPUs busy, never a third job


def test_a_worker_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(cluster, tmp_path):
    config = load_preset(TINY, overrides=[*ONE_MODEL, "train_inits=['pytorch']", "train.steps=40"])
    train_key = next(j.key for j in plan_jobs(config) if j.kind == "train")
    out = tmp_path / "killed"
    killed: dict = {}

    def on_event(info: dict) -> None:
        # past the first part and its checkpoint (records_per_part = 5): kill the worker that runs the job
        if info["event"] == "progress" and info["key"] == train_key and info["step"] >= 12 and not killed:
            os.kill(info["pid"], signal.SIGKILL)
            killed["pid"] = info["pid"]
            parts = sorted((out / train_key / "records").glob("part-*.parquet"))
            killed["parts"] = {p: p.stat().st_mtime_ns for p in parts}

    result = reproduce(config, out, executor=RayExecutor(max_retries=2), on_event=on_event)
    assert killed and killed["parts"], "the kill should land after the first checkpoint"
    assert train_key in result.ran and all(job_done(j, out, config) for j in plan_jobs(config))
    # resumed, not restarted: every part written before the kill that the checkpoint covers is the same file
    kept = [p for p, stamp in killed["parts"].items() if p.exists() and p.stat().st_mtime_ns == stamp]
    assert kept
    uninterrupted = reproduce(config, tmp_path / "plain", jobs=2)  # 1 torch thread per job, as the Ray tasks
    assert train_key in uninterrupted.ran
    for name, frame in _tables(tmp_path / "plain").items():
        pd.testing.assert_frame_equal(_tables(out)[name], frame, check_exact=True, obj=name)


def test_a_cluster_needs_an_absolute_run_directory_and_names_the_extra():
    with pytest.raises(ValueError, match=r"out: expected an absolute path on storage every Ray node sees .* 'runs/quick'"):
        RayExecutor(address="auto").check_run_dir("runs/quick")
    assert RayExecutor().check_run_dir("runs/quick").is_absolute()  # a local instance: resolved here
    with pytest.raises(ValueError, match=r"executor: expected one of \['local', 'ray'\], got 'slurm'"):
        make_executor("slurm")
    assert make_executor("ray", jobs=2).cpus_per_job == max(1, (os.cpu_count() or 1) // 2)
