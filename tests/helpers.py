"""Helpers shared by the test modules: where Fashion-MNIST is and the markers that skip without it, the tiny
model and training budget most end-to-end tests use, `mapdit` run in-process and its one error line.

The fixtures built on them (a finished tiny run, a private copy of it) are in conftest.py.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from mapdit.cli import main as cli_main
from mapdit.config import ModelConfig, make_config
from mapdit.data import fashion_mnist
from mapdit.runio import sha256_file
from mapdit.train import TrainConfig

# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------
FMNIST = fashion_mnist.default_dir()  # MAPDIT_FASHION_MNIST if set, else the installed copy
INSTALLED_FMNIST = Path(fashion_mnist.DEFAULT_DIR)  # what "fashion-mnist" means once MAPDIT_FASHION_MNIST is unset
_MISSING = "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"


def has_fmnist(folder: Path) -> bool:
    return (Path(folder) / "train-images-idx3-ubyte.gz").exists()


needs_fmnist = pytest.mark.skipif(not has_fmnist(FMNIST), reason=_MISSING)
# for modules that unset MAPDIT_FASHION_MNIST (the `no_fmnist_override` fixture): they read the installed copy
needs_installed_fmnist = pytest.mark.skipif(not has_fmnist(INSTALLED_FMNIST), reason=_MISSING)

# ------------------------------------------------------------------------------------------------
# tiny runs
# ------------------------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one thread, so results are bit-reproducible
TINY_ARGS = ["--data-path", "fashion-mnist", "--model", "DiT-XXS/4", "--config", "E", "--global-batch-size", "8",
             "--global-seed", "1"]
RUN = "000-DiT-XXS-4"  # the first run folder of a tiny run


def tiny_model(preset="E", model="DiT-XXS/4", **kw) -> ModelConfig:
    """A Fashion-MNIST model config (28x28x1, 10 classes)."""
    return make_config(model, preset=preset, input_size=28, in_channels=1, num_classes=10, **kw)


def tiny_train(results, **kw) -> TrainConfig:
    """Four steps of batch 8: checkpoints at 2 and 4, EMA snapshots at 1..4; `kw` overrides."""
    base = dict(data_path="fashion-mnist", results_dir=str(results), num_steps=4, batch_size=8, log_every=2,
                ema_snapshots=4, ckpt_every=2, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def snapshot_files(run: Path) -> list[Path]:
    return sorted((run / "ema").glob("sigma-*/step-*.safetensors"))


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
def cli(*argv) -> int:
    """`mapdit ARGV...` in this process; its exit status."""
    return cli_main([str(a) for a in argv])


def error_line(capsys, command="train") -> str:
    """The one error line the CLI printed (stderr may also hold progress-bar redraws, never a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"mapdit {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def only_error_line(capsys, command="train") -> str:
    """Like error_line, for mistakes caught before any work: stderr is exactly that one line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mapdit {command}: error:"), err
    return err[0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# run folders, processes and planted files (shared by test_train, test_run_writer, test_runio, test_stopping, ...)
# ------------------------------------------------------------------------------------------------
def steps_in_metrics(run: Path) -> list[int]:
    return [int(row["step"]) for row in read_metrics(run)]


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def train_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "mapdit.cli", "train", *[str(a) for a in argv]]


def wait_for(condition, timeout=120.0, proc=None, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root with its content: to show nothing was lost, changed or left half-written."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


class Evil:
    """Unpickling it runs `touch MARKER`: a pickle that must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path, step: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))
    if step is not None:  # a sidecar that matches: size and checksum are right, only the format is not
        path.with_suffix(".json").write_text(json.dumps(
            {"step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path), "param_groups": []}))
