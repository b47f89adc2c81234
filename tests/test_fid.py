"""Tests for mapdit.evaluate: Fréchet distance, streaming statistics, extractors, reference caching,
ADM reference batches, and the shipped Fashion-MNIST classifier."""

import argparse
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import needs_installed_fmnist as needs_fmnist
from mapdit.errors import UserError
from mapdit.evaluate import fid
from mapdit.evaluate.fid import (
    FeatureStats,
    ModuleFeatures,
    compute_stats,
    evaluate_samples,
    frechet_distance,
    get_extractor,
    reference_stats,
)

# "fashion-mnist" must resolve to the installed copy regardless of the caller's environment
pytestmark = pytest.mark.usefixtures("no_fmnist_override")


def _random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


class Counting(nn.Module):
    """A small random conv net standing in for Inception; counts its forward calls."""

    def __init__(self, dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, dim, 3, stride=2),
                                 nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


def _smooth_images(n, size=16, seed=0):
    """uint8 (n, size, size, 3): random low-frequency images (a stand-in for natural images)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _add_noise(images, sigma, seed=1):
    """Gaussian noise of std sigma in [-1, 1] units, re-quantised to uint8."""
    g = torch.Generator().manual_seed(seed)
    x = images.to(torch.float32) / 127.5 - 1 + sigma * torch.randn(images.shape, generator=g)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ frechet_distance
def test_frechet_distance_commuting_closed_form():
    rng = np.random.default_rng(0)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # the same in a rotated (shared) eigenbasis: still commuting, no longer diagonal
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # torch inputs give the same value
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2)) \
        == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d, 5.0), _random_spd(rng, d, 8.0)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1  # genuinely non-commuting
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_ill_conditioned_512():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    n, d = 100, 512  # far fewer samples than dimensions: singular covariances
    x1 = rng.standard_normal((n, d)) * np.geomspace(1e-3, 10, d)
    x2 = 0.7 * x1 + 0.5 * rng.standard_normal((n, d)) * np.geomspace(10, 1e-3, d)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    # the naive route: a general matrix square root of the singular product has complex parts
    naive = scipy_linalg.sqrtm(s1 @ s2)
    assert np.iscomplexobj(naive) and np.abs(naive.imag).max() > 0
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value >= 0
    # exact reference: eig(S1 S2) are the squared singular values of Xc1 Xc2^T / (n - 1)
    xc1, xc2 = x1 - mu1, x2 - mu2
    tr_sqrt = np.linalg.svd(xc1 @ xc2.T / (n - 1), compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert value == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1 * np.nan, mu2, s2)


# ------------------------------------------------------------------------------------ FeatureStats
def test_feature_stats_streaming_merge_and_file(tmp_path):
    rng = np.random.default_rng(3)
    feats = 1000.0 + rng.standard_normal((997, 12)) @ rng.standard_normal((12, 12))  # large mean
    a, b = FeatureStats(), FeatureStats()
    for chunk in np.array_split(feats[:400], 7):
        a.update(torch.from_numpy(chunk))
    for chunk in np.array_split(feats[400:], 3):
        b.update(chunk)
    a.merge(b).merge(FeatureStats())
    assert a.count == 997
    np.testing.assert_allclose(a.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    a.info["note"] = "x"
    b2 = FeatureStats.load(a.save(tmp_path / "s.safetensors"))
    assert b2.count == 997 and b2.info["note"] == "x"
    np.testing.assert_array_equal(b2.covariance, a.covariance)
    assert a.all_reduce() is a  # no process group: a no-op
    with pytest.raises(ValueError):
        a.update(np.zeros((3, 5)))


# ------------------------------------------------------------------------------------ FD behaviour
def test_self_distance_zero_and_grows_with_noise(tmp_path):
    clean = _smooth_images(800)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=clean.numpy())
    ext = ModuleFeatures(Counting(), "standin")
    same = evaluate_samples(clean, None, ref, ext, tmp_path / "cache")
    assert same["metric"] == "fd_standin" and same["num_samples"] == 800
    scale = float(np.trace(compute_stats(clean, ext).covariance))
    assert same["fd_standin"] < 1e-9 * scale
    values = [evaluate_samples(_add_noise(clean, s), None, ref, ext, tmp_path / "cache")["fd_standin"]
              for s in (0.05, 0.1, 0.2, 0.4)]
    assert values[0] > 1e-6 * scale
    assert all(x < y for x, y in zip(values, values[1:])), values


def test_reference_stats_cache(tmp_path):
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(4)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    net = Counting()
    ext = ModuleFeatures(net, "standin")
    s1 = reference_stats(folder, ext, tmp_path / "cache", batch_size=5)
    calls = net.calls
    assert calls == 3 and s1.count == 12 and s1.info["cached"] is False
    s2 = reference_stats(folder, ext, tmp_path / "cache", batch_size=5)
    assert net.calls == calls and s2.info["cached"] is True
    np.testing.assert_array_equal(s1.covariance, s2.covariance)
    s3 = reference_stats(folder, ext, tmp_path / "cache", num_samples=10)  # other count: other key
    assert net.calls > calls and s3.count == 10
    with pytest.raises(UserError):
        reference_stats(folder, ext, tmp_path / "cache", num_samples=50)


def test_adm_reference_npz(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(16), _random_spd(rng, 16)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma)
    net = Counting(dim=16)
    stats = reference_stats(path, ModuleFeatures(net, "inception"), tmp_path / "cache")
    assert net.calls == 0 and stats.info["source"] == "npz mu/sigma" and stats.info["num_images"] == 20
    np.testing.assert_array_equal(stats.mean, mu)
    np.testing.assert_array_equal(stats.covariance, sigma)
    # another extractor: statistics come from the images arr_0
    other = reference_stats(path, ModuleFeatures(net, "standin"), tmp_path / "cache")
    assert net.calls > 0 and other.count == 20 and other.info["source"] == "computed"


def test_latent_folder_reference_is_decoded(tmp_path, monkeypatch):
    import mapdit.data
    from mapdit.data.latents import synthetic_latents

    folder = synthetic_latents(tmp_path / "lat", 12, latent_shape=(4, 2, 2), shard_size=5)
    seen = []

    def fake_decoder_for(meta, device="cpu"):
        assert meta["kind"] == "latents"

        def decode(x):  # (N, 4, 2, 2) -> uint8 (N, 4, 4, 3)
            seen.append(x.shape[0])
            up = torch.nn.functional.interpolate(x[:, :3], scale_factor=2)
            return ((up.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return decode

    monkeypatch.setattr(mapdit.data, "decoder_for", fake_decoder_for)
    stats = reference_stats(folder, ModuleFeatures(Counting(dim=4), "standin"), None, batch_size=5)
    assert seen == [5, 5, 2] and stats.count == 12 and stats.info["kind"] == "latents"


# ------------------------------------------------------------------------------------ Inception path
def test_inception_without_torch_fidelity(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(UserError, match=r"needs torch-fidelity: pip install 'mapdit\[fid\]'"):
        get_extractor("inception")
    with pytest.raises(UserError, match="unknown feature extractor"):
        get_extractor("vgg")


def _fake_torch_fidelity(monkeypatch, cls):
    pkg = types.ModuleType("torch_fidelity")
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = cls
    pkg.feature_extractor_inceptionv3 = mod
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)


def test_inception_weights_offline_and_gray_replication(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    class Offline(nn.Module):
        def __init__(self, name, features, feature_extractor_weights_path=None):
            raise urllib.error.URLError("no network")

    _fake_torch_fidelity(monkeypatch, Offline)
    with pytest.raises(UserError, match="--inception-weights PATH") as err:
        get_extractor("inception")
    assert fid.INCEPTION_URL in str(err.value)
    with pytest.raises(UserError, match="not found"):
        get_extractor("inception", weights_path=tmp_path / "missing.pth")

    seen = []

    class Fake(nn.Module):
        def __init__(self, name, features, feature_extractor_weights_path=None):
            super().__init__()

        def forward(self, x):
            seen.append((x.dtype, tuple(x.shape)))
            return (x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048],)

    _fake_torch_fidelity(monkeypatch, Fake)
    ext = get_extractor("inception")
    out = ext(torch.zeros(4, 28, 28, 1, dtype=torch.uint8))
    assert seen == [(torch.uint8, (4, 3, 28, 28))] and out.shape == (4, 2048)
    assert ext.name == "inception" and ext.dim == 2048 and fid.metric_name(ext.name) == "fid"


# ------------------------------------------------------------------------------------ the classifier
@pytest.fixture(scope="module")
def fmnist_data():
    from mapdit.data import load_dataset
    from mapdit.evaluate.fmnist_classifier import load_classifier

    train = load_dataset("fashion-mnist", split="train")
    test = load_dataset("fashion-mnist", split="test")
    return train, test, load_classifier()


@needs_fmnist
def test_shipped_classifier_accuracy(fmnist_data):
    from mapdit.evaluate.fmnist_classifier import ASSET_PATH, conditioning_accuracy, predict

    _, test, clf = fmnist_data
    assert ASSET_PATH.stat().st_size < 1_000_000
    assert clf.meta["test_accuracy"] >= 0.90
    images = test.images.permute(0, 2, 3, 1)  # (N, 28, 28, 1)
    # the test accuracy is the conditioning accuracy of the real test images with their true labels
    assert conditioning_accuracy(images, test.labels, clf) >= 0.90
    shuffled = test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    assert conditioning_accuracy(images[:2000], shuffled[:2000], clf) < 0.2
    # padded to 32 (patch 8) and RGB inputs give the same predictions
    pred = predict(images[:500], clf)
    padded = torch.nn.functional.pad(test.images[:500], (2, 2, 2, 2))
    assert torch.equal(predict(padded, clf), pred)
    assert torch.equal(predict(test.images[:500].expand(-1, 3, -1, -1).permute(0, 2, 3, 1), clf), pred)


@needs_fmnist
def test_fmnist_fd_train_vs_test_and_noise(fmnist_data, tmp_path):
    train, test, _ = fmnist_data
    real = train.images[:2000].permute(0, 2, 3, 1)
    kw = dict(cache_dir=tmp_path, num_ref=5000)
    floor = evaluate_samples(real, train.labels[:2000], "fashion-mnist", "fmnist", extra_settings={"k": 1}, **kw)
    assert floor["metric"] == "fd_fmnist" and floor["reference"]["split"] == "test"
    assert floor["num_reference"] == 5000 and floor["settings"] == {"k": 1}
    assert floor["conditioning_accuracy"] >= 0.9
    noisy = evaluate_samples(_add_noise(real, 0.4), None, "fashion-mnist", "fmnist", **kw)
    assert noisy["reference"]["cached"] is True and "conditioning_accuracy" not in noisy
    assert floor["fd_fmnist"] < 0.1 * noisy["fd_fmnist"], (floor["fd_fmnist"], noisy["fd_fmnist"])


def test_cli_registration(tmp_path):
    from mapdit.commands import fmnist_classifier

    parser = argparse.ArgumentParser(prog="mapdit")
    fmnist_classifier.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fmnist-classifier", "--out", str(tmp_path / "c.safetensors"), "--epochs", "2"])
    assert args.func is fmnist_classifier.run and args.epochs == 2 and args.seed == 0
