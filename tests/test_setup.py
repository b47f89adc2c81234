"""Set-up of a training run (mapdit.setup): the data fingerprint a resume checks, settings checked before any
rank joins, data that does not fit (labels, shape, less than a batch) refused in one line, and no run folder left
by a failure or a signal during set-up."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import FMNIST, RUN, TINY_ARGS, cli, needs_fmnist, only_error_line, tiny_model, tiny_train
from mapdit.data import load_dataset
from mapdit.errors import UserError
from mapdit.runio import list_checkpoints
from mapdit.setup import data_fingerprint
from mapdit.train import train


def _test_split_as_training_data(folder):
    """An IDX folder whose "train" files are Fashion-MNIST's 10,000 test images: same shape, other data."""
    folder.mkdir()
    for stem in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        (folder / f"train-{stem}").symlink_to(FMNIST / f"t10k-{stem}")
        (folder / f"t10k-{stem}").symlink_to(FMNIST / f"t10k-{stem}")
    return folder


@needs_fmnist
def test_fingerprint_tells_datasets_apart_and_is_stable(tmp_path):
    a = data_fingerprint(load_dataset("fashion-mnist", patch_size=4))
    assert a == data_fingerprint(load_dataset("fashion-mnist", patch_size=4))
    assert a["count"] == 60000 and a["shape"] == [1, 28, 28] and len(a["checksum"]) == 32
    b = data_fingerprint(load_dataset(str(_test_split_as_training_data(tmp_path / "t10k")), patch_size=4))
    assert b["count"] == 10000 and b["shape"] == a["shape"] and b["checksum"] != a["checksum"]


@needs_fmnist
def test_resume_refuses_other_data_unless_allowed(tmp_path, capsys):
    run = train(tiny_train(tmp_path, num_steps=2), tiny_model(), progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert saved["data_fingerprint"]["count"] == 60000
    other = _test_split_as_training_data(tmp_path / "other")

    with pytest.raises(UserError, match="is not the data the run was trained on"):
        train(tiny_train(tmp_path, num_steps=4, data_path=str(other)), None, resume=str(run))
    assert cli("train", "--resume", run, "--data-path", other, "--num-steps", 4) == 2
    line = only_error_line(capsys)
    assert "10000 items" in line and "60000 items" in line and "--allow-new-data" in line
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert json.loads((run / "config.json").read_text()) == saved  # its record untouched

    assert cli("train", "--resume", run, "--data-path", other, "--num-steps", 4, "--allow-new-data") == 0
    record = json.loads((run / "config.json").read_text())
    assert record["data_fingerprint"]["count"] == 10000
    assert record["data_history"] == [{"until_step": 2, "data": saved["data"],
                                       "data_fingerprint": saved["data_fingerprint"]}]
    assert "allow_new_data" not in record["train"]  # this invocation's, not the run's
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


@needs_fmnist
def test_a_run_recorded_without_a_fingerprint_resumes_as_before(tmp_path):
    run = train(tiny_train(tmp_path, num_steps=2), tiny_model(), progress=False)
    saved = json.loads((run / "config.json").read_text())
    del saved["data_fingerprint"]  # as written by mapdit before fingerprints
    (run / "config.json").write_text(json.dumps(saved))
    train(tiny_train(tmp_path, num_steps=3), None, resume=str(run), progress=False)
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert json.loads((run / "config.json").read_text())["data_fingerprint"]["count"] == 60000


@needs_fmnist
def test_batch_size_not_divisible_by_the_ranks_fails_before_joining_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 sets; no group is ever joined
    assert cli("train", *TINY_ARGS, "--results-dir", tmp_path) == 2
    assert "--global-batch-size 8 must be a positive multiple of the number of processes (3)" in \
        only_error_line(capsys)
    assert not torch.distributed.is_initialized()


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
def test_resume_with_latents_of_another_shape(run_copy, tmp_path, capsys):
    data = _latents(tmp_path / "lat")
    assert cli("train", "--resume", run_copy, "--data-path", data, "--num-steps", 6) == 2
    assert "does not match the run's model" in only_error_line(capsys)


def test_dataset_smaller_than_one_batch_leaves_no_run_folder(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name / "0.png")
    results = tmp_path / "R"
    assert cli("train", "--data-path", tmp_path / "img", "--model", "DiT-XXS/4", "--global-batch-size", 8,
               "--results-dir", results) == 2
    assert "fewer than one global batch" in only_error_line(capsys)
    assert not results.exists() or not list(results.iterdir())


def test_failure_or_signal_after_the_run_folder_exists_removes_it(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import mapdit.setup

    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(tmp_path / "img" / name / f"{i}.png")
    args = ["train", "--data-path", tmp_path / "img", "--model", "DiT-XXS/4", "--image-size", 8,
            "--global-batch-size", 2, "--num-steps", 2, "--ema-snapshots", 0, "--results-dir", tmp_path / "R"]
    real = mapdit.setup.DiT

    def failing(cfg):  # a failure while the model is built: after the run folder was made
        raise RuntimeError("a bug (simulated)")
    monkeypatch.setattr(mapdit.setup, "DiT", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        cli(*args)
    assert not list((tmp_path / "R").iterdir())

    def out_of_memory(cfg):  # the sizes asked for too much: one line (runio.environment_error), folder removed
        raise torch.cuda.OutOfMemoryError("out of memory (simulated)")
    monkeypatch.setattr(mapdit.setup, "DiT", out_of_memory)
    assert cli(*args) == 2
    assert "not enough memory" in capsys.readouterr().err
    assert not list((tmp_path / "R").iterdir())

    def signalled(cfg):  # SIGTERM while the model is built
        os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg)
    monkeypatch.setattr(mapdit.setup, "DiT", signalled)
    assert cli(*args) == 0
    err = capsys.readouterr().err
    assert "stopped by signal SIGTERM during set-up, before step 1: no run folder is kept" in err
    assert not list((tmp_path / "R").iterdir())
    monkeypatch.setattr(mapdit.setup, "DiT", real)
    assert cli(*args) == 0  # the next run takes the first number
    assert [p.name for p in (tmp_path / "R").iterdir()] == [RUN]
