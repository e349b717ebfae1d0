"""`optmech reproduce` end to end on a miniature preset: jobs, resume after a kill, claims, report."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optmech.cli import app
from optmech.experiments.claims import evaluate_claims
from optmech.experiments.reproduce import ReproduceError, job_done, plan_jobs, reproduce
from optmech.experiments.reproduce_config import PresetError, available_presets, load_preset
from optmech.records import read_reproduction
from optmech.report.paper_figures import FIGURES

TINY = Path(__file__).parent / "data" / "tiny_preset.toml"
README = Path(__file__).resolve().parents[1] / "README.md"

#: every claim id of READING.md §2 (C2.1 … C8/9.2, Sec. 5.3.2) and §5 (exact and probabilistic checks)
READING_CLAIMS = {
    "C2.1", "C2.2", "C2.3", "C3.1", "C3.2", "C4.1", "C4.2", "C5.1", "C5.2", "C5.3", "C6.1", "C6.2", "C6.3",
    "C7.1", "C7.2", "C8/9.1", "C8/9.2", "S5.3.2-1", "S5.3.2-2", "S5.3.2-3",
    "X.Lemma1", "X.Prop1", "X.gAe", "X.Thm3", "X.F1", "X.Lemma3", "P.Lemma2", "P.T4a", "P.T4b", "P.Z", "P.Thm2",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "tiny"
    result = CliRunner().invoke(app, ["reproduce", "--preset", str(TINY), "--out", str(out), "--jobs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_presets_load_and_say_how_to_run_them():
    assert set(available_presets()) >= {"quick", "paper", "fashion", "cifar10"}
    from importlib import resources

    for name in available_presets():
        config = load_preset(name)
        text = (resources.files("optmech.experiments") / "presets" / f"{name}.toml").read_text()
        assert text.startswith(f"# optmech reproduce --preset {name}"), name
        assert re.search(r"Expected time: about \d+ (minutes|hours?)", text), name
        assert config.train_config("a", 1, 1).published_pair  # every preset measures the authors' pair too


def test_overrides_and_errors():
    config = load_preset("quick", overrides=["seeds=[1, 2]", "train.n_probe=4", "dataset=digits", "sweep.inits=['pytorch']"])
    assert config.seeds == [1, 2] and config.train["n_probe"] == 4 and config.dataset == "digits"
    assert len(config.train_runs()) == 2 * (4 + 2 * 6 * 2 - 2)  # a and b at k = 1 are Figs 2–4 runs of the main arm too
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        load_preset("nope")
    with pytest.raises(PresetError, match="expected key=value"):
        load_preset("quick", overrides=["seeds"])
    with pytest.raises(ValueError, match=r"\[train\] does not take \['model'\]"):
        load_preset("quick", overrides=["train.model='c'"])


@pytest.mark.slow
def test_reproduction_writes_every_claim_and_figure(tiny_run):
    out, output = tiny_run
    claims = json.loads((out / "claims.json").read_text())
    ids = {c["id"] for c in claims["claims"]}
    assert READING_CLAIMS <= ids
    assert all(c["verdict"] in ("holds", "fails", "inconclusive", "not measurable") for c in claims["claims"])
    assert all(c["kind"] in ("empirical", "identity", "theory", "derived", "descriptive") for c in claims["claims"])
    for c in claims["claims"]:  # every empirical claim states its effect, minimum and null false-pass rate
        if c["kind"] == "empirical":
            assert c["effect"]["threshold"] and c["effect"]["null"] and "null_false_pass_rate" in c["effect"], c["id"]
            assert c["reason"], c["id"]
            if c["verdict"] == "holds":
                assert c["effect"]["null_false_pass_rate"] <= 0.05
    runs = claims["runs"]  # every training run's final held-out accuracy and loss
    assert len(runs) == len(load_preset(TINY).train_runs())
    assert all(0 <= r["heldout_accuracy"] <= 1 and r["heldout_loss"] > 0 and isinstance(r["learned"], bool) for r in runs.values())
    assert all(r["edge"] is None or isinstance(r["edge"], str) for r in runs.values())  # at the edge of learning, or not
    assert all(r["learned_at_step"] is not None for r in runs.values() if r["learned"])
    assert set(claims["counts"]) >= {"empirical", "identity", "theory"} and "empirical:" in claims["summary"]
    by_id = {c["id"]: c for c in claims["claims"]}
    # exact statements are exact here too: Theorem 3 on every row, eᵀAe = autograd on every checked row
    assert by_id["X.Thm3"]["verdict"] == by_id["C2.1"]["verdict"] == by_id["X.gAe"]["verdict"] == "holds"
    assert by_id["P.T4a"]["verdict"] == "fails"  # READING.md §1.9: the printed U bound fails
    report = (out / "report.html").read_text()
    assert report.count("<img ") == len(FIGURES) and "data:image/png;base64," in report
    for spec in FIGURES:
        assert (out / "figures" / f"{spec.id}.png").stat().st_size > 5000
        assert (out / "figures" / f"{spec.id}.svg").is_file()
    for needle in ("The answer first", "Training runs", "Claims", "Caveats", "Environment", "Timings", "reconstructed", "null"):
        assert needle in report
    assert "report:" in output and "hold" in output  # the CLI prints the verdict table and the report's path


@pytest.mark.slow
def test_report_is_rebuilt_from_records_alone(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for ckpt in copy.rglob("checkpoint.pt"):
        ckpt.unlink()  # no model state: figures and claims come from the Parquet records
    shutil.rmtree(copy / "figures")
    (copy / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").read_text().count("<img ") == len(FIGURES)
    before = json.loads((out / "claims.json").read_text())["claims"]
    after = json.loads((copy / "claims.json").read_text())["claims"]
    assert [(c["id"], c["verdict"]) for c in before] == [(c["id"], c["verdict"]) for c in after]


@pytest.mark.slow
def test_rerun_skips_finished_jobs(tiny_run):
    out, _ = tiny_run
    config = load_preset(TINY)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    result = reproduce(config, out, jobs=1)
    assert result.ran == [] and len(result.skipped) == len(plan_jobs(config))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.slow
def test_killed_reproduce_resumes_without_recomputing_finished_runs(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "optmech.cli", "reproduce", "--preset", str(TINY), "--out", str(out), "--jobs", "1"]
    # the event: the driver's own plain line saying that the first training job is done
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    config = load_preset(TINY)
    jobs = plan_jobs(config)
    try:
        for line in proc.stdout:
            if "done: train/" in line:
                break
        else:
            pytest.fail("reproduce ended before a training job finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    finished = [j for j in jobs if job_done(j, out, config)]
    assert finished and len(finished) < len(jobs), "the kill should land between the first finished job and the last"
    files = [p for j in finished for p in ((out / j.key).rglob("*") if (out / j.key).is_dir() else [out / f"{j.key}.parquet"])]
    stamps = {p: p.stat().st_mtime_ns for p in files if p.is_file()}
    assert stamps
    result = reproduce(config, out, jobs=1)
    assert {j.key for j in finished} <= set(result.skipped)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished runs untouched
    assert all(job_done(j, out, config) for j in jobs)


def test_cli_errors_are_clean(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce", "--preset", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown preset" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["reproduce", "--preset", "paper", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "expected a data directory" in result.output and "quick" in result.output
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "reproduce.json" in result.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["reproduce", "--preset", str(TINY), "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "Choose another --out" in result.output


@pytest.mark.slow
def test_a_different_config_is_refused_without_overwrite(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ValueError, match="differs in"):
        reproduce(load_preset(TINY, overrides=["seeds=[2]"]), out, jobs=1)


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_others(tmp_path, monkeypatch):
    from optmech.experiments import theory_runs

    def broken(settings):
        raise RuntimeError("boom")

    monkeypatch.setitem(theory_runs.THEORY_EXPERIMENTS, "z_grid", (broken, "broken on purpose"))
    config = load_preset(TINY, overrides=["bounds_models=['c']", "depth_models=[]", "sweep.models=['c']", "sweep.inits=['pytorch']"])
    with pytest.raises(ReproduceError, match="1 of .* jobs failed .*theory/z_grid: RuntimeError: boom"):
        reproduce(config, tmp_path / "r", jobs=1)
    done = [j.key for j in plan_jobs(config) if job_done(j, tmp_path / "r", config)]
    assert "theory/z_grid" not in done and len(done) == len(plan_jobs(config)) - 1
    assert json.loads((tmp_path / "r" / "reproduce.json").read_text())["status"] == "failed"
    rep = read_reproduction(tmp_path / "r")
    assert "P.Z" not in {c.id for c in evaluate_claims(rep)}  # a missing table leaves its claim out, not faked


def test_readme_main_command_is_the_quick_preset():
    text = README.read_text()
    assert "optmech reproduce --preset quick" in text
    makefile = (README.parent / "Makefile").read_text()
    assert "reproduce --preset quick" in makefile


def test_published_pair_is_image_0_and_its_first_same_label_successor():
    import torch

    from optmech.experiments.config import TrainConfig
    from optmech.experiments.train import _probe_indices

    targets = torch.tensor([7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4])  # standard MNIST test #0…#19
    ids = _probe_indices(1, targets, 6, published_pair=True)
    assert ids[:2].tolist() == [0, 17] and len(set(ids.tolist())) == 6  # READING.md §1.5: "val" #0, "test" #17
    with pytest.raises(ValueError, match="found none"):
        _probe_indices(1, torch.tensor([3, 1, 2]), 2, published_pair=True)
    with pytest.raises(ValueError, match="probe_split='test'"):
        TrainConfig(published_pair=True, probe_split="train")


_SHRINK = ["train.max_steps=2", "seeds=[1]", "bounds_models=['a', 'd']", "depth_models=[]", "sweep.depths=[0]", "sweep.seeds=[0]",
           "sweep.n_probe=1", "sweep.models=['b']", "sweep.inits=['pytorch']", "theory.lemma2_trials=10", "theory.theorem4_trials=10",
           "theory.gershgorin_trials=10", "claims.window=3", "claims.smooth=1"]


def _write_mnist_idx(root):
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    test_labels = np.array([7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4], np.uint8)  # standard t10k #0…#19
    for stem, labels in (("train", rng.integers(0, 10, 150).astype(np.uint8)), ("t10k", test_labels)):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            (root / f"{stem}-{kind}-ubyte").write_bytes(header + array.tobytes())


def _write_cifar_batches(root):
    import pickle

    import numpy as np

    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [3, 5, 3, 1, 0, 2] if name == "test_batch" else rng.integers(0, 10, 30).tolist()
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"labels": labels}, fh)


@pytest.mark.slow
@pytest.mark.parametrize("preset, write, pair", [("paper", _write_mnist_idx, [0, 17]), ("cifar10", _write_cifar_batches, [0, 2])])
def test_presets_for_user_data_run_from_a_data_dir(tmp_path, preset, write, pair):
    """The paper and cifar10 presets read the standard files from --data-dir (here small files in those formats)."""
    write(tmp_path / "data")
    out = tmp_path / preset
    args = ["reproduce", "--preset", preset, "--data-dir", str(tmp_path / "data"), "--out", str(out), "--jobs", "1", "--quiet"]
    result = CliRunner().invoke(app, args + [a for s in _SHRINK for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    rep = read_reproduction(out)
    assert sorted(rep.train) == [("a", 1, 1, "he_normal"), ("d", 1, 1, "he_normal")]
    assert rep.train_meta[("a", 1, 1, "he_normal")]["data"]["published_pair"] == pair
    assert rep.train[("a", 1, 1, "he_normal")]["bound_holds"].all() and (out / "report.html").is_file()


@pytest.mark.slow
def test_a_stored_config_without_fields_added_later_still_resumes(tiny_run):
    out, _ = tiny_run
    meta_path = out / "reproduce.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["claims"]["growing_from"]  # as written before that setting existed
    meta_path.write_text(json.dumps(meta))
    result = reproduce(load_preset(TINY), out, jobs=1)
    assert result.ran == []


@pytest.mark.slow
def test_a_script_without_main_guard_gets_a_clear_message(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from optmech.experiments import load_preset, reproduce\n"
        f"config = load_preset({str(TINY)!r}, overrides=['bounds_models=[\"c\"]', 'depth_models=[]', 'sweep.inits=[\"pytorch\"]'])\n"
        f"reproduce(config, {str(tmp_path / 'out')!r}, jobs=2)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "if __name__ == '__main__':" in result.stderr and "ReproduceError" in result.stderr


@pytest.mark.slow
def test_progress_of_each_training_job_reaches_the_caller_from_worker_processes(tmp_path):
    config = load_preset(TINY, overrides=["bounds_models=['c', 'd']", "depth_models=[]", "sweep.models=['c']", "sweep.inits=['pytorch']"])
    events = []
    reproduce(config, tmp_path / "p", jobs=2, on_event=events.append)
    progress = [e for e in events if e["event"] == "progress"]
    for key in ("train/c-k01-s1-he_normal", "train/d-k01-s1-he_normal"):
        steps = [e["step"] for e in progress if e["key"] == key]
        assert steps and steps == sorted(steps) and steps[-1] == 14 and all(e["steps"] == 14 for e in progress if e["key"] == key)


@pytest.mark.slow
def test_reproduce_writes_plain_progress_lines_when_not_on_a_terminal(tmp_path):
    args = ["reproduce", "--preset", str(TINY), "--out", str(tmp_path / "r"), "--jobs", "2"]
    for s in ("bounds_models=['c', 'd']", "depth_models=[]", "sweep.models=['c']", "sweep.inits=['pytorch']"):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train/c-k01-s1-he_normal: step 14/14" in result.output and "done: train/d-k01-s1-he_normal" in result.output
