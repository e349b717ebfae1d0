"""Sinks, the Lightning and Hugging Face callbacks, and Hugging Face models probed directly — each with the real
package (installed from the extras; skipped where absent), read back with that package's own reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from optmech import Probe
from optmech.integrations.sinks import HISTOGRAMS, ParquetSink, open_sink, summary_scalars
from tests.oracles import structural_oracle_of


def mlp(C: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, C))


def data(n: int = 8, C: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, C, (n,), generator=g)


# --- the summary every sink writes ---------------------------------------------------------------------------------

def test_summary_scalars_are_medians_and_quartiles_of_the_finite_values():
    x, y = data()
    m = Probe(mlp()).measure(x, y)
    s = summary_scalars(m, "p")
    frame = m.to_frame()
    assert s["p/U/median"] == pytest.approx(float(np.median(frame["U"])), rel=1e-12)
    assert s["p/G/q25"] == pytest.approx(float(np.quantile(frame["G"], 0.25)), rel=1e-12)
    assert s["p/log_fitting_error/q75"] == pytest.approx(float(np.quantile(frame["log_fitting_error"], 0.75)), rel=1e-12)
    assert s["p/bound_holds_fraction"] == 1.0 and s["p/samples"] == 8.0
    frame.loc[0, "U"] = math.inf  # a rank-deficient sample: left out of the median, counted apart
    assert summary_scalars(frame, "p")["p/U/median"] == pytest.approx(float(np.median(frame["U"][1:])), rel=1e-12)


def test_open_sink_names_the_kinds_and_parquet_round_trips(tmp_path):
    with pytest.raises(ValueError, match=r"log: expected KIND:TARGET with KIND one of tensorboard:<a folder"):
        open_sink("tensorbord:runs")
    x, y = data()
    m = Probe(mlp()).measure(x, y)
    sink = open_sink(f"parquet:{tmp_path / 'p.parquet'}")
    assert isinstance(sink, ParquetSink)
    sink.log(3, m)
    sink.log(5, m)
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert back["step"].tolist() == [3] * 8 + [5] * 8
    np.testing.assert_array_equal(back["U"].to_numpy()[:8], m.U.numpy())


# --- TensorBoard ---------------------------------------------------------------------------------------------------

def _events(folder: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    files = sorted(Path(folder).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    scalars, histograms = {}, {}
    for f in files:
        acc = event_accumulator.EventAccumulator(str(f), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["histograms"]:
            histograms.setdefault(tag, []).extend((e.step, e.histogram_value) for e in acc.Histograms(tag))
    return scalars, histograms


def test_tensorboard_sink_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from optmech.integrations.sinks import TensorBoardSink

    x, y = data()
    m = Probe(mlp()).measure(x, y)
    sink = TensorBoardSink(tmp_path / "tb")
    sink.log(7, m)
    sink.close()
    scalars, histograms = _events(tmp_path / "tb")
    expected = summary_scalars(m)
    for tag, value in expected.items():
        (step, got), = scalars[tag]
        assert step == 7 and got == pytest.approx(value, rel=1e-6)  # TensorBoard keeps float32
    for column in HISTOGRAMS:
        (step, h), = histograms[f"optmech/{column}"]
        assert step == 7 and h.num == 8 and h.min == pytest.approx(float(getattr(m, column).min()), rel=1e-6)


def test_train_cli_logs_to_tensorboard_and_prints_progress_to_a_file(tmp_path):
    pytest.importorskip("tensorboard")
    from typer.testing import CliRunner

    from optmech.cli import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--model", "mlp", "--dataset", "digits",
                                      "--max-steps", "6", "--n-probe", "4", "--probe-every", "2", "--eval-every", "3",
                                      "--log", f"tensorboard:{tmp_path / 'tb'}"])
    assert result.exit_code == 0, result.output
    assert "step 6/6" in result.output  # not a terminal: plain progress lines
    scalars, _ = _events(tmp_path / "tb")
    records = pd.read_parquet(tmp_path / "run" / "records")
    fixed = records[records["probe_set"] == "heldout"]  # the fixed probe samples, held out
    steps = sorted(fixed["step"].unique())
    for column in ("L", "log_fitting_error"):
        logged = scalars[f"optmech/heldout/{column}/median"]
        assert [s for s, _ in logged] == steps
        for step, value in logged:
            assert value == pytest.approx(float(fixed[fixed["step"] == step][column].median()), rel=1e-6)


# --- Lightning -----------------------------------------------------------------------------------------------------

def test_lightning_callback_in_fit_validate_and_test(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from optmech.integrations.lightning import ProbeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def test_step(self, batch, _):
            self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = data(32)
    xp, yp = data(8, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    callback = ProbeCallback(probe_batch=(xp, yp), every_n_steps=2, on_train_batch=True)
    trainer = L.Trainer(max_steps=4, logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[callback], accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    module = Module()
    trainer.fit(module, loader)
    direct = Probe(module).measure(xp, yp)  # the final weights: the step-4 measurement's
    trainer.validate(module, loader)
    trainer.test(module, loader)
    direct_val = Probe(module).measure(x[:8], y[:8])

    scalars, histograms = _events(tmp_path / "tb")
    logged = dict(scalars["optmech/probe/U/median"])
    assert sorted(logged) == [1, 2, 4]
    assert logged[4] == pytest.approx(summary_scalars(direct, "optmech/probe")["optmech/probe/U/median"], rel=1e-6)
    assert sorted(dict(scalars["optmech/train_batch/G/median"])) == [1, 2, 4]
    for prefix in ("optmech/val", "optmech/test"):
        (step, value), = scalars[f"{prefix}/log_fitting_error/median"]
        assert step == 4
        assert value == pytest.approx(summary_scalars(direct_val, prefix)[f"{prefix}/log_fitting_error/median"], rel=1e-6)
    assert {f"optmech/probe/{c}" for c in HISTOGRAMS} <= set(histograms)
    torch.testing.assert_close(callback.latest["optmech/probe"].A, direct.A)


# --- Hugging Face models, directly ----------------------------------------------------------------------------------

def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=12, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def tokens(n: int = 4, T: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 4:] = 0  # padding
    mask[3, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("method", ["gram", "auto", "jacobian"])
def test_bert_from_config_against_the_float64_oracle_with_a_padding_mask(method):
    model = tiny_bert().double()
    ids, mask = tokens()
    ref = structural_oracle_of(model, lambda b: model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0], 4)
    from optmech import structural_matrix

    result = structural_matrix(model, {"input_ids": ids, "attention_mask": mask}, method=method)
    assert (result.A - ref).abs().max() <= 1e-9 * ref.abs().max()
    if method == "gram":
        assert result.route.generic() == {}  # embeddings (positions too), attention with the mask, LayerNorms: all fast
        y = torch.tensor([0, 1, 2, 0])
        m = Probe(model, check=True).measure({"input_ids": ids, "attention_mask": mask}, y)
        assert bool(m.bound_holds.all())


def test_vit_from_config_against_the_float64_oracle():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=24, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = structural_oracle_of(model, lambda b: model(x[b:b + 1]).logits[0], 3)
    from optmech import structural_matrix

    result = structural_matrix(model, x, method="gram")  # a tensor in, a ModelOutput out
    assert (result.A - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert result.route.generic() == {}  # patch convolution, class token and positions (direct), attention, LayerNorms


def test_hf_trainer_callback_on_a_tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from optmech.integrations.transformers import ProbeCallback

    model = tiny_bert()
    ids, mask = tokens(16)
    labels = torch.arange(16) % 3

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}

    probe_batch = ({"input_ids": ids[:4], "attention_mask": mask[:4]}, labels[:4])
    sink = ParquetSink(tmp_path / "probe.parquet")
    callback = ProbeCallback(probe_batch, every_n_steps=2, sinks=[sink])
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_steps=100, learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "optmech/probe/U/median" in e]
    assert [e["step"] for e in entries] == [1, 2, 4]
    direct = Probe(model).measure(*probe_batch)
    assert entries[-1]["optmech/probe/U/median"] == pytest.approx(summary_scalars(direct, "optmech/probe")["optmech/probe/U/median"], rel=1e-9)
    back = pd.read_parquet(tmp_path / "probe.parquet")
    assert sorted(back["step"].unique()) == [1, 2, 4]


# --- W&B (offline) and MLflow (local file store) --------------------------------------------------------------------

def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (``run-*.wandb``): W&B's record log (LevelDB's log format: 32 KiB
    blocks of records, each with a 7-byte header checksum/length/type, after a 7-byte file header), each record a
    ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, raw, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            raw.append(pending + chunk)
    rows = []
    for r in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(r)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from optmech.integrations.sinks import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    x, y = data()
    m = Probe(mlp()).measure(x, y)
    sink = WandbSink(mode="offline", dir=str(tmp_path), project="optmech-test")
    sink.log(1, m)
    sink.log(2, m)
    sink.close()
    run_file, = tmp_path.rglob("run-*.wandb")
    rows = _wandb_history(run_file)
    assert [r["_step"] for r in rows] == [1, 2]
    expected = summary_scalars(m)
    for tag in ("optmech/U/median", "optmech/G/q75", "optmech/bound_holds_fraction"):
        assert rows[0][tag] == pytest.approx(expected[tag], rel=1e-12)
    assert rows[0]["optmech/G/_type"] == "histogram" and sum(rows[0]["optmech/G/values"]) == 8


def test_mlflow_local_run_read_back(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from optmech.integrations.sinks import MLflowSink

    x, y = data()
    m = Probe(mlp()).measure(x, y)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local store (MLflow refuses its file store unless told)
    sink = MLflowSink(tracking_uri=uri, run_name="probe")
    run_id = sink.run.info.run_id
    sink.log(1, m)
    sink.log(3, m)
    sink.close()
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, "optmech/U/median")
    assert [h.step for h in history] == [1, 3]
    assert history[0].value == pytest.approx(summary_scalars(m)["optmech/U/median"], rel=1e-12)
