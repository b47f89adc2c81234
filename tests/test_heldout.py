"""Held-out ε-MSE (mapdit.evaluate.heldout): an oracle scores ~0, a zero predictor ~1 (the noise's
variance), the figure does not depend on the batch split, and a run's result is computed once and cached."""
import math

import pytest
import torch

from mapdit.config import make_config
from mapdit.diffusion import make_diffusion
from mapdit.evaluate.heldout import _timesteps, heldout_for_run, heldout_mse
from mapdit.train import TrainConfig, train


class Images:
    """ImageDataset's batch() interface over a fixed tensor."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def batch(self, index):
        return self.x[index], torch.zeros(len(index), dtype=torch.int64)


def test_timesteps_cover_the_chain_evenly():
    t = _timesteps(1000, 1000)
    assert t.tolist() == list(range(1000))
    t = _timesteps(7, 1000)
    assert t.min() >= 0 and t.max() < 1000 and (t.diff() > 0).all()


def test_oracle_scores_zero_and_zero_predictor_scores_noise_variance():
    diffusion = make_diffusion(1000, learn_sigma=False)
    x = torch.zeros(1, 1, 4, 4).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    data = Images(x.expand(64, -1, -1, -1).clone())  # one image: its ε is recoverable exactly from x_t
    abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def oracle(x_t, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x) / (1 - a).sqrt()).float()

    assert heldout_mse(oracle, diffusion, data, num_images=64)["mse"] < 1e-6
    zero = heldout_mse(lambda x_t, t, y: torch.zeros_like(x_t), diffusion, data, num_images=64)
    assert zero["mse"] == pytest.approx(1.0, abs=0.15)  # E|ε|² = 1; 64 x 16 draws
    assert math.isclose(zero["mse"], (zero["mse_low_t"] + zero["mse_high_t"]) / 2, rel_tol=1e-9)


def test_same_figure_for_any_batch_size_and_different_for_another_seed():
    diffusion = make_diffusion(1000, learn_sigma=False)
    data = Images(torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    model = lambda x_t, t, y: 0.5 * x_t  # noqa: E731  an imperfect, deterministic predictor
    a = heldout_mse(model, diffusion, data, num_images=50, batch_size=7)["mse"]
    b = heldout_mse(model, diffusion, data, num_images=50, batch_size=50)["mse"]
    c = heldout_mse(model, diffusion, data, num_images=50, batch_size=50, seed=1)["mse"]
    assert a == pytest.approx(b, rel=1e-6) and c != pytest.approx(a, rel=1e-6)


def test_run_result_is_cached_and_tells_trained_from_untrained(tmp_path):
    torch.manual_seed(0)
    cfg = make_config("DiT-XXS/4", preset="E", input_size=28, in_channels=1, num_classes=10)
    tc = TrainConfig(data_path="fashion-mnist", results_dir=str(tmp_path), num_steps=30, batch_size=16,
                     log_every=10, ema_snapshots=2, ckpt_every=30, seed=0)
    run = train(tc, cfg)
    raw = heldout_for_run(run, weights="raw", num_images=200)
    cached = list((run / "eval").glob("heldout-raw-*.json"))
    assert len(cached) == 1 and heldout_for_run(run, weights="raw", num_images=200) == raw
    # an untrained (zero-initialised output) model predicts ε = 0: error ~1; 30 steps at lr 1e-2 do better
    assert 0.05 < raw["mse"] < 0.9
