"""The paper's experiments, one entry per figure or theory check, each a list of resumable jobs.

``plan_jobs`` (in :mod:`optmech.experiments.reproduce`) takes the union of every entry's jobs, so a
training run shared by two figures (model a at k = 1 is in Figs 2–4 and 6–9) runs once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .reproduce_config import ReproduceConfig
from .theory_runs import THEORY_EXPERIMENTS

__all__ = ["Job", "Experiment", "EXPERIMENTS"]


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: ``kind`` is train, sweep or theory; ``key`` is its path in the run directory."""

    kind: str
    key: str
    params: tuple
    cost: float  # rough relative cost, to start the longest jobs first


@dataclasses.dataclass(frozen=True)
class Experiment:
    id: str
    title: str
    figures: tuple[str, ...]  # ids in optmech.report.paper_figures.FIGURES
    claims: tuple[str, ...]
    jobs: Callable[[ReproduceConfig], list[Job]]


def train_job(model: str, depth: int, seed: int, init: str) -> Job:
    cost = 1.0 + 0.35 * depth if model in ("a", "b") else 0.1
    return Job("train", f"train/{model}-k{depth:02d}-s{seed}-{init}", (model, depth, seed, init), 10 * cost)


def sweep_jobs(config: ReproduceConfig, inits: list[str]) -> list[Job]:
    s = config.sweep
    return [Job("sweep", f"sweep/{init}/{m}", (init, m), len(s.depths) * len(s.seeds) / 10) for init in inits for m in s.models]


EXPERIMENTS: list[Experiment] = [
    Experiment("bounds", "Figs 2–4: models a–d at k = 1, trained (main initialisation arm), probed on a schedule",
               ("fig2", "fig3", "fig4", "published", "learning"),
               ("C2.1", "C2.2", "C2.3", "C3.1", "C3.2", "C4.1", "C4.2", "A.pairing", "N.GIC"),
               lambda c: [train_job(m, c.bounds_depth, s, c.main_init) for m in c.bounds_models for s in c.seeds]),
    Experiment("depth-training", "Figs 6–9: models a and b at k = 0…5, trained, in every initialisation arm",
               ("fig6", "fig7", "fig8", "fig9", "fig6-alt", "fig7-alt", "fig8-alt", "fig9-alt", "learning-depth"),
               ("C6.1", "C6.2", "C6.3", "C7.1", "C7.2", "C8/9.1", "C8/9.2"),
               lambda c: [train_job(m, k, s, i) for m in c.depth_models for k in c.depths for s in c.seeds for i in c.train_inits]),
    Experiment("depth-sweep", "Fig. 5: models a–d at initialisation against depth (first initialisation arm)",
               ("fig5",), ("C5.1", "C5.2", "C5.3"), lambda c: sweep_jobs(c, c.sweep.inits[:1])),
    Experiment("init-sensitivity", "Fig. 5 under the other initialisation arms (He normal)",
               ("fig5-he",), ("C5.init",), lambda c: sweep_jobs(c, c.sweep.inits[1:])),
    *[Experiment(f"theory-{name}", what, {"lemma2": ("lemma2",), "theorem4": ("theorem4",), "theorem2": ("theorem2",)}.get(name, ()),
                 (), lambda c, name=name: [Job("theory", f"theory/{name}", (name,), 0.5)])
      for name, (_, what) in THEORY_EXPERIMENTS.items()],
]
