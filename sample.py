"""The seed paper's command, verbatim: `python sample.py --result-dir DIR --class-label N`.

Same options as `mapdit sample` (see `mapdit sample --help`); works from the repo root with or without install.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mapdit.cli import main  # noqa: E402  (light: SIGTERM is held before torch is imported)

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
