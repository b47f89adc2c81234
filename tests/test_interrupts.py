"""SIGTERM and Ctrl-C during `mapdit study` and `mapdit ablate`: a run stops like `mapdit train` (checkpoint, exit
0, one line saying how to continue), nothing unfinished is scored or recorded, and the rerun continues it.

Each test starts `mapdit` as a process with a tiny budget (DiT-XXS/4, batch 8, 16 samples of 2 steps) and
signals it once a file shows that it reached the chosen moment (training: its metrics.csv; scoring: its
run's eval folder).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ENV, needs_installed_fmnist
from mapdit.data import fashion_mnist
from mapdit.runio import list_checkpoints

pytestmark = needs_installed_fmnist

STEPS = 100  # long enough to be signalled mid-run (the first metrics row comes at step 1)
SCORE = ["--fid-samples", 16, "--sampling-steps", 2, "--num-ref", 200, "--sample-batch-size", 8,
         "--magnitude-batch-size", 8]


def trained_steps(run: Path) -> int:
    return list_checkpoints(run)[-1][0]


def _env() -> dict:
    env = dict(ENV)
    env.pop(fashion_mnist.ENV_VAR, None)  # "fashion-mnist": the installed copy
    return env


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mapdit.cli", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapdit.cli", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _wait_for(folder: Path, pattern: str, proc: subprocess.Popen, rows: int = 0) -> Path:
    """The first path matching `pattern` under `folder`, once it exists (with `rows` lines after its header:
    metrics.csv is created with its header before step 1); the process must still run."""
    deadline = time.monotonic() + 120  # a safety net, not a timing
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found and (not rows or len(found[0].read_text().splitlines()) > rows):
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"mapdit ended before {pattern} appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{pattern} never appeared")


def _study(tmp_path: Path, rates: str = "A=1e-2") -> list:
    return ["study", "--studies", "rates", "--configs", "A", "--rates", rates, "--model", "DiT-XXS/4",
            "--num-steps", STEPS, "--checkpoints", STEPS, "--batch-size", 8, "--seeds", 0, *SCORE,
            "--heldout-images", 50, "--ema-snapshots", 2, "--log-every", 1, "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "study", "--results-md", tmp_path / "R.md", "--docs-dir", tmp_path / "docs"]


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ study
@pytest.mark.slow
def test_a_study_stopped_mid_run_scores_nothing_and_the_rerun_continues_the_run(tmp_path):
    # today: train() checkpoints and returns, the study scores the half-trained run, records it as finished
    # and exits 0; a rerun skips it, so RESULTS.md keeps the number of a run stopped at step 21 of 60
    args = _study(tmp_path)
    proc = _start(*args)
    run = _wait_for(tmp_path / "study", "runs/A/lr1e-02/runs/A-adaln-seed0/*/metrics.csv", proc, rows=1).parent
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = _last_line(err)
    stopped = re.fullmatch(rf"mapdit study: A at 0\.01: stopped by signal: A-adaln-seed0 at step (\d+) of {STEPS} "
                           r"\(checkpoint written, nothing scored\); continue with: mapdit study .*", last)
    assert stopped, last
    assert "continue with --resume" not in stdout + err  # one way to continue: the study's (train's was printed too)
    step = int(stopped.group(1))
    assert 0 < step < STEPS and trained_steps(run) == step
    results = tmp_path / "study" / "runs" / "A" / "lr1e-02" / "results"
    assert not list(results.glob("*.json")) and not list(run.glob("eval/samples-*.npz"))
    assert not (tmp_path / "R.md").exists()

    # the rerun (the printed command) continues that run to its budget, then scores it
    done = _run(*args)
    assert done.returncode == 0, done.stderr
    assert f"A-adaln-seed0: resuming {run}" in done.stderr
    assert f"resuming {run} at step {step}/{STEPS}" in (run / "log.txt").read_text()
    result = json.loads((results / "A-adaln-seed0.json").read_text())
    assert result["final_step"] == STEPS and result["run_dir"] == str(run) and trained_steps(run) == STEPS
    assert f"{STEPS} steps" in (results.parent / "ablation.md").read_text()


@pytest.mark.slow
def test_a_signal_while_a_run_is_scored_lets_it_finish_then_stops_before_the_next_run(tmp_path):
    # today the signal kills the study (exit -15 / 143) half-way through scoring
    proc = _start(*_study(tmp_path, rates="A=1e-2/3e-2"))
    first = tmp_path / "study" / "runs" / "A" / "lr1e-02"
    _wait_for(first, "runs/A-adaln-seed0/*/eval", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _last_line(err).startswith("mapdit study: A at 0.03: stopped by signal SIGTERM before A-adaln-seed0 "
                                      "started; continue with: mapdit study ")
    result = json.loads((first / "results" / "A-adaln-seed0.json").read_text())  # the finished run's score
    assert result["final_step"] == STEPS
    assert not (tmp_path / "study" / "runs" / "A" / "lr3e-02" / "runs").exists()  # the next run never started


# ------------------------------------------------------------------------------------------------ ablate
@pytest.mark.slow
def test_ctrl_c_during_ablate_records_nothing_and_the_table_counts_the_steps_trained(tmp_path):
    # today the run stopped at step k is scored and ablation.md still says the budget's steps
    out = tmp_path / "abl"
    args = ["ablate", "--configs", "A", "--model", "DiT-XXS/4", "--num-steps", STEPS, "--batch-size", 8,
            "--features", "fmnist", *SCORE, "--ema-snapshots", 0, "--ckpt-every", STEPS, "--log-every", 1,
            "--cache-dir", tmp_path / "cache", "--out", out]
    proc = _start(*args)
    run = _wait_for(out, "runs/A-adaln-seed0/*/metrics.csv", proc, rows=1).parent
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = re.fullmatch(rf"mapdit ablate: stopped by signal: A-adaln-seed0 at step (\d+) of {STEPS} \(checkpoint "
                           rf"written, nothing scored\); rerun the same command \(--out {re.escape(str(out))}\) to "
                           "continue", _last_line(err))
    assert stopped, err
    assert "continue with --resume" not in stdout + err  # one way to continue: the ablation's rerun
    assert trained_steps(run) == int(stopped.group(1)) < STEPS
    assert not (out / "results").exists() and not (out / "ablation.md").exists()

    done = _run(*args)
    assert done.returncode == 0, done.stderr
    assert "A-adaln-seed0: resuming" in done.stderr
    assert json.loads((out / "results" / "A-adaln-seed0.json").read_text())["final_step"] == STEPS
    assert (out / "ablation.md").read_text().startswith(f"# Ablation: DiT-XXS/4, {STEPS} steps")
    assert trained_steps(run) == STEPS and os.path.isdir(run)


# ------------------------------------------------------------------------------------------------ --workers 2
def _children(pid: int) -> set[int]:
    """The live child processes of `pid` (of any of its threads)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return {c for c in found if not _gone(c)}


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"  # a zombie is gone too
    except FileNotFoundError:
        return True


def _two_runs_training(tmp_path: Path) -> tuple[subprocess.Popen, list[Path], set[int]]:
    """`mapdit study --workers 2` in a process group of its own, once both its runs have trained a step: the
    process, the two run folders and the study's child processes."""
    proc = subprocess.Popen([sys.executable, "-m", "mapdit.cli",
                             *map(str, _study(tmp_path, rates="A=1e-2/3e-2")), "--workers", "2"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    runs = [_wait_for(tmp_path / "study" / "runs" / "A" / lr, "runs/A-adaln-seed0/*/metrics.csv", proc, rows=1).parent
            for lr in ("lr1e-02", "lr3e-02")]
    return proc, runs, _children(proc.pid)


def _assert_all_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 60  # a safety net, not a timing
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if not _gone(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "processes of the study outlived it"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and the parent-death signal are Linux's")
@pytest.mark.parametrize("target, sig", [("group", signal.SIGTERM), ("study", signal.SIGINT)])
def test_a_signal_to_a_study_with_workers_stops_each_run_once_and_exits_0(tmp_path, target, sig):
    # today SIGTERM to the process group exits 143 and the runs stop without a word from the study
    proc, runs, children = _two_runs_training(tmp_path)
    assert len(children) >= 2
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    _assert_all_gone(children)
    assert proc.returncode == 0, err
    last = _last_line(err)
    assert last.startswith("mapdit study: ") and "; continue with: mapdit study " in last, last
    for lr, run in zip(("0.01", "0.03"), runs):  # each run checkpointed once where it stopped, nothing scored
        step = trained_steps(run)
        assert 0 < step < STEPS and f"A at {lr}: stopped by signal: A-adaln-seed0 at step {step} of {STEPS}" in last
        assert not list(run.parent.parent.parent.glob("results/*.json"))
        assert (run / "log.txt").read_text().count("stopped by signal at step") == 1


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and the parent-death signal are Linux's")
def test_workers_of_a_killed_study_checkpoint_once_and_exit(tmp_path):
    # the parent-death signal comes once per exiting thread of the study: the second one was train()'s "second
    # signal: stop now", so no stop checkpoint was written, and the workers then waited forever for work
    proc, runs, children = _two_runs_training(tmp_path)
    proc.kill()
    proc.wait()
    _assert_all_gone(children)
    for run in runs:
        assert 0 < trained_steps(run) < STEPS  # the stop checkpoint (the budget's only checkpoint is the last step)
        assert (run / "log.txt").read_text().count("stopped by signal at step") == 1


def test_a_signal_that_stopped_training_stays_pending_for_the_study():
    # a signal in a run's last step stopped nothing (the run was done) and was lost: the study went on
    from mapdit import signals
    from mapdit.stopping import StopRequest

    with signals.held():
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10  # a safety net: the handler runs at the next bytecode
            while stop.signal is None and time.monotonic() < deadline:
                time.sleep(0.001)
        assert signals.pending() == signal.SIGTERM
    assert signals.pending() is None  # outside the held block nothing is pending
