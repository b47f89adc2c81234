"""The seed paper's command, verbatim: `python train.py --data-path PATH --results-dir DIR --model DiT-S/2 ...`.

Same options as `mapdit train` (see `mapdit train --help`); works from the repo root with or without install.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mapdit.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
