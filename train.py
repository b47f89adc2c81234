"""The seed paper's command, verbatim: `python train.py --data-path PATH --results-dir DIR --model DiT-S/2 ...`.

Same options and defaults as `mapdit train` (the paper's; see `mapdit train --help`, generated from the config
dataclasses); works from the repo root with or without install.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mapdit.cli import main  # noqa: E402  (light: SIGTERM is held before torch is imported)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
