"""Latent loader throughput vs. a DiT-S/2 training step on this machine (CPU).

Writes a random latent set in the `mapdit prepare` format (default 20k entries of 4x32x32, float16
mu and sigma in 10k-entry shards), then times

  loader:  LatentDataset.batch(random indices, generator) at batch 256 (memory-mapped gather,
           z = mu + sigma * eps, per-channel normalisation), after one warm-up batch;
  train:   DiT-S/2 (preset E, 32x32x4 input, 1000 classes) forward + hybrid loss + backward +
           Adam step at batch 32, with the MP weight projection, after one warm-up step.

Prints images/s for both and their ratio (how many times faster the loader is than training).

    python benchmarks/latent_loader.py [--quick] [--items N] [--dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def time_loader(ds, batch: int, iters: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.Generator().manual_seed(seed + 1)
    ds.batch(torch.randint(0, len(ds), (batch,), generator=pick), gen)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        x, y = ds.batch(torch.randint(0, len(ds), (batch,), generator=pick), gen)
    elapsed = time.perf_counter() - start
    assert x.shape[0] == batch and torch.isfinite(x).all()
    return batch * iters / elapsed


def time_train(batch: int, steps: int) -> float:
    from mapdit.config import make_config
    from mapdit.diffusion import make_diffusion
    from mapdit.model import DiT

    torch.manual_seed(0)
    model = DiT(make_config("DiT-S/2", preset="E", input_size=32, in_channels=4, num_classes=1000))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    diffusion = make_diffusion()

    def step():
        model.project_weights_()
        x = torch.randn(batch, 4, 32, 32)
        y = torch.randint(0, 1000, (batch,))
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(model, x, t, y)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5k entries, fewer iterations")
    p.add_argument("--items", type=int, default=None, help="entries in the generated set (default 20000)")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256, help="loader batch")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--dir", default=None, help="where to write the latent set (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mapdit.data import load_dataset
    from mapdit.data.latents import synthetic_latents

    items = args.items or (5_000 if args.quick else 20_000)
    iters, steps = (20, 2) if args.quick else (100, 5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / "latents"
        t0 = time.perf_counter()
        synthetic_latents(folder, items, (4, 32, 32), num_classes=1000, shard_size=args.shard_size)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_dataset(str(folder), patch_size=2)
        t_open = time.perf_counter() - t0
        loader = time_loader(ds, args.batch, iters)
        train = time_train(args.train_batch, steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"latent set: {items} entries 4x32x32 f16 in shards of {args.shard_size}: written in {t_write:.2f} s, "
          f"opened in {t_open * 1e3:.1f} ms")
    print(f"loader  batch {args.batch:4d}: {loader:12,.0f} img/s  ({args.batch / loader * 1e3:.2f} ms/batch)")
    print(f"train   batch {args.train_batch:4d}: {train:12,.1f} img/s  (DiT-S/2 preset E, fwd+bwd+Adam, CPU)")
    print(f"ratio loader/train: {loader / train:,.0f}x")


if __name__ == "__main__":
    main()
