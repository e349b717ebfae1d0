"""The probe inside PyTorch Lightning: ``ProbeCallback`` measures a fixed held-out batch every 10 steps of ``fit``
and the first batch of ``validate`` and ``test``, and logs the summaries through the trainer's loggers (here
TensorBoard, histograms included).

Requires: lightning, tensorboard   (pip install optmech[lightning])
Run: python examples/lightning_callback.py   then   tensorboard --logdir runs/examples/lightning
"""

import os
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optmech.data import load
from optmech.integrations.lightning import ProbeCallback

out = Path(os.environ.get("OPTMECH_EXAMPLES_OUT", "runs/examples")) / "lightning"


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, _):
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


torch.manual_seed(0)
train, heldout = load("digits"), load("digits", split="test")  # bundled, offline
train_loader = DataLoader(TensorDataset(train.inputs, train.targets), batch_size=32, shuffle=True)
heldout_loader = DataLoader(TensorDataset(heldout.inputs, heldout.targets), batch_size=64)
callback = ProbeCallback(probe_batch=(heldout.inputs[:16], heldout.targets[:16]), every_n_steps=10)
trainer = L.Trainer(max_steps=60, logger=TensorBoardLogger(out, name="digits"), callbacks=[callback], accelerator="cpu",
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10)
module = Classifier()
trainer.fit(module, train_loader, heldout_loader)
trainer.validate(module, heldout_loader, verbose=False)
trainer.test(module, heldout_loader, verbose=False)
for prefix, m in callback.latest.items():
    frame = m.to_frame()
    print(f"{prefix:16s} median log2 E_f {frame.log_fitting_error.median():7.3f}   U {frame.U.median():6.3f}   "
          f"L {frame.L.median():7.3f}   Theorem 3 holds on {int(frame.bound_holds.sum())}/{len(frame)}")
print(f"TensorBoard logs in {out}")
