"""Stopping a training run (mapdit.stopping, mapdit.signals): SIGTERM finishes the step, checkpoints and exits 0,
--resume continues; a signal while mapdit starts is held for training; a signal in the first seconds leaves
nothing half made."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ENV, RUN, TINY_ARGS, cli, needs_fmnist, steps_in_metrics, temporaries, train_cmd, wait_for
from mapdit import signals
from mapdit.runio import checkpoint_path, list_checkpoints, verify_checkpoint


@needs_fmnist
@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues_from_it(tmp_path, capsys):
    args = [*TINY_ARGS, "--num-steps", "400", "--log-every", "2", "--ckpt-every", "200", "--ema-snapshots", "0"]
    proc = subprocess.Popen(train_cmd(*args, "--results-dir", tmp_path), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = tmp_path / RUN
    try:
        wait_for(lambda: (run / "metrics.csv").exists() and len(steps_in_metrics(run)) >= 1, proc=proc,
                 what="the first metrics row")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stopped = [line for line in out.splitlines() if "stopped by signal at step" in line]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("stopped by signal at step ")[1].split(";")[0])
    assert 2 <= step < 400
    assert [s for s, _ in list_checkpoints(run)] == [step]
    assert verify_checkpoint(checkpoint_path(run, step)) is None

    assert cli("train", "--resume", run, "--num-steps", step + 3) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} at step {step}/{step + 3}" in out
    assert [s for s, _ in list_checkpoints(run)] == [step, step + 3]
    steps = steps_in_metrics(run)
    assert steps == sorted(set(steps)) and steps[-1] == step + 3


def test_a_signal_while_mapdit_starts_is_held_for_training():
    # what `mapdit` does before torch is imported: a SIGTERM then is handed to training, not fatal
    previous = signal.getsignal(signal.SIGTERM)
    with signals.held():
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.take_pending() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # other commands get the usual behaviour back, signal included
            signals.release()
    assert signal.getsignal(signal.SIGTERM) is previous


def _catches_sigterm(pid: int) -> bool:
    """Has process `pid` installed a SIGTERM handler yet (/proc/PID/status SigCgt)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signal.SIGTERM - 1) & 1)


@needs_fmnist
@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_sigterm_in_the_first_seconds_exits_0_and_leaves_nothing_half_made(tmp_path, delay):
    results = tmp_path / "R"
    cmd = [sys.executable, "-m", "mapdit.cli", "train", *TINY_ARGS, "--num-steps", 400, "--log-every", 1,
           "--ckpt-every", 200, "--ema-snapshots", 0, "--results-dir", results]
    proc = subprocess.Popen([str(a) for a in cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:  # from the moment mapdit runs (before torch is imported): the interpreter's own start is not ours
        deadline = time.monotonic() + 600
        while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=1800)
    finally:
        proc.kill()
    assert proc.returncode == 0, (delay, err[-2000:])
    assert "Traceback" not in err
    runs = list(results.iterdir()) if results.exists() else []
    if runs:  # the signal came after step 1 began: a finished step and its checkpoint, as documented
        assert len(runs) == 1 and "stopped by signal at step" in out, (out, err)
        assert [verify_checkpoint(p) for _, p in list_checkpoints(runs[0])] == [None]
    else:
        assert "during set-up, before step 1" in err, err
    assert not temporaries(tmp_path)
