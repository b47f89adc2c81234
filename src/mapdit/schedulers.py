"""Few-step ODE samplers from diffusers, driving our DiT through one adapter.

The schedulers are diffusers' own (nothing of their update rules is re-implemented here); this module only
configures them from the run's diffusion and runs the loop:

    --sampler   diffusers class                  options set here
    dpm++2m     DPMSolverMultistepScheduler      algorithm_type="dpmsolver++", solver_order=2 (DPM-Solver++(2M))
    unipc       UniPCMultistepScheduler          solver_order=2, predict_x0=True (UniPC-bh2)
    heun        HeunDiscreteScheduler            2nd order, two model evaluations per step but the last

Common to all (the DiT diffusion of `mapdit.diffusion`):
  * betas: `trained_betas` = our `linear_betas(num_train_steps)` (linear 1e-4 ... 0.02), so the schedule has
    one source; prediction_type="epsilon";
  * learned-range variance: the model returns eps and v; the adapter hands the schedulers the eps half only
    (diffusers' own `variance_type="learned_range"` slices a fixed 3 channels, which is wrong for our 1- and
    4-channel data, so it is left unset);
  * integer steps built here (`trailing_timesteps`): the "trailing" spacing of Lin et al. 2023, Table 2,
    from 999 down, evenly spaced, so the first evaluation sees the model's noisiest training step and every
    step is one the model was trained on (our MP embedding is a table indexed by the integer step: fractional
    steps are not defined). They are handed to the scheduler (`set_integer_timesteps`) rather than left to
    diffusers' own float arange, which for 62 step counts (61, 103, 121, ...) yields one step too many,
    ending at t = -1;
  * x0 clipping for pixel data (`clip_denoised`): DPM-Solver++ and UniPC through `thresholding=True` with
    `sample_max_value=1.0`, which bounds the dynamic threshold s to exactly 1, i.e. a hard clip of the
    x0 estimate to [-1, 1] (their multistep updates use only x0, so this is ADM's clip with the eps
    re-derived); Heun through `clip_sample=True` (range 1). Latents are never clipped.

Classifier-free guidance is applied before the adapter sees the model (`samplers.classifier_free_guidance`:
cond and uncond halves in one doubled batch, all channels or the first K), so one scheduler step costs one
batched model call. The loop never reads a device tensor back to the host: the timesteps live on the CPU.

diffusers is a core dependency (see README, "Sampling"); an installation without it gets one line
(`UserError`, exit 2 from the CLI) naming the install command.
"""
from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mapdit.diffusion import linear_betas
from mapdit.errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

INSTALL_HINT = "pip install 'diffusers>=0.30,<1'"

# name -> (diffusers class, fixed options, how x0 clipping is switched on)
_SPECS: dict[str, tuple[str, dict, str]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "threshold"),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "predict_x0": True}, "threshold"),
    "heun": ("HeunDiscreteScheduler", {}, "clip_sample"),
    # Not a CLI sampler (our own `ddim` is the same method): diffusers' DDIM, eta 0, for checking the adapter
    # against our DDIM trajectory. set_alpha_to_one: the last step lands on abar = 1, as ours does.
    "diffusers-ddim": ("DDIMScheduler", {"set_alpha_to_one": True, "steps_offset": 0}, "clip_sample"),
}

# The names `--sampler` accepts for diffusers samplers (our own are ddpm/ancestral and ddim).
DIFFUSERS_SAMPLERS: tuple[str, ...] = ("dpm++2m", "unipc", "heun")


def diffusers_schedulers():
    """The `diffusers` module (schedulers are attributes of it), or a one-line UserError when it is missing."""
    try:
        import diffusers
    except ImportError as err:  # ModuleNotFoundError, or a broken install
        raise UserError(f"the diffusers samplers ({', '.join(DIFFUSERS_SAMPLERS)}) need diffusers, which could not "
                        f"be imported ({type(err).__name__}): {INSTALL_HINT}") from None
    return diffusers


def make_scheduler(name: str, *, num_train_steps: int = 1000, clip_denoised: bool = False):
    """A fresh diffusers scheduler for `name` configured from the DiT diffusion (see the module doc)."""
    if name not in _SPECS:
        raise UserError(f"unknown diffusers sampler {name!r}; valid names: {', '.join(DIFFUSERS_SAMPLERS)}")
    class_name, options, clip_kind = _SPECS[name]
    cls = getattr(diffusers_schedulers(), class_name)
    config = dict(options, num_train_timesteps=int(num_train_steps),
                  trained_betas=linear_betas(num_train_steps).tolist(),
                  prediction_type="epsilon", timestep_spacing="trailing")
    if clip_kind == "threshold":
        config.update(thresholding=bool(clip_denoised), sample_max_value=1.0)
    else:
        config.update(clip_sample=bool(clip_denoised), clip_sample_range=1.0)
    return cls(**config)


def trailing_timesteps(steps: int, num_train_steps: int = 1000) -> list[int]:
    """`steps` integer training steps from T-1 down, evenly spaced ("trailing", Lin et al. 2023, Table 2):
    t_k = round(k T / steps) - 1 for k = steps, ..., 1, rounded half up in integer arithmetic. For
    1 <= steps <= T: strictly decreasing (consecutive k T / steps differ by T / steps >= 1), first T-1,
    last round(T / steps) - 1 >= 0. Equals diffusers' float spacing wherever that has `steps` entries, up to
    exact halves (e.g. 48 steps: 937.5 -> 937 here, 936 there)."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {steps}")
    return [(2 * k * num_train_steps + steps) // (2 * steps) - 1 for k in range(steps, 0, -1)]


def set_integer_timesteps(scheduler, timesteps: list[int]) -> None:
    """Give `scheduler` exactly these integer steps (descending). DPM-Solver++ and Heun take them as
    `timesteps=`; UniPC takes none, so its own set-up runs (resetting its solver state) and its timesteps and
    sigmas are then replaced by the ones of these steps, computed as its set_timesteps computes them."""
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=list(timesteps))
        return
    if not hasattr(scheduler, "sigmas"):
        raise ValueError(f"{type(scheduler).__name__} cannot be given integer timesteps")
    scheduler.set_timesteps(len(timesteps))
    # sigma_t = sqrt((1 - abar_t) / abar_t) at the steps, then the scheduler's own final sigma
    table = (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).numpy()
    sigmas = np.interp(np.asarray(timesteps, dtype=np.int64), np.arange(len(table)), table)
    last = scheduler.sigmas[-1:].numpy().astype(np.float64)
    scheduler.sigmas = torch.from_numpy(np.concatenate([sigmas, last]).astype(np.float32))
    scheduler.timesteps = torch.tensor(list(timesteps), dtype=torch.int64)
    scheduler.num_inference_steps = len(timesteps)


def model_evaluations(name: str, steps: int) -> int:
    """Model calls per image for `steps` scheduler steps (a guided call, cond + uncond batched, counts once)."""
    return 2 * steps - 1 if name == "heun" else steps


@torch.no_grad()
def sample_with_scheduler(model_fn: ModelFn, scheduler, *, shape, y: torch.Tensor, steps: int,
                          noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          learn_sigma: bool = True, progress: bool = False, step_kwargs: dict | None = None,
                          timesteps: list[int] | None = None) -> torch.Tensor:
    """Run a diffusers `scheduler` for the given integer `timesteps` (None: `steps` of its own spacing) with
    `model_fn(x, t, y)`
    (already guided if wanted) from `noise` (N, C, H, W) (drawn from `generator` if None). Returns x0.

    `model_fn` receives the integer training step (N,) int64, like our own samplers; its output's eps half
    (the first C channels when `learn_sigma`) goes to `scheduler.step`.
    """
    device = noise.device if noise is not None else y.device
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, device=device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    if timesteps is None:  # the scheduler's own spacing (checked below)
        scheduler.set_timesteps(steps)  # CPU timesteps: reading them never waits for the device
    else:
        set_integer_timesteps(scheduler, timesteps)
    schedule = scheduler.timesteps.cpu()
    as_int = schedule.round().to(torch.int64)
    if not torch.equal(as_int.to(schedule.dtype), schedule):
        raise ValueError(f"{type(scheduler).__name__} produced fractional timesteps {schedule.tolist()[:4]}...: "
                         "the model is conditioned on integer steps")
    num_train = scheduler.config.num_train_timesteps
    if int(as_int.min()) < 0 or int(as_int.max()) >= num_train:
        raise ValueError(f"{type(scheduler).__name__} produced timesteps outside 0..{num_train - 1} "
                         f"({as_int.tolist()[-3:]} at the end)")
    channels = shape[1]
    expected = 2 * channels if learn_sigma else channels
    x = noise.float() * scheduler.init_noise_sigma
    kwargs = dict(step_kwargs or {})
    if generator is not None and "generator" in _step_parameters(scheduler):
        kwargs["generator"] = generator
    steps_iter = zip(schedule, as_int.tolist())
    if progress:
        steps_iter = tqdm(steps_iter, total=len(schedule), desc=type(scheduler).__name__)
    batch = x.shape[0]
    for t_sched, t_model in steps_iter:
        model_in = scheduler.scale_model_input(x, t_sched)
        t = torch.full((batch,), t_model, dtype=torch.int64, device=device)
        out = model_fn(model_in, t, y)
        if out.shape[1] != expected:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {expected}")
        x = scheduler.step(out[:, :channels].float(), t_sched, x, return_dict=False, **kwargs)[0]
    return x


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


def sample_diffusers(model_fn: ModelFn, name: str, *, shape, y: torch.Tensor, steps: int,
                     noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     num_train_steps: int = 1000, learn_sigma: bool = True, clip_denoised: bool = False,
                     progress: bool = False) -> torch.Tensor:
    """Sample with a fresh diffusers sampler `name` on `trailing_timesteps` (diffusers-ddim, which takes no
    timesteps: its own trailing spacing); `model_fn` already guided. `samplers.Sampler` is the
    one-scheduler-per-call way the library samples; this is for checking the adapter."""
    scheduler = make_scheduler(name, num_train_steps=num_train_steps, clip_denoised=clip_denoised)
    ddim = name == "diffusers-ddim"
    return sample_with_scheduler(model_fn, scheduler, shape=shape, y=y, steps=steps, noise=noise,
                                 generator=generator, learn_sigma=learn_sigma, progress=progress,
                                 step_kwargs={"use_clipped_model_output": True} if ddim else None,
                                 timesteps=None if ddim else trailing_timesteps(steps, num_train_steps))
