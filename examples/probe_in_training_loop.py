"""Drop the probe into an ordinary training loop: two lines (build the probe, call measure).

Run: python examples/probe_in_training_loop.py   (about 10 s on a laptop CPU)
"""

import torch
from torch import nn

import optmech
from optmech.data import load

train, heldout = load("digits"), load("digits", split="test")  # bundled, offline
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x_probe, y_probe = heldout.inputs[:8], heldout.targets[:8]

probe = optmech.Probe(model, loss="softmax")  # line 1
history = []
for step in range(60):
    m = probe.measure(x_probe, y_probe)  # line 2: per-sample tensors of shape (8,)
    history.append(m.to_frame().assign(step=step))
    idx = torch.randint(0, len(train), (32,))
    loss = nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

import pandas as pd  # noqa: E402

frame = pd.concat(history)
assert frame["bound_holds"].all(), "Theorem 3 must hold on every sample"
summary = frame.groupby("step")[["log_fitting_error", "lower", "upper", "G"]].median()
print(summary.iloc[[0, 20, 40, 59]].round(3).to_string())
