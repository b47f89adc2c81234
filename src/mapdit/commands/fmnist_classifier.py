"""`mapdit fmnist-classifier`: train the Fashion-MNIST CNN whose features give FD_fmnist."""
from __future__ import annotations

import argparse
import json
import sys

from ..evaluate.fmnist_classifier import DEFAULT_EPOCHS, train_classifier


def run(args: argparse.Namespace) -> None:
    command = (f"mapdit fmnist-classifier --out {args.out} --epochs {args.epochs} --seed {args.seed} "
               f"--threads {args.threads}")
    if args.data_path != "fashion-mnist":
        command += f" --data-path {args.data_path}"
    result = train_classifier(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads,
                              data_path=args.data_path, command=command,
                              log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fmnist-classifier",
        help="train the Fashion-MNIST CNN whose features give FD_fmnist and conditioning accuracy",
        description="Train the small Fashion-MNIST classifier (deterministic, a few CPU minutes) and save "
                    "it as safetensors; the package ships one in mapdit/assets.",
    )
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the training split")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and flips")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the result depends on the thread count; 1 reproduces the "
                        "shipped weights)")
    p.add_argument("--data-path", default="fashion-mnist",
                   help="'fashion-mnist' (installed copy) or a folder with the four IDX files")
    p.set_defaults(func=run)
