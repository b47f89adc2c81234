"""Shared test settings and fixtures (plain helpers are in helpers.py)."""
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FMNIST, RUN, has_fmnist, tiny_model, tiny_train
from mapdit.data import fashion_mnist
from mapdit.train import train

# Denormal floats (tiny Adam moments, zero-initialised layers) make CPU ops up to 10x slower;
# the training loop and the sampler flush them too.
torch.set_flush_denormal(True)

# One thread: predictable on shared or busy CI machines, where two OpenMP threads competing with other
# processes were measured 20x slower than one; subprocess tests set OMP_NUM_THREADS=1 as well.
torch.set_num_threads(1)


@pytest.fixture
def no_fmnist_override(monkeypatch):
    """"fashion-mnist" resolves to the installed copy whatever the caller's MAPDIT_FASHION_MNIST says."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 4-step run (helpers.tiny_train): checkpoints at 2 and 4, EMA snapshots at 1..4."""
    if not has_fmnist(FMNIST):
        pytest.skip("Fashion-MNIST not installed")
    return train(tiny_train(tmp_path_factory.mktemp("tiny")), tiny_model())


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, for tests that change it."""
    return Path(shutil.copytree(tiny_run, tmp_path / "R" / RUN))
