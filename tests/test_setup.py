"""Set-up of a training run (mapdit.setup): the data fingerprint a resume checks (issue 29 point 3)."""
from __future__ import annotations

import json

import pytest

from helpers import FMNIST, cli, needs_fmnist, only_error_line, tiny_model, tiny_train
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
