"""Samplers for a GaussianDiffusion: ancestral DDPM, DDIM, and classifier-free guidance; `Sampler` also
runs the few-step diffusers samplers of `mapdit.schedulers` (dpm++2m, unipc, heun).

What to sample with is one value, a `SamplerSpec` (name, steps, guidance, eta, ...): it is validated when it
is made, and its defaults are the one default of `mapdit sample`, `mapdit fid`, the Python API, the study and
the scores and grids written during training. A `Sampler` is a spec bound to a model's diffusion: its
schedule (integer steps) and its diffusers scheduler are built once per call, however many batches follow.

All randomness comes from the passed torch.Generator (which must live on the sampling device);
the model is always called as model_fn(x, original_t, y) with integer steps t in [0, num_train_steps).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mapdit.data import clip_denoised_for
from mapdit.diffusion import GaussianDiffusion, ModelFn, make_diffusion, space_timesteps
from mapdit.errors import UserError
from mapdit.options import opt
from mapdit.schedulers import (
    DIFFUSERS_SAMPLERS,
    diffusers_schedulers,
    make_scheduler,
    model_evaluations,
    sample_with_scheduler,
    trailing_timesteps,
)

# --sampler name -> the sampler it runs (ours: ddpm, ddim; diffusers': see mapdit.schedulers)
SAMPLER_NAMES = {"ddpm": "ddpm", "ancestral": "ddpm", "ddim": "ddim", **{n: n for n in DIFFUSERS_SAMPLERS}}
SAMPLER_CHOICES = tuple(SAMPLER_NAMES)  # for argparse `choices`
CLIP_CHOICES = ("auto", "yes", "no")

# The one default: DPM-Solver++(2M) at 20 model evaluations reached the FD_fmnist of 250-step ancestral
# sampling (within or below its seed spread) on two trained models, at 1/12.5 of its cost (BENCHMARKS.md,
# "Few-step samplers"); guidance 4 (DiT's default for its grids; docs/recipe.md: at 500 samples 3 -> 4 raised
# the conditioning accuracy 0.86 -> 0.89 at equal FD) wherever the model has a null class.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_CFG = "dpm++2m", 20, 4.0


@dataclass(frozen=True)
class SamplerSpec:
    """How to sample: validated once, here; `sampler` is stored under its canonical name (ancestral -> ddpm).
    Each field is an option (`opt`): `mapdit sample` and `mapdit fid` generate theirs from it.

    cfg_scale None: DEFAULT_CFG for a model trained with label dropout (it has a null class), else 1 (no
    guidance). eta: DDIM's noise (Song et al. 2021, eq. 16; 0 = deterministic), for ddim only.
    guide_channels: guide the first K eps channels only (3 reproduces the original DiT); None = all.
    clip_denoised: clip x0 estimates to [-1, 1]; auto = yes for pixel data (as ADM), no for latents (as DiT).
    """

    sampler: str = opt(DEFAULT_SAMPLER, "ddpm (= ancestral) and ddim are ours; dpm++2m, unipc and heun are "
                       "diffusers' ODE solvers (heun makes 2*steps-1 model calls)", choices=SAMPLER_CHOICES)
    steps: int = opt(DEFAULT_STEPS, "sampler steps (the paper's FID used --sampler ddpm --steps 250)",
                     aliases=("--num-sampling-steps",))
    cfg_scale: float | None = opt(None, "classifier-free guidance scale (default: 4 for a model trained with "
                                        "label dropout, else 1; 1 = no guidance)")
    eta: float = opt(0.0, "DDIM's noise (0: deterministic; --sampler ddim only)")
    guide_channels: int | None = opt(None, "guide only the first K channels (3 reproduces the original DiT; "
                                           "default: all)", metavar="K")
    clip_denoised: str = opt("auto", "clip x0 estimates to [-1, 1]: auto = yes for pixel data (as ADM), no for "
                                     "latents (as DiT)", choices=CLIP_CHOICES)

    def __post_init__(self):
        kind = SAMPLER_NAMES.get(self.sampler)
        if kind is None:
            raise UserError(f"unknown sampler {self.sampler!r}; valid names: {', '.join(SAMPLER_CHOICES)}")
        if kind in DIFFUSERS_SAMPLERS:
            diffusers_schedulers()  # a missing diffusers: one line now, before any loading
        object.__setattr__(self, "sampler", kind)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise UserError(f"--steps {self.steps!r} must be a whole number")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps} must be at least 1")
        if self.cfg_scale is not None:
            if not (isinstance(self.cfg_scale, (int, float)) and math.isfinite(self.cfg_scale)
                    and self.cfg_scale >= 0):
                raise UserError(f"--cfg-scale {self.cfg_scale} must be a finite number >= 0 (1: no guidance)")
            object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        if not (isinstance(self.eta, (int, float)) and 0 <= self.eta <= 1):
            raise UserError(f"--eta {self.eta} must be in [0, 1]")
        if self.eta != 0 and kind != "ddim":
            raise UserError(f"--eta applies to --sampler ddim only, not {kind}: drop it or use ddim")
        object.__setattr__(self, "eta", float(self.eta))
        if self.guide_channels is not None and (isinstance(self.guide_channels, bool)
                                                or not isinstance(self.guide_channels, int)
                                                or self.guide_channels < 1):
            raise UserError(f"--guide-channels {self.guide_channels} must be at least 1")
        if self.clip_denoised not in CLIP_CHOICES:
            raise UserError(f"--clip-denoised {self.clip_denoised!r}: use one of {', '.join(CLIP_CHOICES)}")

    @classmethod
    def of(cls, spec: SamplerSpec | None = None, **fields) -> SamplerSpec:
        """`spec` (default: the default spec) with `fields` replaced; None values leave a field as it is."""
        given = {k: v for k, v in fields.items() if v is not None}
        if spec is not None and not given:
            return spec
        return cls(**{**(dataclasses.asdict(spec) if spec is not None else {}), **given})  # validated once

    def guidance(self, null_class: int | None) -> float:
        """The guidance scale for a model with this null class (None: trained without label dropout)."""
        if self.cfg_scale is None:
            return DEFAULT_CFG if null_class is not None else 1.0
        if self.cfg_scale != 1 and null_class is None:
            raise UserError(f"guidance (--cfg-scale {self.cfg_scale:g}) needs a model trained with label dropout "
                            "(a null class, null_class); this one has none: use --cfg-scale 1")
        return self.cfg_scale

    def clip(self, data_meta: dict | None) -> bool:
        """Whether x0 estimates are clipped for this data (auto: pixel data yes, latents no)."""
        if self.clip_denoised == "auto":
            return clip_denoised_for(data_meta or {})
        return self.clip_denoised == "yes"

    def tag(self, cfg_scale: float) -> str:
        """The part of file names that says how samples were drawn, e.g. 'dpm++2m20-cfg4'."""
        return f"{self.sampler}{self.steps}-cfg{cfg_scale:g}"

    def model_calls(self) -> int:
        """Model evaluations per image (a guided call, cond + uncond batched, counts once)."""
        return model_evaluations(self.sampler, self.steps)


# `mapdit ablate`'s scoring keeps the paper's sampler, explicitly: 250 ancestral steps, no guidance.
PAPER_SPEC = SamplerSpec("ddpm", 250, cfg_scale=1.0)


def check_sampler(name: str) -> str:
    """The sampler `name` runs (ancestral -> ddpm), or a one-line UserError: SamplerSpec's own check."""
    return SamplerSpec(sampler=name).sampler


def model_timesteps(sampler: str, steps: int, num_train_steps: int = 1000) -> list[int]:
    """The integer training steps the model is evaluated at, in order, for `steps` steps of `sampler`
    (canonical name): ours run the evenly strided respacing (`space_timesteps`, 0 and T-1 kept), diffusers'
    the trailing spacing (`trailing_timesteps`; heun evaluates each step but the first twice)."""
    if sampler in ("ddpm", "ddim"):
        return space_timesteps(num_train_steps, steps)[::-1]
    ts = trailing_timesteps(steps, num_train_steps)
    return [ts[0], *[t for t in ts[1:] for _ in range(2)]] if sampler == "heun" else ts


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


class Sampler:
    """A SamplerSpec bound to one model's diffusion: guidance scale, integer schedule and (for diffusers'
    samplers) the scheduler are resolved and built once; each call samples one batch from its noise."""

    def __init__(self, spec: SamplerSpec, *, num_train_steps: int = 1000, learn_sigma: bool = True,
                 null_class: int | None = None, channels: int | None = None, clip_denoised: bool = False):
        if not 1 <= spec.steps <= num_train_steps:
            raise UserError(f"--steps {spec.steps} must be between 1 and {num_train_steps}, the model's "
                            "training steps")
        if spec.guide_channels is not None and channels is not None and spec.guide_channels > channels:
            raise UserError(f"--guide-channels {spec.guide_channels} is more than the model's {channels} channels")
        self.spec, self.null_class, self.learn_sigma = spec, null_class, learn_sigma
        self.cfg_scale = spec.guidance(null_class)
        self.clip_denoised = bool(clip_denoised)
        if spec.sampler in DIFFUSERS_SAMPLERS:
            self.timesteps = trailing_timesteps(spec.steps, num_train_steps)
            self.scheduler = make_scheduler(spec.sampler, num_train_steps=num_train_steps,
                                            clip_denoised=self.clip_denoised)
        else:
            self.diffusion = make_diffusion(num_train_steps, sampling_steps=spec.steps, learn_sigma=learn_sigma)

    @classmethod
    def for_model(cls, spec: SamplerSpec, model, data_meta: dict | None = None) -> Sampler:
        """Bound to a DiT `model` (its config) and its data (for clip_denoised auto)."""
        cfg = model.config
        return cls(spec, num_train_steps=cfg.num_train_steps, learn_sigma=cfg.learn_sigma,
                   null_class=cfg.null_class, channels=cfg.in_channels, clip_denoised=spec.clip(data_meta))

    @torch.no_grad()
    def __call__(self, model_fn: ModelFn, *, y: torch.Tensor, noise: torch.Tensor,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """x0 (N, C, H, W) from `noise` (N, C, H, W) for labels `y` (N,)."""
        spec = self.spec
        if self.cfg_scale != 1:
            model_fn = classifier_free_guidance(model_fn, self.cfg_scale, self.null_class, spec.guide_channels)
        if spec.sampler in DIFFUSERS_SAMPLERS:
            return sample_with_scheduler(model_fn, self.scheduler, shape=noise.shape, y=y, steps=spec.steps,
                                         noise=noise, generator=generator, learn_sigma=self.learn_sigma,
                                         progress=progress, timesteps=self.timesteps)
        if spec.sampler == "ddim":
            return sample_ddim(model_fn, self.diffusion, noise.shape, y, eta=spec.eta, noise=noise,
                               generator=generator, progress=progress, clip_denoised=self.clip_denoised)
        return sample_ddpm(model_fn, self.diffusion, noise.shape, y, noise=noise, generator=generator,
                           progress=progress, clip_denoised=self.clip_denoised)


def sample(model_fn: ModelFn, *, shape, y: torch.Tensor, spec: SamplerSpec | None = None,
           null_class: int | None = None, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None, progress: bool = False, num_train_steps: int = 1000,
           learn_sigma: bool = True, clip_denoised: bool = False, **spec_fields) -> torch.Tensor:
    """Sample x0 (N, C, H, W) of `shape` from a model function with `spec` (or the default spec with
    `spec_fields` replaced: sampler, steps, cfg_scale, eta, guide_channels). ddpm/ancestral and ddim run a
    `steps`-step respacing of the DiT diffusion; dpm++2m, unipc and heun run diffusers' schedulers
    (`mapdit.schedulers`; heun makes 2*steps-1 model calls)."""
    spec = SamplerSpec.of(spec, **spec_fields)
    device = noise.device if noise is not None else y.device
    x_T = _initial_noise(shape, noise, generator, device)
    run = Sampler(spec, num_train_steps=num_train_steps, learn_sigma=learn_sigma, null_class=null_class,
                  channels=shape[1], clip_denoised=clip_denoised)
    return run(model_fn, y=y, noise=x_T, generator=generator, progress=progress)
