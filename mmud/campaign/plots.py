"""Headless figures for the kinds' plots: matplotlib's object API, no pyplot.

`matplotlib.figure.Figure` draws through the Agg canvas without the pyplot state machine or a
display, so plotting is the same on a laptop, a worker with no X server and in tests, and two
plots never share a current figure.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
