"""matplotlib, loaded when the first plot is drawn (it is heavy and only plots need it), with the Agg
backend; figures are written as PNG atomically."""
from __future__ import annotations

from pathlib import Path

from .runio import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (its folder made if needed) and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
