"""matplotlib, loaded when the first plot is drawn (it is heavy and only plots need it), with the Agg
backend; figures are written as PNG atomically. `plot_metrics`: a training run's loss, learning rate and FD."""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import reading
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


def read_metrics_csv(path: Path) -> list[dict]:
    """metrics.csv's rows (dicts by the header); its FD column is "fd", "fid" in runs from before it was
    named for what it measures (FD_fmnist on Fashion-MNIST): both are read as "fd"."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if "fd" not in row and "fid" in row:
            row["fd"] = row.pop("fid")
    return rows


def plot_metrics(metrics_csv: Path, out: Path, fd_label: str = "FD") -> Path | None:
    """A PNG of a run's metrics.csv: the loss and its unweighted eps-MSE, the learning rate, and the FD when
    the run scores one (`fd_label` names it, e.g. FD_fmnist), each against the step. None before the first
    row."""
    def series(key):
        pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # a damaged or hand-edited metrics.csv ('abc' as a loss) is a UserError, which SideOutputs turns into one
    # warning; it was a traceback after training had finished
    with reading(metrics_csv, "the metrics file", "repair or delete the damaged rows"):
        rows = [r for r in read_metrics_csv(metrics_csv) if (r.get("step") or "").isdigit()]
        curves = {key: series(key) for key in ("loss", "mse", "lr", "fd")}
    if not rows:
        return None
    fd = curves["fd"]
    plt = pyplot()
    panels = 3 if fd[0] else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), constrained_layout=True)
    for key, label in (("loss", "loss"), ("mse", "eps-MSE")):
        steps, values = curves[key]
        axes[0].plot(steps, values, label=label)
    if values and min(values) > 0 and max(values) > 10 * min(values):  # the eps-MSE: a log axis once it spans a decade
        axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("training loss")
    axes[1].plot(*curves["lr"])
    axes[1].set_title("learning rate")
    if fd[0]:
        axes[2].plot(*fd, marker="o")
        axes[2].set_title(f"{fd_label} of the EMA")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, out)
