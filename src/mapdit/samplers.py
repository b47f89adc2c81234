"""Samplers for a GaussianDiffusion: ancestral DDPM, DDIM, and classifier-free guidance; `sample` also
dispatches to the few-step diffusers samplers of `mapdit.schedulers` (dpm++2m, unipc, heun).

All randomness comes from the passed torch.Generator (which must live on the sampling device);
the model is always called as model_fn(x, original_t, y).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mapdit.diffusion import GaussianDiffusion, ModelFn, make_diffusion
from mapdit.errors import UserError
from mapdit.schedulers import DIFFUSERS_SAMPLERS, diffusers_schedulers, sample_diffusers

# --sampler name -> the sampler it runs (ours: ddpm, ddim; diffusers': see mapdit.schedulers)
SAMPLER_NAMES = {"ddpm": "ddpm", "ancestral": "ddpm", "ddim": "ddim", **{n: n for n in DIFFUSERS_SAMPLERS}}
SAMPLER_CHOICES = tuple(SAMPLER_NAMES)  # for argparse `choices`

# The default of `mapdit sample`, `mapdit fid`, the demo's grid and the study: DPM-Solver++(2M) at 20 model
# evaluations reached the FD_fmnist of 250-step ancestral sampling (within or below its seed spread) on two
# trained models, at 1/12.5 of its cost (BENCHMARKS.md, "Few-step samplers").
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm++2m", 20


def check_sampler(name: str) -> str:
    """The sampler `name` runs (ancestral -> ddpm), or a one-line UserError for an unknown name or a diffusers
    sampler without diffusers installed. Call it before loading anything, so a bad choice fails at once."""
    kind = SAMPLER_NAMES.get(name)
    if kind is None:
        raise UserError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_CHOICES)}")
    if kind in DIFFUSERS_SAMPLERS:
        diffusers_schedulers()
    return kind


def classifier_free_guidance(model_fn: ModelFn, cfg_scale: float, null_class: int,
                             guide_channels: int | None = None) -> ModelFn:
    """Wrap model_fn so eps = eps_u + s * (eps_c - eps_u) on the first `guide_channels` eps channels.

    One doubled batch [x, x] with labels [y, null] per call. Channels that are not guided (the rest of
    eps, and the learned-variance half) come from the conditional branch. guide_channels=None guides all
    C eps channels; 3 reproduces the original DiT (3 of 4 latent channels). cfg_scale == 1 is a no-op.
    """
    if cfg_scale == 1:
        return model_fn

    def guided_model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        guided = channels if guide_channels is None else guide_channels
        if not 1 <= guided <= channels:
            raise ValueError(f"guide_channels must be in 1..{channels}, got {guide_channels}")
        null_labels = torch.full_like(y, null_class)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_labels]))
        cond, uncond = out.chunk(2, dim=0)  # each (N, 2C or C, H, W)
        eps_guided = uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided])
        return torch.cat([eps_guided, cond[:, guided:]], dim=1)

    return guided_model_fn


def _initial_noise(shape, noise, generator, device) -> torch.Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.float()
    return torch.randn(tuple(shape), generator=generator, device=device)


def _sampling_device(y: torch.Tensor, noise: torch.Tensor | None) -> torch.device:
    return noise.device if noise is not None else y.device


def _reverse_steps(diffusion: GaussianDiffusion, progress: bool, desc: str):
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    return tqdm(steps, desc=desc, total=diffusion.num_timesteps) if progress else steps


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, diffusion: GaussianDiffusion, shape, y: torch.Tensor,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None, progress: bool = False,
                clip_denoised: bool = False) -> torch.Tensor:
    """Ancestral sampling x_{t-1} = mean + sigma * z with the model's (learned or fixed-small) variance;
    the final step returns the mean without noise. Returns x0 (N, C, H, W)."""
    device = _sampling_device(y, noise)
    x = _initial_noise(shape, noise, generator, device)
    for step in _reverse_steps(diffusion, progress, "ddpm"):
        t = torch.full((x.shape[0],), step, dtype=torch.int64, device=device)
        out = model_fn(x, diffusion.map_timesteps(t), y)
        p = diffusion.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
        if step > 0:
            z = torch.randn(x.shape, generator=generator, device=device)
            x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
        else:
            x = p["mean"]
    return x


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, diffusion: GaussianDiffusion, shape, y: torch.Tensor, eta: float = 0.0,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None, progress: bool = False,
                clip_denoised: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12):
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev). eta=0 is deterministic."""
    device = _sampling_device(y, noise)
    x = _initial_noise(shape, noise, generator, device)
    for step in _reverse_steps(diffusion, progress, "ddim"):
        t = torch.full((x.shape[0],), step, dtype=torch.int64, device=device)
        out = model_fn(x, diffusion.map_timesteps(t), y)
        p = diffusion.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
        # Scalars of this step, in float64 on the host (no device sync).
        abar = float(diffusion.alphas_cumprod[step])
        abar_prev = float(diffusion.alphas_cumprod_prev[step])
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar)) ** 0.5 * (1.0 - abar / abar_prev) ** 0.5
        direction = max(1.0 - abar_prev - sigma**2, 0.0) ** 0.5
        x = abar_prev**0.5 * p["pred_xstart"] + direction * p["eps"]
        if step > 0 and sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=device)
    return x


def sample(model_fn: ModelFn, *, shape, y: torch.Tensor, sampler: str = "ddpm", steps: int = 250, eta: float = 0.0,
           cfg_scale: float = 1.0, null_class: int | None = None, guide_channels: int | None = None,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None, progress: bool = False,
           num_train_steps: int = 1000, learn_sigma: bool = True, clip_denoised: bool = False) -> torch.Tensor:
    """Sample x0 (N, C, H, W) with `steps` steps of `sampler`, optionally with CFG: ddpm/ancestral and ddim run a
    `steps`-step respacing of the DiT diffusion; dpm++2m, unipc and heun run diffusers' schedulers
    (`mapdit.schedulers`; `eta` does not apply to them, and heun makes 2*steps-1 model calls)."""
    kind = check_sampler(sampler)
    if not 1 <= steps <= num_train_steps:
        raise UserError(f"steps must be between 1 and {num_train_steps}, got {steps}")
    if cfg_scale != 1 and null_class is None:
        raise UserError("classifier-free guidance (cfg_scale != 1) needs null_class, "
                        "the label of the unconditional class")
    if cfg_scale != 1:
        model_fn = classifier_free_guidance(model_fn, cfg_scale, null_class, guide_channels)
    if kind in DIFFUSERS_SAMPLERS:
        return sample_diffusers(model_fn, kind, shape=shape, y=y, steps=steps, noise=noise, generator=generator,
                                num_train_steps=num_train_steps, learn_sigma=learn_sigma,
                                clip_denoised=clip_denoised, progress=progress)
    diffusion = make_diffusion(num_train_steps, sampling_steps=steps, learn_sigma=learn_sigma)
    if kind == "ddim":
        return sample_ddim(model_fn, diffusion, shape, y, eta=eta, noise=noise, generator=generator, progress=progress,
                           clip_denoised=clip_denoised)
    return sample_ddpm(model_fn, diffusion, shape, y, noise=noise, generator=generator, progress=progress,
                       clip_denoised=clip_denoised)
