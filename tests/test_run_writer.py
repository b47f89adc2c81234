"""The run folder training writes (mapdit.run_writer): --keep-last, disk use at start-up, the FD column,
metrics.png, TensorBoard, sample grids and outputs whose failure never stops training; resuming from the newest
intact checkpoint, non-finite values never written, a full disk while saving."""
from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

from helpers import (
    RUN,
    TINY_ARGS,
    all_finite,
    assert_same_tensors,
    cli,
    error_line,
    needs_fmnist,
    read_metrics,
    snapshot_files,
    steps_in_metrics,
    tiny_model,
    tiny_train,
    tree,
)
from mapdit.errors import Diverged, UserError
from mapdit.log import Logger
from mapdit.plots import plot_metrics, read_metrics_csv
from mapdit.run_writer import METRIC_FIELDS
from mapdit.runio import DiskFullError, checkpoint_path, list_checkpoints, load_tensors, verify_checkpoint
from mapdit.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_keep_last_keeps_the_newest_checkpoints_and_resume_goes_on(tmp_path):
    run = train(tiny_train(tmp_path, num_steps=5, ckpt_every=1, keep_last=2, ema_snapshots=0), tiny_model(),
                progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000004.json", "step-0000004.safetensors", "step-0000005.json", "step-0000005.safetensors"]
    log = (run / "log.txt").read_text()
    size = (run / "checkpoints" / "step-0000005.safetensors").stat().st_size
    disk = [line for line in log.splitlines() if "disk: " in line]
    assert len(disk) == 1 and f"{size / 1e6:.1f} MB per checkpoint, 5 over the run" in disk[0], disk
    assert "--keep-last 2 keeps 2" in disk[0]
    resumed = train(tiny_train(tmp_path, num_steps=7, ckpt_every=1, keep_last=2, ema_snapshots=0), None,
                    resume=str(run), progress=False)
    assert [s for s, _ in list_checkpoints(resumed)] == [6, 7]


@needs_fmnist
def test_keep_last_never_removes_the_checkpoints_a_study_chose(tmp_path):
    # checkpoints at 2, 4, 6 (every 2), 1 and 3 (chosen); --keep-last 1 keeps 6 and the chosen 1 and 3
    run = train(tiny_train(tmp_path, num_steps=6, ckpt_every=2, keep_last=1, ckpt_steps=(1, 3, 9), ema_snapshots=0),
                tiny_model(), progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [1, 3, 6]
    disk = [line for line in (run / "log.txt").read_text().splitlines() if "disk: " in line]
    assert len(disk) == 1 and "5 over the run (--keep-last 1 and the 2 chosen steps keep 3: " in disk[0], disk
    resumed = train(tiny_train(tmp_path, num_steps=8, ckpt_every=2, keep_last=1, ckpt_steps=(1, 3, 7),
                               ema_snapshots=0), None, resume=str(run), progress=False)
    assert [s for s, _ in list_checkpoints(resumed)] == [1, 3, 7, 8]


@needs_fmnist
def test_fd_column_plot_and_config_name_the_metric(tmp_path):
    assert METRIC_FIELDS[-1] == "fd"
    run = train(tiny_train(tmp_path), tiny_model(), progress=False)
    assert list(read_metrics(run)[0])[-1] == "fd"
    assert json.loads((run / "config.json").read_text())["fd_metric"] == "fd_fmnist"
    assert (run / "metrics.png").read_bytes()[:8] == PNG


def test_plot_reads_old_metrics_files_with_a_fid_column(tmp_path):
    old = tmp_path / "metrics.csv"  # as written before the column was named fd
    old.write_text("step,loss,mse,vb,lr,grad_norm,steps_per_s,images_per_s,skipped,elapsed_s,max_block_magnitude,fid\n"
                   "10,1.0,0.9,0.1,0.01,0.5,2,16,0,5.0,,\n20,0.8,0.7,0.1,0.01,0.4,2,16,0,10.0,,321.5\n")
    assert [r["fd"] for r in read_metrics_csv(old)] == ["", "321.5"]
    assert plot_metrics(old, tmp_path / "m.png", "FD_fmnist").read_bytes()[:8] == PNG


@pytest.mark.parametrize("damage", ["1,abc,0.9\n", "1,\0\"\n"])
def test_a_damaged_metrics_file_is_one_user_error_not_a_traceback(tmp_path, damage):
    # 'abc' as a loss (a hand edit) or a NUL byte: a traceback after training had finished; now a UserError,
    # which SideOutputs says once as a warning
    damaged = tmp_path / "metrics.csv"
    damaged.write_text("step,loss,mse\n" + damage)
    with pytest.raises(UserError, match="the metrics file .*metrics.csv cannot be read"):
        plot_metrics(damaged, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


@needs_fmnist
def test_failing_plot_and_grid_warn_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import mapdit.run_writer

    def full_disk(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.png")

    def unwritable_grid(*args, **kw):
        raise DiskFullError(Path(args[2]), "disk full while writing the grid")
    monkeypatch.setattr(mapdit.run_writer, "plot_metrics", full_disk)
    monkeypatch.setattr(mapdit.run_writer, "sample_grid_from_model", unwritable_grid)
    run = train(tiny_train(tmp_path, num_steps=4, ckpt_every=1, sample_every=1, ema_snapshots=0), tiny_model(),
                progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [1, 2, 3, 4]  # trained to the end
    err = capsys.readouterr().err
    assert err.count("warning: cannot write metrics.png") == 1, err
    assert err.count("warning: cannot write sample grids") == 1, err
    assert "training goes on without it" in err


@needs_fmnist
def test_training_grids_are_named_by_step_ema_width_sampler_and_guidance(tmp_path):
    run = train(tiny_train(tmp_path, num_steps=2, sample_every=2, ema_snapshots=0, ema_stds=(0.1, 0.05)),
                tiny_model(), progress=False)
    name = "train-step0000002-ema0.050-dpm++2m20-cfg4.png"  # the narrowest width, sample's default sampler
    assert [p.name for p in (run / "samples").iterdir()] == [name]
    assert (run / "samples" / name).read_bytes()[:8] == PNG
    assert f"step 2: sample grid {run / 'samples' / name}" in (run / "log.txt").read_text()


def test_an_unwritable_log_file_is_said_once_and_lines_still_reach_the_screen(tmp_path, capsys):
    (tmp_path / "log.txt").mkdir()  # a folder where the log file should be: every append fails
    log = Logger(tmp_path / "log.txt")
    log("first")
    log("second")
    out, err = capsys.readouterr()
    assert "first" in out and "second" in out
    assert err.count("cannot write") == 1 and "log lines go to the screen only" in err


@needs_fmnist
def test_tensorboard_missing_is_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    run = train(tiny_train(tmp_path, tensorboard=True), tiny_model(), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "tensorboard" in line]
    assert len(lines) == 1 and "pip install" in lines[0] and "training goes on without it" in lines[0], lines
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert not (run / "tensorboard").exists()


@needs_fmnist
def test_tensorboard_logs_the_metrics_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_train(tmp_path, tensorboard=True), tiny_model(), progress=False)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"loss", "mse", "lr", "grad_norm", "steps_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [int(r["step"]) for r in read_metrics(run)]
    assert json.loads((run / "config.json").read_text())["train"]["tensorboard"] is True


# ------------------------------------------------------------------------------------------------
# restore: a damaged newest checkpoint is said in one line, resume falls back
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



@needs_fmnist
@pytest.mark.parametrize("damage", ["truncate", "no-sidecar"])
def test_a_run_whose_checkpoints_are_all_damaged_is_left_as_it_is(run_copy, tmp_path, capsys, damage):
    """Starting again from step 0 would cut metrics.csv and remove the EMA snapshots: resume, sampling and
    magnitudes each say which checkpoints are damaged in one line and change nothing."""
    for _, path in list_checkpoints(run_copy):
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.with_suffix(".json").unlink()
    before = tree(run_copy)
    assert cli("train", "--resume", run_copy) == 2
    line = error_line(capsys)
    assert "no intact checkpoint" in line and "step-0000004.safetensors" in line and "step-0000002" in line, line
    assert "nothing was changed" in line
    assert tree(run_copy) == before
    assert cli("sample", "--run", run_copy, "--steps", 1, "--num-samples", 1, "--out", tmp_path / "s.png") == 2
    line = error_line(capsys, "sample")
    assert "no intact checkpoint" in line and "train first" not in line, line
    assert cli("magnitudes", "--run", run_copy, "--batch-size", 2) == 2
    assert "none of the 2 checkpoints" in error_line(capsys, "magnitudes")


# ------------------------------------------------------------------------------------------------
# non-finite values: never written; stop naming the step, or skip and count
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
# a full disk while saving: one line, the previous checkpoint intact
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


@needs_fmnist
def test_a_path_the_system_refuses_while_training_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                                capsys):
    import mapdit.runio

    real = mapdit.runio.save_file

    def refused(tensors, filename, metadata=None):  # e.g. a results folder whose full paths pass PATH_MAX
        if (metadata or {}).get("step") == "4":
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mapdit.runio, "save_file", refused)
    assert cli("train", *TINY_ARGS, "--num-steps", 4, "--ckpt-every", 2, "--ema-snapshots", 0,
               "--results-dir", tmp_path) == 2
    line = error_line(capsys)
    assert "file name too long" in line and "the last good checkpoint is step 2" in line, line
