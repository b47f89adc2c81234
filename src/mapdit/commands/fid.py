"""`mapdit fid`: FID (or FD_fmnist) of a run's samples against a reference (also under torchrun)."""
from __future__ import annotations

import argparse

from .. import distributed as dist_utils
from ..evaluate.scoring import DEFAULT_CACHE
from ..experiments.fid_run import DEFAULT_NUM_SAMPLES, fid_for_run
from ..samplers import SamplerSpec
from .options import add_options, from_args


def run(args: argparse.Namespace) -> dict:
    result = fid_for_run(args.run, args.num_samples, ref=args.ref, features=args.features,
                         weights=args.weights, ema_std=args.ema_std, ckpt=args.ckpt,
                         spec=from_args(SamplerSpec, args), seed=args.seed, batch_size=args.batch_size,
                         inception_weights=args.inception_weights,
                         cache_dir=args.cache_dir if args.cache_dir is not None else DEFAULT_CACHE,
                         num_ref=args.num_ref, split=args.split, device=args.device)
    if dist_utils.rank_and_world()[0] == 0:
        print(result["result_json"])
    dist_utils.shutdown(dist_utils.init(args.device))
    return result


def add_fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--result-dir", dest="run", required=True, metavar="RUN",
                   help="a run folder made by training, e.g. results/000-DiT-S-2 (also: --result-dir)")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="samples to score")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA weights or the raw trained ones")
    p.add_argument("--ema-std", type=float, default=None,
                   help="EMA width (default the smallest tracked one; others are reconstructed post hoc)")
    p.add_argument("--ckpt", default=None, help="a checkpoint: a path, a name in the run's checkpoints/ or a step "
                                                   "(default: the newest complete one)")
    add_options(p, SamplerSpec, group="sampling (one default with mapdit sample and the Python API)")
    p.add_argument("--seed", type=int, default=0, help="seed of the labels and the noise")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (per rank)")
    p.add_argument("--ref", default=None,
                   help="reference: 'fashion-mnist', an image folder, a prepared latent folder or an ADM "
                        "reference batch .npz (default: the run's training data)")
    p.add_argument("--num-ref", type=int, default=None, help="use a fixed random subset of the reference")
    p.add_argument("--split", default="test", help="split of an IDX reference (default test)")
    p.add_argument("--features", choices=("fmnist", "inception"), default=None,
                   help="default: fmnist for Fashion-MNIST runs, inception otherwise or with --inception-weights")
    p.add_argument("--inception-weights", default=None, help="a local copy of torch-fidelity's Inception weights")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default ~/.cache/mapdit/fid-stats)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def register(sub) -> None:
    p = sub.add_parser("fid", help="FID (or FD_fmnist) of a run's samples against a reference (also under torchrun)")
    add_fid_args(p)
    p.set_defaults(func=run)
