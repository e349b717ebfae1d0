"""Experiments: configs and presets, the training loop, the depth sweep, the theory runs, the
registry of the paper's experiments, ``reproduce`` and the claims checker."""

from .claims import Claim, evaluate_claims, write_claims
from .config import TrainConfig
from .registry import EXPERIMENTS
from .reproduce import ReproduceError, reproduce
from .reproduce_config import ReproduceConfig, load_preset
from .train import RunResult, train

__all__ = ["TrainConfig", "train", "RunResult", "ReproduceConfig", "load_preset", "reproduce", "ReproduceError",
           "EXPERIMENTS", "Claim", "evaluate_claims", "write_claims"]
