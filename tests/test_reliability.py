"""Reliability (issue 8): crash-safe training, exact resume, one-line errors for user mistakes, safe loading.

Runs are tiny (DiT-XXS/4 on Fashion-MNIST 28x28, batch 8, a handful of steps). Subprocesses get
OMP_NUM_THREADS=1 so a killed-and-resumed run and an uninterrupted one compute bit-identical results.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    ENV,
    RUN,
    TINY_ARGS,
    assert_same_tensors,
    cli,
    error_line,
    free_port,
    needs_fmnist,
    only_error_line,
    read_metrics,
    snapshot_files,
    tiny_model,
    tiny_train,
)
from mapdit.errors import Diverged, UserError
from mapdit.run_writer import METRIC_FIELDS
from mapdit.runio import (
    checkpoint_path,
    create_run_dir,
    list_checkpoints,
    load_tensors,
    run_lock,
    run_to_resume,
    sha256_file,
    trim_metrics,
    verify_checkpoint,
)
from mapdit.train import train


# ------------------------------------------------------------------------------------------------
# helpers (the shared ones, and the tiny_run / run_copy fixtures, are in helpers.py and conftest.py)
# ------------------------------------------------------------------------------------------------
def steps_in_metrics(run: Path) -> list[int]:
    return [int(row["step"]) for row in read_metrics(run)]


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def train_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "mapdit.cli", "train", *[str(a) for a in argv]]


def wait_for(condition, timeout=120.0, proc=None, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------------
# 1. crash safety: kill -9 anywhere, resume, same result
# ------------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.slow
def test_run_to_resume_is_the_newest_started_run_or_none(tmp_path):
    """What the study and the benchmark scripts resume: None until a run has written its config.json,
    then the newest such run; a later folder stopped before its config does not hide it."""
    results = tmp_path / "runs"
    assert run_to_resume(results) is None  # no folder at all
    results.mkdir()
    (results / "000-DiT-XXS-4").mkdir()
    assert run_to_resume(results) is None  # started, stopped before its config
    for name in ("000-DiT-XXS-4", "001-DiT-XXS-4"):
        (results / name / "config.json").parent.mkdir(exist_ok=True)
        (results / name / "config.json").write_text("{}")
    (results / "002-DiT-XXS-4").mkdir()
    assert run_to_resume(results) == results / "001-DiT-XXS-4"


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    steps = 30
    args = [*TINY_ARGS, "--num-steps", steps, "--log-every", "2", "--ckpt-every", "3", "--ema-snapshots", "10"]
    subprocess.run(train_cmd(*args, "--results-dir", tmp_path / "ref"), check=True, env=ENV,
                   capture_output=True, timeout=300)
    ref = tmp_path / "ref" / RUN
    run = tmp_path / "kill" / RUN

    def reached() -> int:  # the newest step in metrics.csv (a row may be half written)
        try:
            return max([0] + [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]
                              if line.split(",")[0].isdigit()])
        except FileNotFoundError:
            return 0

    def checkpoints_done() -> int:
        return len(list((run / "checkpoints").glob("*.json")))

    kills = []  # (what, checkpoints on disk when killed)
    cmd = train_cmd(*args, "--results-dir", tmp_path / "kill")
    for attempt in range(3):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if attempt == 0:  # soon after the run folder is set up: the first steps, before any checkpoint
                wait_for(lambda: (run / "config.json").exists(), proc=proc, what="config.json")
                time.sleep(rng.uniform(0.0, 0.3))
            elif attempt == 1:  # right as a new checkpoint lands
                have = checkpoints_done()
                wait_for(lambda: checkpoints_done() > have, proc=proc, what="a new checkpoint")
            else:  # a random step of the resumed run, then a random moment within about a step
                target = rng.randint(reached() + 1, steps - 8)
                wait_for(lambda: reached() >= target, proc=proc, what=f"step {target}")
                time.sleep(rng.uniform(0.0, 0.1))
            assert proc.poll() is None, f"the run ended before kill {attempt} (seed {seed})"
            proc.send_signal(signal.SIGKILL)
            kills.append((attempt, [s for s, _ in list_checkpoints(run)]))
        finally:
            proc.kill()
            proc.wait(timeout=60)
        cmd = train_cmd("--resume", run)
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=300)

    why = f"seed {seed}, checkpoints at each kill {kills}"
    ref_ckpt, ckpt = list_checkpoints(ref)[-1], list_checkpoints(run)[-1]
    assert ckpt[0] == ref_ckpt[0] == steps, why
    assert_same_tensors(load_tensors(ref_ckpt[1]), load_tensors(ckpt[1]))
    ref_snaps, snaps = snapshot_files(ref), snapshot_files(run)
    assert [p.relative_to(ref) for p in ref_snaps] == [p.relative_to(run) for p in snaps], why
    for a, b in zip(ref_snaps, snaps):
        assert_same_tensors(load_tensors(a), load_tensors(b))
    assert steps_in_metrics(run) == steps_in_metrics(ref) == list(range(2, steps + 1, 2)), why
    assert not list(run.rglob(".*.tmp*")), why


# ------------------------------------------------------------------------------------------------
# 2. preemption: SIGTERM finishes the step, checkpoints, exits 0; --resume continues
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# 3. a damaged newest checkpoint: one line, fall back to the previous one
# ------------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "no-sidecar"])
def test_damaged_latest_checkpoint_is_reported_and_resume_falls_back(run_copy, capsys, damage):
    latest = checkpoint_path(run_copy, 4)
    original = {k: v.clone() for k, v in load_tensors(latest).items()}  # a copy: the file is memory-mapped
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip-a-byte":
        latest.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        latest.with_suffix(".json").unlink()
    assert cli("train", "--resume", run_copy) == 0  # the run's own length: 4 steps, so it redoes 3..4
    out, err = capsys.readouterr()
    # on stderr, as in sampling (issue 20, item 8)
    skipped = [line for line in err.splitlines() if "skipping checkpoint step-0000004.safetensors" in line]
    assert len(skipped) == 1 and "falling back to the previous one" in skipped[0], err
    assert "skipping checkpoint" not in out
    assert {"truncate": "truncated", "flip-a-byte": "checksum", "no-sidecar": "sidecar"}[damage] in skipped[0]
    assert f"resuming {run_copy} at step 2/4" in out
    assert skipped[0].split("] ", 1)[1] in (run_copy / "log.txt").read_text()
    assert verify_checkpoint(latest) is None
    assert_same_tensors(original, load_tensors(latest))  # redone exactly
    assert (latest.parent / (latest.name + ".broken")).exists()  # set aside, not deleted, never loaded
    assert steps_in_metrics(run_copy) == [2, 4]


# ------------------------------------------------------------------------------------------------
# 4. non-finite values
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the batches of those (0-based) steps become NaN, patched into the batch source."""
    import mapdit.step

    draw = mapdit.step.BatchSource.__call__

    def at(steps):
        def poisoned(self, step):
            batch = draw(self, step)
            if step in steps:
                batch.x = batch.x * float("nan")
            return batch
        monkeypatch.setattr(mapdit.step.BatchSource, "__call__", poisoned)
    return at


@needs_fmnist
@pytest.mark.parametrize("snapshots", [8, 0], ids=["caught-at-snapshot", "caught-at-checkpoint"])
def test_nan_stops_training_naming_the_step_and_the_last_good_checkpoint(tmp_path, poison, snapshots):
    tc = tiny_train(tmp_path, num_steps=8, ckpt_every=3, log_every=100, ema_snapshots=snapshots)
    poison({3})  # the 4th step (step 4) sees NaN
    with pytest.raises(Diverged) as info:  # a UserError (one line, exit 2) that experiments record as a result
        train(tc, tiny_model())
    message = str(info.value)
    assert isinstance(info.value, UserError) and info.value.step == 4
    assert pickle.loads(pickle.dumps(info.value)).step == 4  # as a study worker would hand it back
    assert "\n" not in message
    assert "non-finite loss or gradient at step 4" in message
    assert "last good checkpoint is step 3" in message
    run = tmp_path / RUN
    ckpts = list_checkpoints(run)
    assert [s for s, _ in ckpts] == [3]
    assert all_finite(load_tensors(ckpts[0][1]))
    for snap in snapshot_files(run):
        assert all_finite(load_tensors(snap)), snap
        assert int(snap.stem.split("-")[1]) <= 3


@needs_fmnist
def test_skip_nonfinite_completes_and_counts_the_skips(tmp_path, poison):
    poison({1, 4})
    run = train(tiny_train(tmp_path, num_steps=6, ckpt_every=3, skip_nonfinite=True), tiny_model())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [int(r["skipped"]) for r in rows] == [1, 1, 2]
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # no NaN averaged into a row
    for _, path in list_checkpoints(run):
        assert all_finite(load_tensors(path))
    assert json.loads(checkpoint_path(run, 6).with_suffix(".json").read_text())["skipped"] == 2
    assert "step 5: non-finite loss or gradient, step skipped (2 so far)" in (run / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------
# 5. never overwrite: race-free run folders, one trainer per run
# ------------------------------------------------------------------------------------------------
def test_concurrent_runs_get_different_folders(tmp_path):
    threads, per_thread = 8, 25
    start = threading.Barrier(threads)
    made: list[Path] = []
    lock = threading.Lock()

    def worker():
        start.wait()
        mine = [create_run_dir(tmp_path, "DiT-XXS/4") for _ in range(per_thread)]
        with lock:
            made.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(made) == len(set(made)) == threads * per_thread
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:03d}-DiT-XXS-4" for i in range(threads * per_thread)]


@needs_fmnist
def test_a_run_being_trained_cannot_be_resumed_twice(run_copy, capsys):
    with run_lock(run_copy):
        assert cli("train", "--resume", run_copy, "--num-steps", 6) == 2
    assert "is being trained by process" in only_error_line(capsys)
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4]


def test_trim_metrics_drops_rows_after_the_checkpoint_and_partial_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [",".join(METRIC_FIELDS)] + [",".join([str(s)] + ["1"] * (len(METRIC_FIELDS) - 1)) for s in (2, 4, 6)]
    path.write_text("\n".join(rows) + "\n1")  # the last row was cut short by a kill
    assert trim_metrics(path, METRIC_FIELDS, 4) == 2
    with open(path, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]


# ------------------------------------------------------------------------------------------------
# 6. user mistakes: one line on stderr, exit code 2, nothing written
# ------------------------------------------------------------------------------------------------
# the one-line option mistakes (test_bad_options_give_one_line_and_exit_code_2): moved to test_cli.py


@needs_fmnist
def test_batch_size_not_divisible_by_the_ranks_fails_before_joining_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 sets; no group is ever joined
    assert cli("train", *TINY_ARGS, "--results-dir", tmp_path) == 2
    assert "--global-batch-size 8 must be a positive multiple of the number of processes (3)" in \
        only_error_line(capsys)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("layout", ["missing", "empty", "empty-class-folders"])
def test_missing_or_empty_data_path(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "empty-class-folders":
        (data / "cats").mkdir()
        (data / "dogs").mkdir()
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    expected = {"missing": "does not exist", "empty": "holds no class subfolders",
                "empty-class-folders": "no readable image"}[layout]
    assert expected in only_error_line(capsys)
    assert not list((tmp_path / "R").glob("*-DiT-*"))


def _image_folder(root: Path, bad: bool) -> Path:
    from PIL import Image

    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (60 * i, 90 * c, 20)).save(root / name / f"{i}.png")
    if bad:
        (root / "a" / "notes.png").write_bytes(b"this is not an image")
        good = (root / "b" / "0.png").read_bytes()
        (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    return root


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    data = _image_folder(tmp_path / "images", bad=True)
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--num-steps", 1, "--global-batch-size", 2,
               "--ema-snapshots", 0, "--results-dir", tmp_path / "R") == 0
    run = tmp_path / "R" / RUN
    assert "skipped 2 unreadable image file(s)" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["data"]["skipped"] == 2
    assert json.loads((run / "config.json").read_text())["data"]["num_images"] == 6


def test_only_unreadable_images_is_one_line(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "x.jpg").write_bytes(b"\xff\xd8 broken")
    assert cli("train", "--data-path", tmp_path / "images", "--model", "DiT-XXS/4",
               "--results-dir", tmp_path / "R") == 2
    assert "no readable image" in only_error_line(capsys)


def _latents(root: Path, num_classes_listed: int | None = None) -> Path:
    from mapdit.data.latents import synthetic_latents

    out = synthetic_latents(root, num_items=16, latent_shape=(4, 8, 8), num_classes=10)
    if num_classes_listed is not None:  # the class list says fewer classes than the labels use
        index = json.loads((out / "latents.json").read_text())
        index["class_names"] = index["class_names"][:num_classes_listed]
        (out / "latents.json").write_text(json.dumps(index))
    return out


def test_dataset_label_out_of_range(tmp_path, capsys):
    data = _latents(tmp_path / "lat", num_classes_listed=3)
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    line = only_error_line(capsys)
    assert "class labels 0..9 but 3 classes" in line
    assert not list((tmp_path / "R").glob("*-DiT-*"))


@needs_fmnist
@pytest.mark.parametrize("label", [10, -1])
def test_sample_class_label_out_of_range(tiny_run, tmp_path, capsys, label):
    assert cli("sample", "--result-dir", tiny_run, "--class-label", label, "--steps", 2,
               "--out", tmp_path / "x.png") == 2
    assert f"--class-label {label} is out of range" in error_line(capsys, "sample")
    assert not (tmp_path / "x.png").exists()


# test_sample_contradictions: moved to test_cli.py


@needs_fmnist
@pytest.mark.parametrize("argv, expected", [
    (["--model", "DiT-S/2"], "--model DiT-S/2 (the run is DiT-XXS/4)"),
    (["--config", "A"], "--config gives cosine_attention=False (the run has True)"),
    (["--modulation", "scale"], "--modulation gives modulation=scale+gate (the run has adaln)"),
    (["--global-batch-size", "16"], "--global-batch-size 16 (the run has 8)"),
    (["--ema-stds", "0.07"], "--ema-std [0.07] (the run has [0.05, 0.1])"),  # the old spelling is an alias
    (["--min-snr-gamma", "5"], "--min-snr-gamma 5.0 (the run has None)"),
])
def test_resume_with_contradicting_options(run_copy, capsys, argv, expected):
    before = sorted(p.name for p in run_copy.rglob("*"))
    assert cli("train", "--resume", run_copy, *argv) == 2
    line = only_error_line(capsys)
    assert expected in line and "start a new run without --resume" in line
    assert sorted(p.name for p in run_copy.rglob("*")) == before


@needs_fmnist
def test_resume_with_agreeing_model_flags_is_fine(run_copy):
    assert cli("train", "--resume", run_copy, "--model", "DiT-XXS/4", "--config", "E", "--num-steps", 5) == 0
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4, 5]


# test_checkpoint_of_another_model_is_one_line: moved to test_cli.py (a checkpoint of another run)


@needs_fmnist
def test_resume_with_latents_of_another_shape(run_copy, tmp_path, capsys):
    data = _latents(tmp_path / "lat")
    assert cli("train", "--resume", run_copy, "--data-path", data, "--num-steps", 6) == 2
    assert "does not match the run's model" in only_error_line(capsys)


@needs_fmnist
def test_ema_width_the_snapshots_cannot_express(tiny_run, capsys):
    assert cli("ema", "--result-dir", tiny_run, "--std", 0.25) == 2
    assert "is not expressible from the snapshots" in only_error_line(capsys, "ema")
    assert cli("sample", "--result-dir", tiny_run, "--ema-std", 0.25, "--steps", 2) == 2
    assert "is not expressible from the snapshots" in error_line(capsys, "sample")


# ------------------------------------------------------------------------------------------------
# full disk: the previous checkpoint stays intact
# ------------------------------------------------------------------------------------------------
def _enospc_writer(real, should_fail):
    def write(tensors, filename, metadata=None):
        if should_fail(metadata or {}):
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)
    return write


@needs_fmnist
@pytest.mark.parametrize("writer", ["checkpoint", "snapshot"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, writer):
    import mapdit.ema
    import mapdit.runio

    if writer == "checkpoint":
        monkeypatch.setattr(mapdit.runio, "save_file", _enospc_writer(
            mapdit.runio.save_file, lambda meta: meta.get("format") == "mapdit-checkpoint-1" and meta["step"] == "4"))
    else:
        monkeypatch.setattr(mapdit.ema, "save_file", _enospc_writer(
            mapdit.ema.save_file, lambda meta: meta.get("step") == "3"))
    assert cli("train", *TINY_ARGS, "--num-steps", 6, "--ckpt-every", 2, "--log-every", 2, "--ema-snapshots", 6,
               "--results-dir", tmp_path) == 2
    line = error_line(capsys)
    assert "disk full while writing" in line and "free space and resume" in line
    run = tmp_path / RUN
    good = 2
    assert f"the last good checkpoint is step {good}" in line
    assert [s for s, _ in list_checkpoints(run)] == [good]
    assert verify_checkpoint(checkpoint_path(run, good)) is None
    assert not list(run.rglob(".*.tmp*")) and not list(run.rglob("*.tmp-*"))
    monkeypatch.undo()
    assert cli("train", "--resume", run) == 0  # free space, resume
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]


# ------------------------------------------------------------------------------------------------
# 7. safe loading: a pickle where a checkpoint belongs is never unpickled
# ------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, step: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    if step is not None:  # a sidecar that matches: size and checksum are right, only the format is not
        path.with_suffix(".json").write_text(json.dumps(
            {"step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path), "param_groups": []}))


@needs_fmnist
def test_malicious_pickle_named_like_a_checkpoint_is_not_executed(run_copy, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = checkpoint_path(run_copy, 9)
    _plant(evil, marker, step=9)
    _plant(run_copy / "ema" / "sigma-0.050" / "step-0000009.safetensors", marker)

    # sampling skips it (one line) and uses step 4
    assert cli("sample", "--result-dir", run_copy, "--class-label", 0, "--num-samples", 1, "--steps", 2,
               "--weights", "raw", "--out", tmp_path / "s.png") == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step-0000009.safetensors: not a safetensors file" in err
    assert not marker.exists()
    # naming it explicitly: one line
    assert cli("sample", "--result-dir", run_copy, "--ckpt", evil, "--steps", 2) == 2
    assert "not a safetensors file" in only_error_line(capsys, "sample")
    # a planted EMA snapshot: one line
    assert cli("ema", "--result-dir", run_copy, "--std", 0.08) == 2
    assert "is not a readable EMA snapshot" in only_error_line(capsys, "ema")
    # resuming falls back to step 4 and sets the file aside
    assert cli("train", "--resume", run_copy, "--num-steps", 5) == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint step-0000009.safetensors: not a safetensors file" in err
    assert f"resuming {run_copy} at step 4/5" in out
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4, 5]
    assert not marker.exists()


def test_load_dit_checkpoint_refuses_code_in_pickles(tmp_path):
    from mapdit.model import load_dit_checkpoint

    marker = tmp_path / "MARKER"
    torch.save({"model": _Evil(marker)}, tmp_path / "evil.pt")  # torch's zip format
    _plant(tmp_path / "evil.pkl", marker)  # a bare pickle
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(Exception):
            load_dit_checkpoint(str(tmp_path / name))
        assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# 8. one rank fails under torchrun: the whole job ends, with that rank's error, in bounded time
# ------------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.slow
def test_a_failing_rank_ends_the_torchrun_job(tmp_path):
    env = {**ENV, "MAPDIT_DIST_TIMEOUT_S": "60"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                          str(Path(__file__).with_name("failing_rank.py")), "1", "2", "train",
                          *TINY_ARGS, "--num-steps", "50", "--ema-snapshots", "0", "--results-dir", tmp_path],
                         env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "mapdit train: error: rank 1 failed at step 2 on purpose" in out.stdout + out.stderr
    assert elapsed < 120
    assert not list_checkpoints(tmp_path / RUN)
