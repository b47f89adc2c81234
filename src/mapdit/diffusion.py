"""Gaussian diffusion as used by DiT (IDDPM-style): linear betas, epsilon prediction,
learned-range variance, hybrid loss (MSE + variational bound), timestep respacing.

Conventions used throughout:
  * schedules are float64 numpy arrays indexed by this diffusion's step index t in [0, T);
  * `model_fn(x, t, y) -> out` receives the ORIGINAL (un-respaced) int64 step index,
    obtained with `GaussianDiffusion.map_timesteps(t)`;
  * `out` is (N, 2C, H, W) when learn_sigma (eps then v), else (N, C, H, W).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Half-width of one 8-bit bin when pixel values 0..255 are mapped onto [-1, 1].
_HALF_BIN = 1.0 / 255.0


# ----------------------------------------------------------------------------- schedules


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear beta schedule in float64, exactly np.linspace(beta_start, beta_end, num_steps).

    Not rescaled by 1000/num_steps: the endpoints are taken as given (DiT always uses T=1000,
    where IDDPM's rescaling is the identity).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` evenly spread step indices of a `num_timesteps` schedule, first 0 and last T-1.

    Even striding: take round(k * stride) for k = 0..count-1 with stride = (T-1)/(count-1),
    accumulating the fractional stride the way IDDPM does so the picked indices match it.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"count must be in 1..{num_timesteps}, got {count}")
    if count == num_timesteps:
        return list(range(num_timesteps))
    if count == 1:
        return [0]
    stride = (num_timesteps - 1) / (count - 1)
    picked, position = [], 0.0
    for _ in range(count):
        picked.append(round(position))
        position += stride
    return picked


def respace_betas(betas: np.ndarray, kept_steps: Sequence[int]) -> np.ndarray:
    """Betas of a shorter chain whose cumulative alphas equal the original ones at `kept_steps`.

    beta_i = 1 - abar[k_i] / abar[k_{i-1}] (with abar[k_{-1}] = 1), so cumprod(1 - beta) telescopes
    back to abar[k_i].
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    kept_abar = alphas_cumprod[np.asarray(kept_steps, dtype=np.int64)]
    previous_abar = np.concatenate([[1.0], kept_abar[:-1]])
    return 1.0 - kept_abar / previous_abar


# ----------------------------------------------------------------------------- pure helpers


def mean_over_nonbatch(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): mean over every dim except the batch dim."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian discretised into
    bins of width 2/255; the two edge bins extend to +-infinity.

    Uses the exact normal CDF (log_ndtr in the edge bins for accuracy) rather than IDDPM's tanh
    approximation. log_scale is the log standard deviation.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + _HALF_BIN)
    lower = inv_std * (x - mean - _HALF_BIN)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < x + half bin): lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > x - half bin): highest bin
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(bin_mass))
    )


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with epsilon prediction and optional learned variance.

    Arrays (float64 numpy, length T): betas, alphas_cumprod, alphas_cumprod_prev, posterior_variance,
    posterior_log_variance_clipped, ... . `timestep_map[t]` is the original step index the model sees.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.learn_sigma = bool(learn_sigma)
        self.num_timesteps = len(betas)
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = torch.as_tensor(list(timestep_map), dtype=torch.int64)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map needs {self.num_timesteps} entries, got {len(self.timestep_map)}")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])

        # q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod  # in float64: 1 - abar_0 ~ 1e-4
        self.snr = self.alphas_cumprod / self.one_minus_alphas_cumprod  # signal-to-noise ratio of step t
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        # x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta_tilde)
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_abar
        # beta_tilde_0 = 0; its log is replaced by log beta_tilde_1 (or log beta_0 for a 1-step chain).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[first], self.posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef_xt = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar
        self.log_betas = np.log(betas)

        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- coefficient gathering ------------------------------------------------

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """float32 copy of a float64 schedule array on `device`, cached so training never re-uploads."""
        key = (name, torch.device(device))
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name).astype(np.float32)).to(device)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather array[t] (N,) and broadcast it to like's shape (N, C, H, W) as a float32 view."""
        values = self._table(name, like.device)[t.to(like.device)]
        return values.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape)

    def map_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Step indices of this chain (N,) -> original int64 indices the model is conditioned on."""
        key = ("timestep_map", torch.device(t.device))
        table = self._device_tables.get(key)
        if table is None:
            table = self.timestep_map.to(t.device)
            self._device_tables[key] = table
        return table[t]

    # -- forward process -------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Moments of q(x_t | x_0); each output has x0's shape."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self._extract("one_minus_alphas_cumprod", t, x0)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given standard normal noise (fresh noise if None)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0 + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Moments of the true posterior q(x_{t-1} | x_t, x_0); log-variance clipped at t == 0."""
        mean = self._extract("posterior_mean_coef_x0", t, x_t) * x0 + self._extract(
            "posterior_mean_coef_xt", t, x_t
        ) * x_t
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # -- reverse process -------------------------------------------------------

    def split_model_output(self, model_out: torch.Tensor, x_t: torch.Tensor):
        """(N, 2C or C, H, W) -> (eps (N, C, H, W), v (N, C, H, W) or None)."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_out.shape[1] != expected:
            raise ValueError(
                f"model output has {model_out.shape[1]} channels, expected {expected} "
                f"({'eps + variance' if self.learn_sigma else 'eps'} for {channels}-channel input)"
            )
        if self.learn_sigma:
            return model_out[:, :channels], model_out[:, channels:]
        return model_out, None

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, xstart: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> dict:
        """Moments of p(x_{t-1} | x_t) from a model output; t indexes THIS (possibly respaced) chain.

        Learned range: log var = frac * log beta_t + (1 - frac) * log beta_tilde_t, frac = (v + 1) / 2.
        Without learned sigma the variance is fixed to the (clipped) posterior variance ("fixed small").
        """
        model_out = model_out.float()
        eps, v = self.split_model_output(model_out, x_t)
        if v is None:
            log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        else:
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # -- training --------------------------------------------------------------

    def vb_terms_bits(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        """(N,) variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t)
        kl = mean_over_nonbatch(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_over_nonbatch(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights for eps-prediction (Hang et al. 2023, eq. 8): min(SNR_t, gamma) / SNR_t,
        SNR_t = abar_t / (1 - abar_t). 1 where SNR_t <= gamma (high noise); gamma / SNR_t below the noise
        levels where the eps target is nearly free (low t). (N,) float32."""
        snr = self._table("snr", t.device)[t]  # computed in float64, cached on the device
        return snr.clamp(max=gamma) / snr

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor | None = None, min_snr_gamma: float | None = None) -> dict:
        """Hybrid loss per sample: loss = w_t * mse(eps) + vb (vb only when learn_sigma).

        w_t = 1 (DiT), or the min-SNR-gamma weight when `min_snr_gamma` is given; "mse" is reported unweighted.
        The vb term sees the eps half detached ("stopped mean"), so it only trains the variance.
        No IDDPM num_timesteps/1000 rescaling (as in DiT). Returns dict of (N,) tensors.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_out = model_fn(x_t, self.map_timesteps(t), y).float()
        eps, v = self.split_model_output(model_out, x_t)
        mse = mean_over_nonbatch((noise.float() - eps) ** 2)
        weighted = mse if min_snr_gamma is None else mse * self.min_snr_weights(t, min_snr_gamma)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen_out = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bits(frozen_out, x0.float(), x_t.float(), t)
        return {"loss": weighted + vb, "mse": mse, "vb": vb}


def make_diffusion(num_steps: int = 1000, sampling_steps: int | None = None,
                   learn_sigma: bool = True) -> GaussianDiffusion:
    """DiT diffusion: linear betas over `num_steps`; respaced to `sampling_steps` evenly strided steps if given."""
    betas = linear_betas(num_steps)
    if sampling_steps is None:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(num_steps, sampling_steps)
    return GaussianDiffusion(respace_betas(betas, kept), learn_sigma=learn_sigma, timestep_map=kept)
