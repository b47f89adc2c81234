"""What an experiment gives every variant: a training budget and a scoring budget (frozen: one budget for
all variants), and the presets of `mapdit study`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainBudget:
    """How every variant is trained."""

    model: str
    num_steps: int
    batch_size: int = 256
    lr: float | None = None  # None: the config's default (1e-4, or 1e-2 with weight normalisation)
    data_path: str = "fashion-mnist"
    ema_snapshots: int = 100
    ckpt_every: int | None = None  # None: num_steps // 5 (one magnitude measurement per checkpoint)
    log_every: int = 10
    precision: str = "fp32"


@dataclass(frozen=True)
class ScoreBudget:
    """How every variant is scored: the Fréchet distance of its samples and its residual magnitudes."""

    fid_samples: int = 10_000
    features: str | None = None  # None: fmnist for Fashion-MNIST, inception otherwise
    ref: str | None = None  # None: the training data
    num_ref: int | None = None
    sampler: str = "ddpm"
    sampling_steps: int = 250
    cfg_scale: float = 1.0
    weights: str = "ema"
    ema_std: float | None = None
    sample_batch_size: int = 64
    magnitude_batch_size: int = 64


# the settings a stored result records; a stored result counts for an ablation only when they all match
SETTINGS_KEYS = ("model", "num_steps", "batch_size", "lr", "data_path", "fid_samples", "features", "ref",
                 "num_ref", "sampler", "sampling_steps", "cfg_scale", "weights", "ema_std")


def settings(train: TrainBudget, score: ScoreBudget) -> dict:
    """The budget as a stored result records it (results/<variant>.json "settings")."""
    both = {**dataclasses.asdict(train), **dataclasses.asdict(score)}
    return {key: both[key] for key in SETTINGS_KEYS}


# ------------------------------------------------------------------------------------------------
# `mapdit study`: its variants and budgets
# ------------------------------------------------------------------------------------------------
STUDIES = ("configs", "modulation", "lr", "ema", "grid")
CONFIGS = ("A", "B", "C", "D", "E")
MODULATIONS = ("adaln", "scale", "shift", "rotate", "scale+rotate")
LRS = (1e-4, 1e-3, 1e-2)
LR_CONFIGS = ("A", "E")
SCORE_EMA = 0.05  # the EMA width every variant is scored with (the smallest tracked one)

# Full: the demo's model and batch for 600 steps (~2 min of training per run on 2 idle cores), 3 seeds, so
# that all 39 runs fit in about 1.5-2 hours. Quick: about 10 minutes for every study with one seed (9 min
# measured on 2 cores); its numbers are a smoke test, not evidence.
FULL = {"model": "DiT-XXS/4", "num_steps": 600, "batch_size": 64, "seeds": [0, 1, 2], "fid_samples": 1000,
        "sampler": "ddim", "sampling_steps": 25, "ema_sweep": "0.03:0.15:0.02"}
QUICK = {"model": "DiT-XXS/4", "num_steps": 300, "batch_size": 32, "seeds": [0], "fid_samples": 500,
         "sampler": "ddim", "sampling_steps": 20, "ema_sweep": "0.03:0.15:0.04"}
