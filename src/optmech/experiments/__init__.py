"""Experiments: configs, the training loop."""

from .config import TrainConfig
from .train import RunResult, train

__all__ = ["TrainConfig", "train", "RunResult"]
