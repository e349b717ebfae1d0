"""Figures and reports, built from records only (never from models): one function per figure."""

from .figures import plot_depth_sweep

__all__ = ["plot_depth_sweep"]
