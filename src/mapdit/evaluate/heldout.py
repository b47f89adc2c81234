"""Held-out denoising error of a trained run: the ε-MSE on images the model never saw.

Why: at laptop budgets (a few hundred steps) every sample set is far from the data and Fréchet distances
bunch up near the score of noise, so they separate variants poorly. The training objective measured on
the test split, with noise and timesteps fixed by a seed, is a low-variance quality measure that every
variant is scored on identically (same images, same noise, same t) — a paired comparison.

Timesteps are stratified: image i of N is noised at t = floor((i + 1/2)·T/N) (an even grid over [0, T)),
so the figure is the mean over t of the per-t error, as the training loss is in expectation.

    run/eval/heldout-<weights>-step<step>-n<N>-seed<seed>-<split>-k<key>.json    cached (computed when missing)

<key> digests what the figure depends on: the checkpoint's content (its recorded sha256), the EMA width
at full precision (and the snapshots of a post-hoc width), the data's description; so a checkpoint
rewritten by a resume that fell back, or another width that rounds alike, never reads another's figure.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mapdit.config import ModelConfig
from mapdit.data import load_dataset
from mapdit.diffusion import make_diffusion
from mapdit.ema import weights_identity
from mapdit.errors import UserError
from mapdit.runio import cache_key, checkpoint_identity, clean_temporaries, load_run_config, read_json, write_json
from mapdit.weights import load_model, resolve_checkpoint


def _timesteps(n: int, num_timesteps: int) -> torch.Tensor:
    """(n,) int64: an even grid over [0, T), one t per image."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).floor().to(torch.int64)


@torch.no_grad()
def heldout_mse(model, diffusion, data, num_images: int = 2000, seed: int = 0, batch_size: int = 250,
                device: str | torch.device = "cpu") -> dict:
    """Mean ε-MSE of `model` on the first `num_images` images of `data` (an ImageDataset-like object with
    batch(index) -> (x, y)), each noised once at a stratified t with noise drawn from `seed`.

    Returns {"mse": mean, "mse_low_t": mean over t < T/2, "mse_high_t": mean over t >= T/2, "num_images"}."""
    n = min(int(num_images), len(data))
    if n < 1:
        raise UserError("held-out loss: the evaluation split holds no images")
    T = diffusion.num_timesteps
    t_all = _timesteps(n, T)
    g = torch.Generator().manual_seed(seed)
    errors = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        x0, y = data.batch(torch.arange(lo, hi))
        noise = torch.randn(x0.shape, generator=g)  # drawn in order: independent of the batch size's split
        x0, y, noise, t = x0.to(device), y.to(device), noise.to(device), t_all[lo:hi].to(device)
        # the training objective's ε term, per image (its vb term only trains the variance; not reported)
        errors.append(diffusion.training_losses(model, x0, t, y, noise=noise)["mse"].double().cpu())
    err = torch.cat(errors)
    low = t_all < T // 2
    return {"mse": float(err.mean()), "mse_low_t": float(err[low].mean()), "mse_high_t": float(err[~low].mean()),
            "num_images": n}


def heldout_for_run(run_dir: str | Path, weights: str = "ema", ema_std: float | None = None,
                    num_images: int = 2000, seed: int = 0, split: str = "test", device: str = "cpu",
                    log=None) -> dict:
    """heldout_mse of a run's model (its last checkpoint; EMA `ema_std`, reconstructed post hoc when not
    tracked) on `split` of its training data, cached under run/eval/. Returns the dict plus "weights"."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    step, ckpt_path = resolve_checkpoint(run_dir, None)
    if weights == "raw":
        tag = "raw"
    else:
        tag = f"ema{(ema_std if ema_std is not None else min(config['train']['ema_stds'])):.3f}"
    key = cache_key({"checkpoint_sha256": checkpoint_identity(ckpt_path),
                     **weights_identity(run_dir / "ema", config["train"]["ema_stds"], weights, ema_std, step),
                     "num_images": int(num_images), "seed": int(seed), "split": split, "data": config["data"]})
    cache = run_dir / "eval" / f"heldout-{tag}-step{step:07d}-n{num_images}-seed{seed}-{split}-k{key}.json"
    if (run_dir / "eval").is_dir():
        clean_temporaries(run_dir / "eval")  # what a killed earlier write left
    if cache.is_file():
        try:
            cached = read_json(cache)
            if isinstance(cached, dict) and isinstance(cached.get("mse"), float):
                return cached
        except UserError:
            pass  # damaged: computed again and replaced below (it is a cache)
    data_meta = config["data"]
    if data_meta.get("kind") == "latents":
        raise UserError("held-out loss: only pixel datasets with a test split are supported (this run trained "
                        "on prepared latents)")
    data = load_dataset(config["train"]["data_path"], split=split, image_size=config["train"].get("image_size"),
                        patch_size=data_meta.get("patch_size", 1), channels=data_meta.get("channels"))
    model, _, desc = load_model(run_dir, weights=weights, ema_std=ema_std, device=device,
                                log=log or (lambda m: None))
    mc = ModelConfig.from_dict(config["model"])
    diffusion = make_diffusion(mc.num_train_steps, learn_sigma=mc.learn_sigma)
    result = heldout_mse(model, diffusion, data, num_images=num_images, seed=seed, device=device)
    result.update(weights=desc, step=step, split=split, seed=seed)
    write_json(cache, result)
    return result
