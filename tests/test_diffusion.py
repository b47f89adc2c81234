"""Tests for mapdit.diffusion and mapdit.samplers. Closed forms are recomputed here independently."""

import math

import numpy as np
import pytest
import torch

from mapdit.diffusion import (
    linear_betas,
    make_diffusion,
    space_timesteps,
)
from mapdit.errors import UserError
from mapdit.samplers import classifier_free_guidance, sample, sample_ddim, sample_ddpm

N, C, H, W = 4, 2, 4, 4


def reference_alphas_cumprod(num_steps=1000):
    """abar_t = prod_{s<=t} (1 - beta_s), straight from the linear schedule definition."""
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    return betas, np.cumprod(1.0 - betas)


def normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ----------------------------------------------------------------------------- schedule


def test_linear_betas_endpoints_and_dtype():
    betas = linear_betas()
    ref_betas, _ = reference_alphas_cumprod()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas, ref_betas, rtol=0, atol=1e-15)


def test_q_mean_variance_matches_closed_form():
    torch.manual_seed(0)
    diffusion = make_diffusion()
    _, abar = reference_alphas_cumprod()
    x0 = torch.randn(N, C, H, W)
    t = torch.tensor([0, 10, 500, 999])
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    abar_t = torch.tensor(abar[t.numpy()]).view(-1, 1, 1, 1)  # float64
    torch.testing.assert_close(mean.double(), abar_t.sqrt() * x0.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(variance.double(), (1 - abar_t).expand_as(x0), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_variance.double(), torch.log(1 - abar_t).expand_as(x0), rtol=1e-6, atol=1e-6)


def test_q_sample_empirical_moments():
    gen = torch.Generator().manual_seed(1)
    diffusion = make_diffusion()
    _, abar = reference_alphas_cumprod()
    x0_single = torch.randn(1, C, H, W, generator=gen)
    draws = 4000
    for step in (50, 400, 900):
        x0 = x0_single.expand(draws, C, H, W)
        t = torch.full((draws,), step)
        noise = torch.randn(draws, C, H, W, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        torch.testing.assert_close(x_t.mean(0), math.sqrt(abar[step]) * x0_single[0], rtol=0, atol=0.06)
        torch.testing.assert_close(
            x_t.var(0), torch.full((C, H, W), 1 - abar[step], dtype=torch.float32), rtol=0.12, atol=0.0
        )


def test_posterior_matches_bayes_product_of_gaussians():
    torch.manual_seed(2)
    diffusion = make_diffusion()
    betas, abar = reference_alphas_cumprod()
    x0 = torch.randn(N, C, H, W, dtype=torch.float64)
    x_t = torch.randn(N, C, H, W, dtype=torch.float64)
    t = torch.tensor([1, 2, 300, 999])
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0.float(), x_t.float(), t)
    # q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})
    b = torch.tensor(betas[t.numpy()]).view(-1, 1, 1, 1)
    a_prev = torch.tensor(abar[t.numpy() - 1]).view(-1, 1, 1, 1)
    precision = (1 - b) / b + 1 / (1 - a_prev)
    ref_var = 1 / precision
    ref_mean = ref_var * ((1 - b).sqrt() * x_t / b + a_prev.sqrt() * x0 / (1 - a_prev))
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance.double(), ref_var.expand_as(x0), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_variance.double(), ref_var.log().expand_as(x0), rtol=1e-5, atol=1e-5)


def test_posterior_at_step_zero_is_x0_with_clipped_log_variance():
    diffusion = make_diffusion()
    betas, abar = reference_alphas_cumprod()
    x0, x_t = torch.randn(1, C, H, W), torch.randn(1, C, H, W)
    t = torch.zeros(1, dtype=torch.int64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, x0, rtol=1e-6, atol=1e-6)
    assert torch.all(variance == 0)
    beta_tilde_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    torch.testing.assert_close(log_variance, torch.full_like(x0, math.log(beta_tilde_1)), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_even_stride():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and len(set(kept)) == 250
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}  # stride 999/249 ≈ 4.01 rounds to 4 or 5
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(10, 4) == [0, 3, 6, 9]
    for count in (2, 7, 33, 999):
        steps = space_timesteps(1000, count)
        assert len(set(steps)) == count and steps[0] == 0 and steps[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)
    with pytest.raises(ValueError):
        space_timesteps(1000, 1001)


@pytest.mark.parametrize("count", [250, 37, 1])
def test_respacing_preserves_alphas_cumprod_and_maps_timesteps(count):
    full = make_diffusion()
    spaced = make_diffusion(1000, sampling_steps=count)
    kept = space_timesteps(1000, count)
    assert spaced.num_timesteps == count
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=0, atol=1e-12)
    assert spaced.timestep_map.dtype == torch.int64
    assert spaced.timestep_map.tolist() == kept


def test_training_losses_calls_model_with_original_steps():
    spaced = make_diffusion(1000, sampling_steps=10)
    seen = []

    def spy_model(x, t, y):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    t = torch.tensor([0, 3, 7, 9])
    spaced.training_losses(spy_model, torch.randn(N, C, H, W), t, torch.zeros(N, dtype=torch.int64))
    assert seen[0].dtype == torch.int64
    assert seen[0].tolist() == [space_timesteps(1000, 10)[i] for i in t.tolist()]


# ----------------------------------------------------------------------------- training losses


def test_training_losses_shapes_and_stopped_mean_gradient():
    torch.manual_seed(3)
    diffusion = make_diffusion()
    out = torch.randn(N, 2 * C, H, W, requires_grad=True)
    t = torch.tensor([0, 1, 500, 999])
    losses = diffusion.training_losses(lambda x, tt, y: out * 1.0, torch.rand(N, C, H, W) * 2 - 1, t,
                                       torch.zeros(N, dtype=torch.int64))
    for key in ("loss", "mse", "vb"):
        assert losses[key].shape == (N,)
        assert torch.isfinite(losses[key]).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    (vb_grad,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.all(vb_grad[:, :C] == 0), "vb must not train the eps half"
    assert torch.all(vb_grad[:, C:].abs().sum(dim=(1, 2, 3)) > 0), "vb must train the variance half at every t"
    (mse_grad,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.all(mse_grad[:, C:] == 0) and torch.all(mse_grad[:, :C].abs().sum(dim=(1, 2, 3)) > 0)


def test_min_snr_weights_match_closed_form_and_only_reweight_the_mse():
    """Min-SNR-gamma (eps-prediction): w_t = min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t)."""
    torch.manual_seed(7)
    diffusion = make_diffusion()
    _, abar = reference_alphas_cumprod()
    t = torch.tensor([0, 40, 200, 999])
    snr = abar[t.numpy()] / (1 - abar[t.numpy()])
    expected = np.minimum(snr, 5.0) / snr
    weights = diffusion.min_snr_weights(t, 5.0)
    torch.testing.assert_close(weights.double(), torch.from_numpy(expected), rtol=1e-6, atol=0)
    assert weights[0] < 1e-3 and weights[-1] == 1  # low noise is down-weighted, high noise untouched

    out = torch.randn(N, 2 * C, H, W)
    x0, noise, y = torch.randn(N, C, H, W), torch.randn(N, C, H, W), torch.zeros(N, dtype=torch.int64)
    plain = diffusion.training_losses(lambda x, tt, yy: out, x0, t, y, noise=noise)
    weighted = diffusion.training_losses(lambda x, tt, yy: out, x0, t, y, noise=noise, min_snr_gamma=5.0)
    assert torch.equal(weighted["mse"], plain["mse"]) and torch.equal(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], weights * plain["mse"] + plain["vb"])


def test_vb_kl_term_matches_closed_form():
    """With eps = the true noise the model mean is the posterior mean, so KL reduces to a variance mismatch."""
    torch.manual_seed(4)
    diffusion = make_diffusion()
    betas, abar = reference_alphas_cumprod()
    x0, noise = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    t = torch.tensor([1, 20, 400, 999])
    v_values = torch.tensor([-1.0, -0.3, 0.5, 1.0])

    def model(x, tt, y):
        v = v_values.view(-1, 1, 1, 1).expand(N, C, H, W)
        return torch.cat([noise, v], dim=1)

    losses = diffusion.training_losses(model, x0, t, torch.zeros(N, dtype=torch.int64), noise=noise)
    ts = t.numpy()
    beta_tilde = betas[ts] * (1 - abar[ts - 1]) / (1 - abar[ts])
    frac = (v_values.double().numpy() + 1) / 2
    model_var = np.exp(frac * np.log(betas[ts]) + (1 - frac) * np.log(beta_tilde))
    ref_kl_bits = 0.5 * (np.log(model_var / beta_tilde) + beta_tilde / model_var - 1) / math.log(2)
    torch.testing.assert_close(losses["vb"].double(), torch.from_numpy(ref_kl_bits), rtol=2e-3, atol=2e-4)
    assert losses["mse"].abs().max() < 1e-10
    assert losses["vb"][0].abs() < 2e-4  # v = -1 reproduces the posterior variance exactly


def test_vb_decoder_nll_at_step_zero_matches_direct_computation():
    torch.manual_seed(5)
    diffusion = make_diffusion()
    _, abar = reference_alphas_cumprod()
    # 8-bit grid values including both edges, so all three branches are used.
    pixels = torch.randint(0, 256, (N, C, H, W))
    pixels[0, 0, 0, 0], pixels[0, 0, 0, 1] = 0, 255
    x0 = pixels.float() / 127.5 - 1
    noise = torch.randn(N, C, H, W)
    eps_model = noise + 0.3 * torch.randn(N, C, H, W)  # imperfect eps so the mean is off the bin centre
    v = torch.full((N, C, H, W), 0.2)
    t = torch.zeros(N, dtype=torch.int64)
    losses = diffusion.training_losses(lambda x, tt, y: torch.cat([eps_model, v], 1), x0, t,
                                       torch.zeros(N, dtype=torch.int64), noise=noise)

    x_t = math.sqrt(abar[0]) * x0.double() + math.sqrt(1 - abar[0]) * noise.double()
    mean = (x_t - math.sqrt(1 - abar[0]) * eps_model.double()) / math.sqrt(abar[0])  # posterior mean at t=0 is x0_hat
    log_var = 0.6 * math.log(linear_betas()[0]) + 0.4 * math.log(
        linear_betas()[1] * (1 - abar[0]) / (1 - abar[1])
    )
    std = math.exp(0.5 * log_var)
    nll = np.zeros(N)
    for i in range(N):
        total = 0.0
        for xv, mv in zip(x0[i].flatten().tolist(), mean[i].flatten().tolist()):
            hi = normal_cdf((xv - mv + 1 / 255) / std) if xv < 0.999 else 1.0
            lo = normal_cdf((xv - mv - 1 / 255) / std) if xv > -0.999 else 0.0
            total += -math.log(max(hi - lo, 1e-12))
        nll[i] = total / (C * H * W) / math.log(2)
    torch.testing.assert_close(losses["vb"].double(), torch.from_numpy(nll), rtol=1e-3, atol=1e-3)


def test_fixed_variance_loss_is_mse():
    torch.manual_seed(6)
    diffusion = make_diffusion(learn_sigma=False)
    weight = torch.randn(C, C)
    model = lambda x, t, y: torch.einsum("dc,nchw->ndhw", weight, x)  # noqa: E731
    losses = diffusion.training_losses(model, torch.randn(N, C, H, W), torch.tensor([0, 5, 50, 999]),
                                       torch.zeros(N, dtype=torch.int64))
    assert torch.equal(losses["loss"], losses["mse"])
    assert torch.all(losses["vb"] == 0) and torch.all(losses["mse"] > 0)


def test_wrong_output_channels_raise():
    diffusion = make_diffusion()
    with pytest.raises(ValueError, match="channels"):
        diffusion.training_losses(lambda x, t, y: x, torch.randn(N, C, H, W), torch.zeros(N, dtype=torch.int64),
                                  torch.zeros(N, dtype=torch.int64))


# ----------------------------------------------------------------------------- samplers


def oracle_point_mass(x_star, learn_sigma=True):
    """True eps for data concentrated at x_star: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar), t original."""
    _, abar = reference_alphas_cumprod()
    abar_t = torch.tensor(abar, dtype=torch.float32)

    def model(x, t, y):
        a = abar_t[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


def oracle_gaussian(mu, sd):
    """True E[eps | x_t] for data x0 ~ N(mu, sd^2) per element (learned variance head v = 0)."""
    _, abar = reference_alphas_cumprod()
    abar_t = torch.tensor(abar, dtype=torch.float32)

    def model(x, t, y):
        a = abar_t[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sd**2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    return model


def toy_model(x, t, y):
    """Deterministic nonlinear stand-in with the (N, 2C, H, W) output convention."""
    scale = (t.float() / 1000).view(-1, 1, 1, 1)
    eps = torch.tanh(x) * (1 + scale) + 0.1 * y.float().view(-1, 1, 1, 1)
    return torch.cat([eps, torch.tanh(x + scale)], 1)


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    diffusion = make_diffusion(1000, sampling_steps=10)
    y = torch.arange(N)
    noise = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(7))
    shape = (N, C, H, W)
    a = sample_ddim(toy_model, diffusion, shape, y, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(toy_model, diffusion, shape, y, eta=0.0, noise=noise.clone(),
                    generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    # eta > 0 does consume the generator, so different generators now give different samples.
    c = sample_ddim(toy_model, diffusion, shape, y, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(1))
    d = sample_ddim(toy_model, diffusion, shape, y, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)


def test_ddpm_same_generator_same_sample():
    diffusion = make_diffusion(1000, sampling_steps=10)
    y = torch.arange(N)
    a = sample_ddpm(toy_model, diffusion, (N, C, H, W), y, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(toy_model, diffusion, (N, C, H, W), y, generator=torch.Generator().manual_seed(3))
    c = sample_ddpm(toy_model, diffusion, (N, C, H, W), y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ancestral", "ddim"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_oracle_point_mass_is_recovered(sampler, learn_sigma):
    x_star = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(8))
    out = sample(
        oracle_point_mass(x_star, learn_sigma), shape=(N, C, H, W), y=torch.zeros(N, dtype=torch.int64),
        sampler=sampler, steps=20, generator=torch.Generator().manual_seed(9), learn_sigma=learn_sigma,
    )
    torch.testing.assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-3)


def predicted_output_std(sampler, eta, steps, sd):
    """Exact std of the sampler output for Gaussian data with the oracle eps (v = 0), by a float64 recursion.

    With u_t = x_t - sqrt(abar_t) mu every update is linear: u_prev = gain * u_t + sigma * z, starting from
    Var(u_T) = 1. Per step (abar, abar_prev), x0_hat = mu + g u_t and eps_hat = h u_t with
    g = sqrt(abar) sd^2 / s_t^2, h = sqrt(1 - abar) / s_t^2, s_t^2 = abar sd^2 + 1 - abar.
    """
    _, abar_full = reference_alphas_cumprod()
    abar_kept = abar_full[space_timesteps(1000, steps)]
    variance = 1.0
    for i in range(steps - 1, -1, -1):
        abar, abar_prev = abar_kept[i], (abar_kept[i - 1] if i > 0 else 1.0)
        beta = 1 - abar / abar_prev
        spread = abar * sd**2 + 1 - abar
        g, h = math.sqrt(abar) * sd**2 / spread, math.sqrt(1 - abar) / spread
        if sampler == "ddpm":
            beta_tilde = beta * (1 - abar_prev) / (1 - abar)
            coef_x0 = beta * math.sqrt(abar_prev) / (1 - abar)
            coef_xt = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
            gain = coef_x0 * g + coef_xt
            noise_var = 0.0 if i == 0 else math.sqrt(beta * beta_tilde)  # v = 0: geometric mean of the two
        else:
            noise_var = eta**2 * (1 - abar_prev) / (1 - abar) * beta
            gain = math.sqrt(abar_prev) * g + math.sqrt(1 - abar_prev - noise_var) * h
        variance = gain**2 * variance + noise_var
    return math.sqrt(variance)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_oracle_gaussian_data_distribution_is_recovered(sampler, eta):
    """Whole-chain check: with the exact eps of Gaussian data the samples have the data's mean and the
    spread predicted by an independent closed-form recursion (close to, but below, the data's sd at 20 steps)."""
    mu = torch.linspace(-1.5, 1.5, C * H * W).view(1, C, H, W)
    sd, steps, draws = 0.5, 20, 2000
    out = sample(
        oracle_gaussian(mu, sd), shape=(draws, C, H, W), y=torch.zeros(draws, dtype=torch.int64),
        sampler=sampler, steps=steps, eta=eta, generator=torch.Generator().manual_seed(10),
    )
    torch.testing.assert_close(out.mean(0), mu[0], rtol=0, atol=0.05)
    expected_std = predicted_output_std(sampler, eta, steps, sd)
    assert 0.7 * sd < expected_std < sd
    torch.testing.assert_close(out.std(0).mean().double(), torch.tensor(expected_std, dtype=torch.float64),
                               rtol=0.02, atol=0)


# ----------------------------------------------------------------------------- guidance


def label_linear_model(learn_sigma=True):
    """eps_c = x * w + y * b per channel (linear in y); variance head also depends on y."""
    w = torch.tensor([1.0, -2.0]).view(1, C, 1, 1)
    b = torch.tensor([0.5, 0.25]).view(1, C, 1, 1)
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        yy = y.float().view(-1, 1, 1, 1)
        eps = x * w + yy * b
        return torch.cat([eps, -0.1 * yy * torch.ones_like(x)], 1) if learn_sigma else eps

    return model, calls


def test_cfg_scale_one_is_identity():
    model, _ = label_linear_model()
    assert classifier_free_guidance(model, 1.0, null_class=5) is model


@pytest.mark.parametrize("guide_channels", [None, 1])
def test_cfg_combines_conditional_and_unconditional(guide_channels):
    model, calls = label_linear_model()
    null, s = 7, 4.0
    x = torch.randn(N, C, H, W)
    t = torch.full((N,), 10)
    y = torch.tensor([0, 1, 2, 3])
    guided = classifier_free_guidance(model, s, null_class=null, guide_channels=guide_channels)(x, t, y)
    assert calls == [2 * N]
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, null))
    expected_eps = uncond[:, :C] + s * (cond[:, :C] - uncond[:, :C])
    k = C if guide_channels is None else guide_channels
    assert guided.shape == (N, 2 * C, H, W)
    torch.testing.assert_close(guided[:, :k], expected_eps[:, :k])
    torch.testing.assert_close(guided[:, k:C], cond[:, k:C])
    torch.testing.assert_close(guided[:, C:], cond[:, C:])  # variance from the conditional branch
    assert not torch.allclose(guided[:, :k], cond[:, :k])


def test_cfg_without_learned_sigma():
    model, _ = label_linear_model(learn_sigma=False)
    x, t, y = torch.randn(N, C, H, W), torch.full((N,), 3), torch.arange(N)
    guided = classifier_free_guidance(model, 2.5, null_class=9)(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 9))
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond))


def test_sample_with_cfg_runs_and_validates_arguments():
    model, calls = label_linear_model()
    out = sample(model, shape=(N, C, H, W), y=torch.arange(N), steps=5, cfg_scale=3.0, null_class=10,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (N, C, H, W) and torch.isfinite(out).all() and set(calls) == {2 * N}
    with pytest.raises(UserError, match="ddim"):
        sample(model, shape=(N, C, H, W), y=torch.arange(N), sampler="euler")
    with pytest.raises(UserError, match="null_class"):
        sample(model, shape=(N, C, H, W), y=torch.arange(N), cfg_scale=2.0)
    with pytest.raises(UserError):
        sample(model, shape=(N, C, H, W), y=torch.arange(N), steps=0)
