"""Figures and reports, built from records only (never from models): one function per figure."""

from .figures import plot_bounds, plot_depth_sweep, plot_indicators, plot_local_pearson, save_figure

__all__ = ["plot_bounds", "plot_depth_sweep", "plot_indicators", "plot_local_pearson", "save_figure"]
