"""`mapdit demo`: the README's main job, the recipe `fmnist-cpu` (mapdit.recipes) plus a grid. Trains a small
MaP-DiT (Config E) on Fashion-MNIST on the CPU, samples one row per class and writes the grid; then prints
the settings the grid used and the command that draws 1,000 samples with them and scores them.

The recipe's numbers and the measurements behind them are in mapdit.recipes (docs/diagnosis.md and
docs/recipe.md); the demo lets a few of them be changed (`DemoSettings`).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import make_config
from .options import opt
from .recipes import RECIPES
from .sample import sample_run
from .train import TrainConfig, train

RECIPE = RECIPES["fmnist-cpu"]
DEMO_MODEL = RECIPE.model["model"]
DEMO_STEPS = RECIPE.train["num_steps"]
DEMO_BATCH = RECIPE.train["batch_size"]
DEMO_LR = RECIPE.train["lr"]
DEMO_MIN_SNR_GAMMA = RECIPE.train["min_snr_gamma"]
DEMO_EMA = RECIPE.sample["ema_std"]
DEMO_CFG = RECIPE.sample["cfg_scale"]
DEMO_SAMPLER, DEMO_SAMPLING_STEPS = RECIPE.sample["sampler"], RECIPE.sample["steps"]


@dataclass
class DemoSettings:
    """What `mapdit demo` lets a user change of the recipe (the rest is the recipe's)."""
    data_path: str = opt(RECIPE.train["data_path"], "Fashion-MNIST: 'fashion-mnist' or a folder of its IDX files")
    results_dir: str = opt("results", "the folder the run is created in")
    model: str = opt(DEMO_MODEL, "model size and patch", metavar="DiT-SIZE/PATCH")
    num_steps: int = opt(DEMO_STEPS, "training steps")
    batch_size: int = opt(DEMO_BATCH, "batch size")
    lr: float = opt(DEMO_LR, "peak learning rate")
    sampling_steps: int = opt(DEMO_SAMPLING_STEPS, f"{DEMO_SAMPLER} steps of the grid")
    cfg_scale: float = opt(DEMO_CFG, "classifier-free guidance scale of the grid")
    seed: int = opt(0, "seed of the training and of the grid")


def run_demo(**settings) -> Path:
    """Train the demo model, write its grid and print the scoring command; returns the grid's path.
    `settings`: DemoSettings fields (the rest is the recipe's)."""
    s = DemoSettings(**settings)
    num_steps, sampling_steps, cfg_scale, seed = s.num_steps, s.sampling_steps, s.cfg_scale, s.seed
    start = time.perf_counter()
    model_cfg = make_config(**{**RECIPE.model, "model": s.model}, input_size=28, in_channels=1, num_classes=10)
    # the recipe's training values, with what the demo lets change (checkpoints at the middle and the end)
    tc = TrainConfig(**{**RECIPE.train, "recipe": RECIPE.name, "data_path": s.data_path,
                        "results_dir": s.results_dir, "num_steps": num_steps, "batch_size": s.batch_size,
                        "lr": s.lr, "seed": seed, "ckpt_every": max(1, num_steps // 2)})
    run_dir = train(tc, model_cfg)
    trained = time.perf_counter() - start
    grid = sample_run(run_dir, num_samples=10, sampler=DEMO_SAMPLER, steps=sampling_steps, cfg_scale=cfg_scale,
                      ema_std=DEMO_EMA, seed=seed)
    settings = ["--sampler", DEMO_SAMPLER, "--steps", str(sampling_steps), "--cfg-scale", str(cfg_scale),
                "--ema-std", str(DEMO_EMA)]
    print(f"demo: trained {num_steps} steps in {trained / 60:.1f} min, sampled in "
          f"{(time.perf_counter() - start - trained) / 60:.1f} min; one row per class "
          f"(T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot)", file=sys.stderr)
    print(f"demo: grid written to {grid}", file=sys.stderr)
    print(f"demo: the grid used {' '.join(settings)}; to score 1,000 samples drawn the same way "
          f"(FD_fmnist and conditioning accuracy):\n  mapdit fid --run {run_dir} --num-samples 1000 "
          f"{' '.join(settings)} --batch-size 250", file=sys.stderr)
    return grid
