"""SIGTERM and Ctrl-C from the first moment of a command on.

`mapdit` holds both signals while it starts (imports, argument parsing, set-up): a signal that arrives then
is remembered instead of killing the process half-way through writing something. A command that stops
gracefully (training: its `StopRequest` takes the remembered signal over) handles it; for every other
command `release()` restores the usual behaviour and delivers a remembered signal the usual way
(SIGTERM ends the process, Ctrl-C raises KeyboardInterrupt). A second signal while held stops at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: int | None = None
_previous: dict[int, object] = {}
_listeners: list[Callable[[int], None]] = []


def _remember(signum, frame) -> None:
    global _pending
    if _pending is not None:  # a second signal: stop now
        raise KeyboardInterrupt
    _pending = signum
    for listener in list(_listeners):
        listener(signum)


@contextlib.contextmanager
def on_first(listener: Callable[[int], None]) -> Iterator[None]:
    """Within the block, call `listener(signum)` when the first signal arrives while held (in the signal
    handler: it must only do what is safe there, e.g. send signals), e.g. to pass a stop on to worker processes
    as it comes instead of when the main thread next looks."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until `release()` or the end of the block (then the previous handlers return)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or _previous:
        yield  # signals can only be handled in the main thread; nested: the outer block holds them
        return
    hold()
    try:
        yield
    finally:
        _restore()
        _pending = None


def hold() -> None:
    """Start holding SIGTERM/SIGINT (main thread only), e.g. for the whole life of a worker process."""
    global _pending
    if _previous:  # already held
        return
    _pending = None
    for sig in SIGNALS:
        _previous[sig] = signal.signal(sig, _remember)


def hand_back(signum: int) -> None:
    """A signal a graceful stop took over (`take_pending`, or its own handler) becomes pending again while
    held, so that work above it learns of it too: a run stopped at its last step is finished, and its study
    must still stop before the next run."""
    global _pending
    if _previous and _pending is None:
        _pending = signum


def pending() -> int | None:
    """The signal received while held and not handed over yet (None if none); it stays pending. Work that
    stops gracefully looks here between its units (runs of a study) and stops before the next one."""
    return _pending


def _restore() -> None:
    for sig, old in _previous.items():
        signal.signal(sig, old)
    _previous.clear()


def take_pending() -> int | None:
    """The signal received while held (None if none), handed over to the caller, who now handles it."""
    global _pending
    signum, _pending = _pending, None
    return signum


def release() -> None:
    """Back to the usual handling, delivering a signal that arrived while held."""
    if not _previous:
        return
    _restore()
    signum = take_pending()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signum is not None:
        os.kill(os.getpid(), signum)
