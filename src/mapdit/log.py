"""One timestamped logger for every long command (training, ablation, study): `[YYYY-mm-dd HH:MM:SS] msg`
to a stream (or a tqdm bar, or a callable), and appended to a log file when one is given."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable


def timestamped(msg: str) -> str:
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"


class Logger:
    """`log(msg)`: a timestamped line on `stream` (stdout by default; through `bar.write` while a tqdm bar
    is shown; or handed to `sink` instead) and appended to `path`. Silent where `is_main` is false (the
    other torchrun ranks). `warn(msg)`: the same line on stderr (something skipped or set aside)."""

    def __init__(self, path: str | Path | None = None, *, is_main: bool = True, stream=None, bar=None,
                 sink: Callable[[str], None] | None = None, prefix: str = ""):
        self.path = Path(path) if path else None
        self.is_main, self.stream, self.bar, self.sink, self.prefix = is_main, stream, bar, sink, prefix

    def warn(self, msg: str) -> None:
        self(msg, stream=sys.stderr)

    def __call__(self, msg: str, stream=None) -> None:
        if not self.is_main:
            return
        line = timestamped(self.prefix + msg)
        if self.sink is not None:
            self.sink(line)
        elif self.bar is not None:
            self.bar.write(line, file=stream or self.stream)
        else:
            print(line, file=stream or self.stream or sys.stdout, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
