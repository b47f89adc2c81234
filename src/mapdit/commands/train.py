"""`mapdit train` (also the seed paper's `python train.py`): parse the options, then `mapdit.train.train`.

On `--resume` the options the user gave (those whose value differs from the parser's default) go to
`mapdit.resume.resume_settings`, which holds the policy of what may change.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import DEFAULT_SNAPSHOT_DTYPE, SNAPSHOT_DTYPES, TrainConfig, parse_model_name
from ..resume import resolve_run_dir, resume_settings
from ..train import train
from . import add_model_args, config_from_args

DEFAULT_MODEL = "DiT-S/2"


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, data_defaults=False)
    p.set_defaults(model=None)  # None: not given (DEFAULT_MODEL for a new run; the run's own on --resume)
    g = p.add_argument_group("training")
    g.add_argument("--data-path", default=None,
                   help="(default fashion-mnist) 'fashion-mnist', a folder of IDX files, a folder of class "
                        "subfolders, or prepared latents")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--num-steps", type=int, default=400_000, help="default 400000 (on --resume: the run's own)")
    g.add_argument("--global-batch-size", "--batch-size", dest="batch_size", type=int, default=256)
    g.add_argument("--lr", type=float, default=None, help="default 1e-4 (Config A) or 1e-2 with weight normalisation")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--decay-start", type=int, default=None)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--min-snr-gamma", type=float, default=None,
                   help="weight the eps-MSE by min(SNR_t, gamma)/SNR_t (Min-SNR, e.g. 5); default: uniform, as DiT")
    g.add_argument("--global-seed", "--seed", dest="seed", type=int, default=0)
    g.add_argument("--ema-stds", type=float, nargs="+", default=[0.05, 0.10])
    g.add_argument("--ema-snapshots", type=int, default=100, help="snapshots per EMA width over the run (0: none)")
    g.add_argument("--snapshot-dtype", choices=SNAPSHOT_DTYPES, default=DEFAULT_SNAPSHOT_DTYPE)
    g.add_argument("--ckpt-every", type=int, default=None)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--device", default=None)
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) steps with a NaN/Inf loss or gradient instead of stopping")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--hflip", action="store_true")
    g.add_argument("--sample-every", type=int, default=0, help="a sample grid from the EMA every N steps")
    g.add_argument("--fid-every", type=int, default=0, help="FID of the EMA every N steps into metrics.csv")
    g.add_argument("--fid-samples", type=int, default=1000)
    g.add_argument("--magnitude-every", type=int, default=0,
                   help="residual-stream magnitude per block every N steps (residual_magnitudes.csv)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: its folder, or nothing for the newest run in --results-dir. Only "
                        "--num-steps, --lr, --grad-clip, --skip-nonfinite, --log-every, --ckpt-every, --data-path, "
                        "--device and --compile may differ from the run's own")


def _given(args: argparse.Namespace) -> dict[str, object]:
    """The options given on the command line (those whose value is not the parser's default), with values."""
    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p)
    defaults = vars(p.parse_args([]))
    return {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def run(args: argparse.Namespace) -> Path:
    given = _given(args)
    tc = TrainConfig(data_path=args.data_path, results_dir=args.results_dir, num_steps=args.num_steps,
                     batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                     decay_start=args.decay_start, grad_clip=args.grad_clip, seed=args.seed,
                     min_snr_gamma=args.min_snr_gamma,
                     ema_stds=tuple(args.ema_stds), ema_snapshots=args.ema_snapshots,
                     snapshot_dtype=args.snapshot_dtype, ckpt_every=args.ckpt_every, log_every=args.log_every,
                     precision=args.precision, compile=args.compile, device=args.device,
                     skip_nonfinite=args.skip_nonfinite, image_size=args.image_size, hflip=args.hflip,
                     sample_every=args.sample_every, fid_every=args.fid_every, fid_samples=args.fid_samples,
                     magnitude_every=args.magnitude_every)
    if args.resume:
        run_dir = resolve_run_dir(args.results_dir, args.resume)
        tc = resume_settings(run_dir, given, tc)
        run_dir = train(tc, None, resume=str(run_dir))
    else:
        args.model = args.model or DEFAULT_MODEL
        # sizes follow the data; placeholders until the data is loaded
        model_cfg = config_from_args(args, input_size=parse_model_name(args.model)[1], in_channels=1,
                                     num_classes=1)
        run_dir = train(tc, model_cfg)
    # leave the process group cleanly after a finished run (after a failure the process just exits)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MaP-DiT (also under torchrun)")
    add_train_args(p)
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM during start-up: handled by train()
