"""The run folder training writes (mapdit.run_writer): --keep-last, disk use at start-up, the FD column,
metrics.png, TensorBoard, and outputs whose failure never stops training (issue 29 point 6)."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import needs_fmnist, read_metrics, tiny_model, tiny_train
from mapdit.log import Logger
from mapdit.plots import plot_metrics, read_metrics_csv
from mapdit.run_writer import METRIC_FIELDS
from mapdit.runio import DiskFullError, list_checkpoints
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
