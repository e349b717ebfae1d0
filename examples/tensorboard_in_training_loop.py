"""The probe in a plain training loop, its summaries in TensorBoard: medians and quartiles of U, L, G and log₂ E_f
per step, histograms of their per-sample values.

Requires: tensorboard   (pip install optmech[tensorboard])
Run: python examples/tensorboard_in_training_loop.py   then   tensorboard --logdir runs/examples/tensorboard
"""

import os
from pathlib import Path

import torch
from torch import nn

import optmech
from optmech.data import load
from optmech.integrations.sinks import TensorBoardSink

out = Path(os.environ.get("OPTMECH_EXAMPLES_OUT", "runs/examples")) / "tensorboard"
train, heldout = load("digits"), load("digits", split="test")  # bundled, offline
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x_probe, y_probe = heldout.inputs[:16], heldout.targets[:16]

probe = optmech.Probe(model, loss="softmax")
sink = TensorBoardSink(out)
for step in range(100):
    if step % 5 == 0:
        sink.log(step, probe.measure(x_probe, y_probe), prefix="optmech/heldout")
    idx = torch.randint(0, len(train), (32,))
    loss = nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx])
    sink.writer.add_scalar("train/loss", loss.item(), step)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
sink.close()
print(f"TensorBoard event files in {out}; view them with: tensorboard --logdir {out}")
