"""The diffusers samplers behind `mapdit.schedulers`: configured from our diffusion, they must reproduce our own
DDIM when configured as DDIM, solve a probability-flow ODE whose answer is known, honour guidance and clipping,
and fail with one line when diffusers is missing."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mapdit.config import make_config
from mapdit.diffusion import GaussianDiffusion, linear_betas, respace_betas
from mapdit.errors import UserError
from mapdit.model import DiT
from mapdit.samplers import SAMPLER_CHOICES, classifier_free_guidance, sample, sample_ddim
from mapdit.schedulers import (
    DIFFUSERS_SAMPLERS,
    make_scheduler,
    model_evaluations,
    sample_diffusers,
    sample_with_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


def tiny_model(preset: str, channels: int, scale: float, seed: int = 0) -> DiT:
    """A 4-token DiT-XXS/4 on 8x8 inputs whose weights are all perturbed (zero-initialised layers would
    make eps identically 0, and every sampler would agree trivially)."""
    torch.manual_seed(seed)
    model = DiT(make_config("DiT-XXS/4", preset=preset, input_size=8, in_channels=channels,
                            num_classes=NUM_CLASSES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


class Recorder:
    """Wraps a model_fn and keeps every (x, t, y) it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.fn(x, t, y)


# (preset, channels, weight perturbation, clip): latents (4 channels, never clipped) and pixels (1, clipped)
CASES = {"latents": ("A", 4, 0.05, False), "pixels": ("E", 1, 0.3, True)}


@pytest.mark.parametrize("case, steps", [("latents", 10), ("pixels", 25)])
def test_diffusers_ddim_reproduces_our_ddim_trajectory(case, steps):
    preset, channels, scale, clip = CASES[case]
    model = tiny_model(preset, channels, scale)
    y = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    guided = classifier_free_guidance(model, 2.0, model.config.null_class)

    scheduler = make_scheduler("diffusers-ddim", clip_denoised=clip)
    scheduler.set_timesteps(steps)
    kept = sorted(scheduler.timesteps.tolist())
    assert len(kept) == steps and kept[-1] == 999
    # our DDIM on the same steps: our respacing of our linear schedule, our update rule
    ours_fn = Recorder(guided)
    diffusion = GaussianDiffusion(respace_betas(linear_betas(1000), kept), timestep_map=kept)
    ours = sample_ddim(ours_fn, diffusion, noise.shape, y, noise=noise, clip_denoised=clip)

    theirs_fn = Recorder(guided)
    theirs = sample_diffusers(theirs_fn, "diffusers-ddim", shape=noise.shape, y=y, steps=steps, noise=noise,
                              clip_denoised=clip)
    assert len(ours_fn.calls) == len(theirs_fn.calls) == steps
    for (xa, ta, ya), (xb, tb, yb) in zip(ours_fn.calls, theirs_fn.calls):  # the whole trajectory
        assert torch.equal(ta, tb) and torch.equal(ya, yb)
        tol = 1e-6 * (1 + xa.abs().max().item())
        torch.testing.assert_close(xb, xa, rtol=0, atol=tol)
    tol = 2e-6 * (1 + ours.abs().max().item())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    if clip:
        assert ours.abs().max() <= 1 + 1e-6
    # the comparison is sharp: the variance half instead of eps would be far off
    assert (ours - sample_ddim(lambda x, t, yy: guided(x, t, yy).flip(1), diffusion, noise.shape, y, noise=noise,
                               clip_denoised=clip)).abs().max() > 100 * tol


def test_schedulers_use_the_runs_schedule():
    abar = torch.from_numpy(GaussianDiffusion(linear_betas(1000)).alphas_cumprod)
    for name in (*DIFFUSERS_SAMPLERS, "diffusers-ddim"):
        scheduler = make_scheduler(name)
        torch.testing.assert_close(scheduler.alphas_cumprod.double(), abar, rtol=1e-5, atol=0)
        scheduler.set_timesteps(10)
        t = scheduler.timesteps
        assert t.max() == 999 and t.min() >= 0 and torch.equal(t, t.round()), (name, t)
    with pytest.raises(UserError, match="unknown"):
        make_scheduler("lms")


def gaussian_eps_fn(mu: float, s: float):
    """The exact eps-prediction for data ~ N(mu, s^2) per pixel, returned as a learned-sigma output
    (eps, v) with a v half of garbage that a sampler must not use."""
    abar = torch.from_numpy(GaussianDiffusion(linear_betas(1000)).alphas_cumprod).float()

    def fn(x, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, torch.full_like(x, 7.0)], dim=1)

    return fn, abar


@pytest.mark.parametrize("name", [*DIFFUSERS_SAMPLERS, "ddim"])
def test_samplers_solve_the_gaussian_flow(name):
    """With the exact eps of a Gaussian, the probability-flow ODE maps x_T to mu + s (x_T - sqrt(abar_T) mu)
    / sqrt(abar_T s^2 + 1 - abar_T). The solvers must converge to it at their order (measured max errors at
    25 -> 50 steps: dpm++2m 0.037 -> 0.002, unipc 0.037 -> 0.004, heun 0.046 -> 0.015, our ddim 0.19 -> 0.10);
    a wrong schedule, input scaling, timestep or output half gives errors of order 0.1-1 that do not shrink."""
    mu, s = 0.3, 0.5
    fn, abar = gaussian_eps_fn(mu, s)
    noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a_T = abar[999]
    expected = mu + s * (noise - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    errors = {}
    for steps in (25, 50):
        x0 = sample(fn, shape=noise.shape, y=torch.zeros(8, dtype=torch.long), sampler=name, steps=steps, noise=noise)
        errors[steps] = (x0 - expected).abs().max().item()
    first_order = name == "ddim"
    assert errors[50] < (0.15 if first_order else 0.02), (name, errors)
    assert errors[50] < errors[25] / (1.6 if first_order else 2.5), (name, errors)


@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
@pytest.mark.parametrize("case", list(CASES))
def test_new_samplers_run_with_guidance(name, case):
    preset, channels, scale, clip = CASES[case]
    model = tiny_model(preset, channels, scale)
    null = model.config.null_class
    y = torch.tensor([0, 2, 1])
    noise = torch.randn(3, channels, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = Recorder(model)
    steps = 5
    guide = 3 if channels == 4 else None  # latents: the original DiT's 3 of 4 channels
    x = sample(calls, shape=noise.shape, y=y, sampler=name, steps=steps, noise=noise, cfg_scale=2.0,
               null_class=null, guide_channels=guide, clip_denoised=clip)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    # one batched call per model evaluation: cond and uncond halves together
    assert len(calls.calls) == model_evaluations(name, steps)
    for xin, t, labels in calls.calls:
        assert xin.shape[0] == 6 and torch.equal(xin[:3], xin[3:])
        assert labels[:3].tolist() == y.tolist() and labels[3:].tolist() == [null] * 3
        assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    assert int(calls.calls[0][1][0]) == 999
    if clip:
        assert x.abs().max() <= 1 + 1e-5  # the last x0 estimate is clipped
    # guidance and the guided channels change the result; the same noise gives the same samples
    unguided = sample(model, shape=noise.shape, y=y, sampler=name, steps=steps, noise=noise, clip_denoised=clip)
    assert (unguided - x).abs().max() > 1e-3
    again = sample(model, shape=noise.shape, y=y, sampler=name, steps=steps, noise=noise, cfg_scale=2.0,
                   null_class=null, guide_channels=guide, clip_denoised=clip)
    assert torch.equal(again, x)
    if guide is not None:
        all_channels = sample(model, shape=noise.shape, y=y, sampler=name, steps=steps, noise=noise, cfg_scale=2.0,
                              null_class=null, clip_denoised=clip)
        assert (all_channels - x)[:, 3].abs().max() > 1e-4


def test_sample_with_scheduler_rejects_fractional_timesteps():
    heun = make_scheduler("heun")
    scheduler = type(heun).from_config(heun.config, timestep_spacing="linspace")  # diffusers' default: fractional
    fn, _ = gaussian_eps_fn(0.0, 1.0)
    with pytest.raises(ValueError, match="fractional"):
        sample_with_scheduler(fn, scheduler, shape=(1, 1, 2, 2), y=torch.zeros(1, dtype=torch.long), steps=7)


def test_cli_choices_list_the_new_samplers():
    assert set(DIFFUSERS_SAMPLERS) <= set(SAMPLER_CHOICES) and {"ddpm", "ddim"} <= set(SAMPLER_CHOICES)


def test_missing_diffusers_gives_one_line_and_exit_2(tmp_path):
    """diffusers made unimportable (None in sys.modules) in a fresh interpreter: `mapdit sample` and
    `mapdit fid` with a diffusers sampler end with one line and exit 2 before touching the run; our own
    samplers keep working there."""
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from mapdit.cli import main\n"
            "rc = main([sys.argv[1], '--result-dir', sys.argv[2], '--sampler', 'dpm++2m'])\n"
            "import torch; from mapdit.samplers import sample\n"
            "x = sample(lambda x, t, y: torch.cat([x, x], 1), shape=(1, 1, 2, 2), y=torch.zeros(1).long(),"
            " sampler='ddim', steps=3)\n"
            "print('ddim ok', tuple(x.shape)); sys.exit(rc)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    run = tmp_path / "run"  # passes the command line's run-folder check; its config is never read
    run.mkdir()
    (run / "config.json").write_text("{}")
    for which in ("sample", "fid"):
        done = subprocess.run([sys.executable, "-c", code, which, str(run)], capture_output=True,
                              text=True, env=env, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and "diffusers" in lines[0] and "pip install" in lines[0], lines
        assert lines[0].startswith(f"mapdit {which}: error:")
        assert "ddim ok (1, 1, 2, 2)" in done.stdout


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(UserError, match="valid names"):
        sample(lambda x, t, y: x, shape=(1, 1, 2, 2), y=torch.zeros(1, dtype=torch.long), sampler="lms", steps=3)
    assert np.isfinite(model_evaluations("heun", 10)) and model_evaluations("heun", 10) == 19
