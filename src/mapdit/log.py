"""One timestamped logger for every long command (training, ablation, study): `[YYYY-mm-dd HH:MM:SS] msg`
to a stream (or a tqdm bar, or a callable), and appended to a log file when one is given (a file that cannot
be written is said once, and the work goes on). `TensorBoard`: training's optional TensorBoard scalars."""
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
    other torchrun ranks). `warn(msg)`: the same line on stderr (something skipped or set aside). A log file
    that cannot be written (full disk, read-only place) is said once on stderr; the lines still reach the
    screen."""

    def __init__(self, path: str | Path | None = None, *, is_main: bool = True, stream=None, bar=None,
                 sink: Callable[[str], None] | None = None, prefix: str = ""):
        self.path = Path(path) if path else None
        self.is_main, self.stream, self.bar, self.sink, self.prefix = is_main, stream, bar, sink, prefix
        self.file_failed = False  # the log file could not be written: said once, then the screen only

    def warn(self, msg: str) -> None:
        self(msg, stream=sys.stderr)

    def __call__(self, msg: str, stream=None) -> None:
        if not self.is_main:
            return
        line = timestamped(self.prefix + msg)
        self._show(line, stream)
        if self.path and not self.file_failed:
            try:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            except OSError as err:  # a full disk or a read-only place: the work goes on, logged on screen
                self.file_failed = True
                self._show(timestamped(f"{self.prefix}warning: cannot write {self.path} "
                                       f"({(err.strerror or str(err)).lower()}): log lines go to the screen only"),
                           sys.stderr)

    def _show(self, line: str, stream=None) -> None:
        if self.sink is not None:
            self.sink(line)
        elif self.bar is not None:
            self.bar.write(line, file=stream or self.stream)
        else:
            print(line, file=stream or self.stream or sys.stdout, flush=True)


class TensorBoard:
    """Training's scalars for TensorBoard (`tensorboard --logdir RUN/tensorboard`), written with
    torch.utils.tensorboard when the optional `tensorboard` package is installed (pip install
    'mapdit[tensorboard]'). `open` says in one line why not, and gives None, when it is missing."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, folder: Path, warn: Callable[[str], None]) -> "TensorBoard | None":
        try:
            import tensorboard  # noqa: F401  (the package torch.utils.tensorboard needs)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warn("--tensorboard: the tensorboard package is not installed (pip install tensorboard, or pip install "
                 "-e '.[tensorboard]'); training goes on without it")
            return None
        return cls(SummaryWriter(log_dir=str(folder)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
