"""Named recipes: the values of a training run that worked, by name (`mapdit train --recipe NAME`).

A recipe gives defaults: its values replace the dataclass defaults (mapdit.config), options given on the
command line override them, and config.json records the recipe's name beside the resolved values. A value a
recipe does not name keeps the plain default (the paper's). Plain data only: mapdit.config reads the names
for the option's choices, so this module imports nothing of the package.

- fmnist-cpu: the demo's recipe (`mapdit demo` is this recipe plus a grid), measured in docs/recipe.md and
  docs/diagnosis.md: DiT-XXS/4 (1.5M parameters), Config E, 7000 steps of batch 32 (about 3.7 epochs, what
  fits in the demo's ten minutes since OpenMP's threads spin again; at 4000 steps, twice the updates of batch
  64 on the same images beat it on FD, accuracy and held-out error), learning rate 3e-2
  (MP's unit-norm weights want a larger rotation per step than the paper's 1e-2), the loss weighted by
  Min-SNR-5 (FD 34.6 -> 28.0, accuracy 0.889 -> 0.936 at no cost per step). Sampled and scored as the demo's
  grid is drawn: DPM-Solver++(2M) 20 steps, EMA sigma_rel 0.10, guidance 3 (at 6000 steps guidance 3 gave FD
  20.9 and accuracy 0.939, guidance 4 gave 22.3 and 0.956: a longer-trained model wants less guidance).
- imagenet-paper: the MaP-DiT paper's ImageNet run (Bill et al., arXiv 2505.19122; upstream's defaults):
  ImageNet 128x128 as SD-VAE latents 4x16x16 (`mapdit prepare`), DiT-XS/2 (the paper's Table 1 model),
  Config E, 400k steps of batch 256, Adam (0.9, 0.99), the rate rule's 1e-2 for MP linears, EDM2 power EMA
  at sigma_rel 0.05 and 0.10 with 250 snapshots per width; FID-10K with 250 ancestral (DDPM) steps, no
  guidance, EMA sigma_rel 0.05.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Recipe:
    name: str
    what: str  # one line for --help
    model: Mapping = field(default_factory=dict)  # ModelConfig fields
    train: Mapping = field(default_factory=dict)  # TrainConfig fields
    sample: Mapping = field(default_factory=dict)  # how its samples are drawn and scored: sampler, steps,
    #                                                cfg_scale, ema_std


def _recipe(name, what, model, train, sample) -> Recipe:
    return Recipe(name, what, MappingProxyType(model), MappingProxyType(train), MappingProxyType(sample))


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _recipe("fmnist-cpu", "Fashion-MNIST on a CPU in about 10 minutes (2 idle cores): DiT-XXS/4, Config E, "
            "7000 x 32, lr 3e-2, Min-SNR-5 (the demo's)",
            model={"model": "DiT-XXS/4", "preset": "E"},
            train={"data_path": "fashion-mnist", "num_steps": 7000, "batch_size": 32, "lr": 3e-2,
                   "min_snr_gamma": 5.0, "log_every": 50, "ema_snapshots": 50, "ckpt_every": 2000},
            sample={"sampler": "dpm++2m", "steps": 20, "cfg_scale": 3.0, "ema_std": 0.10}),
    _recipe("imagenet-paper", "the MaP-DiT paper's ImageNet 128 run on prepared latents (--data-path): DiT-XS/2, "
            "Config E, 400k x 256",
            model={"model": "DiT-XS/2", "preset": "E"},
            train={"num_steps": 400_000, "batch_size": 256, "ema_stds": (0.05, 0.10), "ema_snapshots": 250},
            sample={"sampler": "ddpm", "steps": 250, "cfg_scale": 1.0, "ema_std": 0.05}),
)}
RECIPE_NAMES = tuple(RECIPES)
