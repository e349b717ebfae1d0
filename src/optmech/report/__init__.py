"""Figures and reports, built from records only (never from models): one function per figure."""

from .figures import (
    plot_bounds,
    plot_depth_pearson,
    plot_depth_sweep,
    plot_depth_training,
    plot_indicators,
    plot_learning,
    plot_lemma2,
    plot_local_pearson,
    plot_published_pairing,
    plot_theorem2,
    plot_theorem4,
    save_figure,
)
from .html import build_report

__all__ = [
    "plot_bounds", "plot_depth_pearson", "plot_depth_sweep", "plot_depth_training", "plot_indicators", "plot_learning", "plot_lemma2",
    "plot_local_pearson", "plot_published_pairing", "plot_theorem2", "plot_theorem4", "save_figure", "build_report",
]
