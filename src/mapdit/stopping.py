"""Stopping a training run: SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit (code 0);
a second signal stops at once. Before step 1 a signal stops set-up with nothing kept (`stop_if_asked`)."""
from __future__ import annotations

import signal
from pathlib import Path

from . import signals
from .errors import Stopped


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit. Entered at the start of
    `train`, it also takes over a signal `mapdit` held while starting (mapdit.signals): set-up then stops
    before anything is written."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        self.signal = signals.take_pending()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self.signal is not None:  # e.g. at the last step: the caller (a study) stops before its next run
            signals.hand_back(self.signal)

    def stop_if_asked(self, run_dir: Path | None, resume: str | None, distributed: bool) -> None:
        """Before step 1 a signal stops at once (exit code 0, nothing kept). Under torchrun the ranks agree on
        stopping at report steps instead, so that no rank waits for one that left."""
        if self.signal is None or distributed:
            return
        what = f"resume {run_dir} again to continue" if resume is not None else "no run folder is kept"
        raise Stopped(f"stopped by signal {signal.Signals(self.signal).name} during set-up, before step 1: {what}")
