"""Calibrate FD_fmnist (the Fréchet distance in the shipped Fashion-MNIST classifier's features) and the
conditioning accuracy: what values do real images and simple degradations of them get?

Reference: the 10k Fashion-MNIST test images. "Samples": real training images (a fixed random subset),
as they are and degraded (Gaussian pixel noise, box blur, per-class mean images). Prints a markdown
table; runs in a couple of CPU minutes:

    .venv/bin/python benchmarks/fmnist_calibration.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mapdit.data import load_dataset
from mapdit.evaluate.fid import FmnistFeatures, compute_stats, frechet_distance


def subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """Gaussian noise with std sigma in model units ([-1, 1]), re-quantised to uint8."""
    g = torch.Generator().manual_seed(seed)
    x = images.to(torch.float32) / 127.5 - 1 + sigma * torch.randn(images.shape, generator=g)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def box_blur(images: torch.Tensor, k: int) -> torch.Tensor:
    """k x k box blur of uint8 (N, 1, H, W); borders average over the pixels inside the image."""
    x = F.avg_pool2d(images.to(torch.float32), k, stride=1, padding=k // 2, count_include_pad=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def class_means(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image replaced by the mean image of its class (over the given images)."""
    out = torch.empty_like(images)
    for c in labels.unique():
        m = labels == c
        out[m] = images[m].to(torch.float32).mean(0).round().to(torch.uint8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    train = load_dataset("fashion-mnist", split="train")
    test = load_dataset("fashion-mnist", split="test")
    ext = FmnistFeatures()

    def stats_and_acc(images_nchw, labels):
        preds = []
        st = compute_stats(images_nchw.permute(0, 2, 3, 1), ext, batch_size=args.batch_size,
                           on_features=lambda f: preds.append(ext.predict_from_features(f)))
        return st, float((torch.cat(preds) == labels).double().mean())

    ref, test_acc = stats_and_acc(test.images, test.labels)
    mu_r, cov_r = ref.mean, ref.covariance

    rows = []

    def row(name, images, labels):
        st, acc = stats_and_acc(images, labels)
        fd = frechet_distance(st.mean, st.covariance, mu_r, cov_r)
        rows.append((name, len(images), fd, acc))

    idx10k = subset(len(train), 10_000)
    x10k, y10k = train.images[idx10k], train.labels[idx10k]
    for n in (1_000, 5_000, 10_000):
        row("real train images", x10k[:n], y10k[:n])
    for sigma in (0.1, 0.2, 0.4):
        row(f"+ Gaussian noise sigma={sigma}", noisy(x10k, sigma), y10k)
    for k in (3, 5):
        row(f"{k}x{k} box blur", box_blur(x10k, k), y10k)
    row("per-class mean image", class_means(x10k, y10k), y10k)

    shuffled = test.labels[subset(len(test), len(test), seed=1)]
    shuffled_acc = float((torch.cat([ext.predict_from_features(ext(test.images[i:i + 1000].permute(0, 2, 3, 1)))
                                     for i in range(0, len(test), 1000)]) == shuffled).double().mean())

    print(f"Reference: Fashion-MNIST test split (10,000 images); features: {ext.fingerprint} ({ext.dim}-d).")
    print("Samples: a fixed random subset (seed 0) of the training split, as is or degraded; noise sigma in "
          "[-1, 1] units.\n")
    print("| samples | n | FD_fmnist | conditioning accuracy |")
    print("|---|---:|---:|---:|")
    for name, n, fd, acc in rows:
        print(f"| {name} | {n:,} | {fd:.3f} | {acc:.3f} |")
    print(f"\nConditioning accuracy of the real test images: true labels {test_acc:.4f}, "
          f"shuffled labels {shuffled_acc:.4f} (chance 0.1).")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
