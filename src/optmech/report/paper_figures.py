"""Registry of the report's figures: for each, how to draw it from a reproduction's records, what the
paper says it shows, and the claims it bears on (their verdicts become the caption's second half)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..records import Reproduction
from . import figures as F

__all__ = ["FigureSpec", "FIGURES"]


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    id: str
    title: str
    paper: str  # what the paper claims the figure shows
    claims: tuple[str, ...]
    draw: Callable[[Reproduction], object]  # returns a matplotlib Figure, or None when its records are missing


def _cfg(rep: Reproduction) -> dict:
    return rep.meta["config"]


def _inits(rep: Reproduction) -> list[str]:
    """The training runs' initialisation arms, main arm first."""
    return _cfg(rep).get("train_inits") or ["pytorch"]


def _bounds_runs(rep: Reproduction) -> dict:
    cfg = _cfg(rep)
    seed, init = cfg["seeds"][0], _inits(rep)[0]
    keys = {m: (m, cfg["bounds_depth"], seed, init) for m in cfg["bounds_models"]}
    return {m: rep.train[key] for m, key in keys.items() if key in rep.train}


def _depth_runs(rep: Reproduction, model: str, arm: int = 0) -> dict:
    cfg, inits = _cfg(rep), _inits(rep)
    if arm >= len(inits):
        return {}
    seed = cfg["seeds"][0]
    return {k: rep.train[(model, k, seed, inits[arm])] for k in cfg["depths"] if (model, k, seed, inits[arm]) in rep.train}


def _evals(rep: Reproduction, keys) -> dict:
    return {f"{m} k{k} s{s} {i}": rep.train_meta[(m, k, s, i)]["evals"] for (m, k, s, i) in keys if (m, k, s, i) in rep.train_meta}


def _learning_bounds(rep: Reproduction):
    cfg = _cfg(rep)
    runs = _evals(rep, [(m, cfg["bounds_depth"], s, _inits(rep)[0]) for m in cfg["bounds_models"] for s in cfg["seeds"]])
    return F.plot_learning(runs, title=f"Learning curves of the Figs 2–4 runs (k = {cfg['bounds_depth']}, init {_inits(rep)[0]})") if runs else None


def _learning_depth(rep: Reproduction):
    """Held-out accuracy of the depth study, one panel pair per model and arm."""
    import matplotlib.pyplot as plt

    cfg = _cfg(rep)
    groups = [(m, i) for m in cfg["depth_models"] for i in _inits(rep)]
    groups = [(m, i, _evals(rep, [(m, k, cfg["seeds"][0], i) for k in cfg["depths"]])) for m, i in groups]
    groups = [g for g in groups if g[2]]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.0 * len(groups)), constrained_layout=True, squeeze=False)
    for row, (m, init, runs) in zip(axes, groups):
        F.plot_learning(runs, axes=row, title="")
        row[0].set_title(f"model {m}, init {init}: held-out accuracy")
        row[1].set_title(f"model {m}, init {init}: held-out loss")
    F._suptitle(fig, "Learning curves of the depth study (Figs 6–9), every run: accuracy and loss on the held-out images")
    return fig


def _arm_title(rep: Reproduction, arm: int, what: str) -> str:
    return f"{what} — init {_inits(rep)[arm]}" if arm < len(_inits(rep)) else what


def _sweep(rep: Reproduction, init: str):
    if not len(rep.sweep) or init not in set(rep.sweep["init"]):
        return None
    return rep.sweep[rep.sweep["init"] == init]


def _published(rep: Reproduction):
    runs, pairs = {}, {}
    cfg = _cfg(rep)
    for m in cfg["bounds_models"]:
        key = (m, cfg["bounds_depth"], cfg["seeds"][0], _inits(rep)[0])
        pair = rep.train_meta.get(key, {}).get("data", {}).get("published_pair")
        if pair:
            runs[m], pairs[m] = rep.train[key], pair
    return F.plot_published_pairing(runs, pairs) if runs else None


def _when(data, draw, *args, **kwargs):
    """``draw(data, ...)``, or None when the records it needs are missing (None or empty)."""
    return None if data is None or len(data) == 0 else draw(data, *args, **kwargs)


def _window(rep: Reproduction) -> dict:
    """The local Pearson window settings of the claims checker: {"window": n, "growing_from": k or None}."""
    claims = _cfg(rep).get("claims", {})
    return {"window": int(claims.get("window", 50)), "growing_from": claims.get("growing_from")}


FIGURES: list[FigureSpec] = [
    FigureSpec("fig2", "Fig. 2 — bounds during training (models a–d, k = 1)",
               "log₂ E_f stays between log₂‖g‖² + L and log₂‖g‖² + U, and the gap narrows during training.",
               ("C2.1", "C2.2", "C2.3"), lambda rep: _when(_bounds_runs(rep), F.plot_bounds)),
    FigureSpec("fig3", "Fig. 3 — local Pearson correlation during training",
               "After batch ~500 the local correlations of the fitting error with both bounds approach 1.",
               ("C3.1", "C3.2"), lambda rep: _when(_bounds_runs(rep), F.plot_local_pearson, **_window(rep))),
    FigureSpec("fig4", "Fig. 4 — gradient norm and structural error during training",
               "The gradient norm controls the fitting error only while U, L, G stay constant; they change early, then settle.",
               ("C4.1", "C4.2"), lambda rep: _when(_bounds_runs(rep), F.plot_indicators)),
    FigureSpec("fig5", "Fig. 5 — structural error and gradient norm against depth and |θ| at initialisation (PyTorch default init)",
               "Without skip connections (a, c) U, L, G approach 0 as depth grows; with them (b, d) U, L decrease, G grows, U ≫ L; "
               "skip connections amplify the gradient (eq. 24).",
               ("C5.1", "C5.2", "C5.3", "C5.grad"),
               lambda rep: _when(_sweep(rep, "pytorch"), F.plot_depth_sweep, title="Fig. 5: structural error at initialisation against depth — PyTorch default init "
                   "(median, IQR over seeds × probes)")),
    FigureSpec("fig5-he", "Fig. 5, sensitivity arm — the same sweep under He-normal initialisation",
               "The paper says 'default initialisation (He)'; the authors' code uses PyTorch's default. READING.md §2 expects the "
               "plain-model claim to depend on which.",
               ("C5.init", "C5.1 [he_normal]", "C5.2 [he_normal]", "C5.3 [he_normal]", "C5.grad [he_normal]"),
               lambda rep: _when(_sweep(rep, "he_normal"), F.plot_depth_sweep, title="Fig. 5 sensitivity: the same sweep under He-normal initialisation")),
    FigureSpec("fig6", "Fig. 6 — model a with increasing blocks k, trained (main initialisation arm)",
               "The fitting error starts to fall later as k grows, when the structural error converges; U, L, G approach 0.",
               ("C6.1", "C6.2", "C6.3"), lambda rep: _when(_depth_runs(rep, "a"), F.plot_depth_training, "a",
                                                          title=_arm_title(rep, 0, "Fig. 6: model a with increasing blocks k"))),
    FigureSpec("fig7", "Fig. 7 — model b with increasing blocks k, trained (main initialisation arm)",
               "With skip connections U, L, G do not fall with k at the start, and convergence is faster.",
               ("C7.1", "C7.2"), lambda rep: _when(_depth_runs(rep, "b"), F.plot_depth_training, "b",
                                                  title=_arm_title(rep, 0, "Fig. 7: model b with increasing blocks k"))),
    FigureSpec("fig6-alt", "Fig. 6, second initialisation arm — model a with increasing blocks k",
               "The same figure under the other initialisation: whether Fig. 6 is the vanishing-signal regime (READING.md F3).",
               ("C6.1 [pytorch]", "C6.2 [pytorch]", "C6.3 [pytorch]"),
               lambda rep: _when(_depth_runs(rep, "a", 1), F.plot_depth_training, "a", title=_arm_title(rep, 1, "Fig. 6: model a"))),
    FigureSpec("fig7-alt", "Fig. 7, second initialisation arm — model b with increasing blocks k",
               "The same figure under the other initialisation.", ("C7.1 [pytorch]", "C7.2 [pytorch]"),
               lambda rep: _when(_depth_runs(rep, "b", 1), F.plot_depth_training, "b", title=_arm_title(rep, 1, "Fig. 7: model b"))),
    FigureSpec("fig8", "Fig. 8 — local Pearson correlation, model a by depth (main initialisation arm)",
               "For model a, high correlation arrives later as k grows.",
               ("C8/9.2",), lambda rep: _when(_depth_runs(rep, "a"), F.plot_depth_pearson, "a", **_window(rep),
                                              title=_arm_title(rep, 0, "Fig. 8: model a, local correlation per probe image"))),
    FigureSpec("fig9", "Fig. 9 — local Pearson correlation, model b by depth (main initialisation arm)",
               "Model b reaches high correlation earlier than model a at the same k.",
               ("C8/9.1",), lambda rep: _when(_depth_runs(rep, "b"), F.plot_depth_pearson, "b", **_window(rep),
                                              title=_arm_title(rep, 0, "Fig. 9: model b, local correlation per probe image"))),
    FigureSpec("fig8-alt", "Fig. 8, second initialisation arm — local Pearson correlation, model a by depth",
               "The same figure under the other initialisation.", ("C8/9.2 [pytorch]",),
               lambda rep: _when(_depth_runs(rep, "a", 1), F.plot_depth_pearson, "a", **_window(rep),
                                 title=_arm_title(rep, 1, "Fig. 8: model a, local correlation per probe image"))),
    FigureSpec("fig9-alt", "Fig. 9, second initialisation arm — local Pearson correlation, model b by depth",
               "The same figure under the other initialisation.", ("C8/9.1 [pytorch]",),
               lambda rep: _when(_depth_runs(rep, "b", 1), F.plot_depth_pearson, "b", **_window(rep),
                                 title=_arm_title(rep, 1, "Fig. 9: model b, local correlation per probe image"))),
    FigureSpec("learning", "Learning curves of the Figs 2–4 runs",
               "The paper trains every model for one epoch of MNIST (938 steps); a run that does not learn says nothing about training dynamics.",
               (), _learning_bounds),
    FigureSpec("learning-depth", "Learning curves of the depth study (Figs 6–9), every initialisation arm",
               "Runs below chance + the preset's margin are gated out of the trend claims.", (), _learning_depth),
    FigureSpec("published", "As published — the authors' two-image pairing",
               "The paper's curves come from main_convergence.py, which takes E_f from one test image and the bounds from another.",
               ("A.pairing",), _published),
    FigureSpec("lemma2", "Lemma 2 by Monte Carlo", "Both events hold with probability 1 − O(1/n).", ("P.Lemma2",),
               lambda rep: _when(rep.theory.get("lemma2"), F.plot_lemma2)),
    FigureSpec("theorem4", "Theorem 4 by Monte Carlo, with the corrections",
               "Under the GIC, U ≤ −log(1 − 2 ln K/m)² − log ε² and G ≤ log(Z + 1) with probability ≥ 1 − O(1/K).",
               ("P.T4a", "P.T4b", "P.T4b-corrected", "P.T4-gershgorin"),
               lambda rep: _when(rep.theory.get("theorem4"), F.plot_theorem4)),
    FigureSpec("theorem2", "Theorem 2 — the ratio ρ(t) near θ = 0", "‖p_θ(x)‖² ≤ k‖θ‖² + 1/K near θ = 0.", ("P.Thm2",),
               lambda rep: _when(rep.theory.get("theorem2"), F.plot_theorem2)),
]
