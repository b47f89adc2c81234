"""Caches keyed by what determines their content, inputs verified by content, no file replaced that a command
did not make (issue: results you can trust). Each test here failed on the code before the fix."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mapdit.experiments.fid_run as fid_run_mod
from helpers import ENV, cli, error_line, needs_installed_fmnist, snapshot_files
from mapdit.ema import save_snapshot
from mapdit.errors import UserError
from mapdit.evaluate.fid import get_extractor, reference_stats
from mapdit.evaluate.heldout import heldout_for_run
from mapdit.evaluate.magnitudes import attention_entropy_for_run
from mapdit.experiments.fid_run import fid_for_run
from mapdit.runio import load_tensors, save_checkpoint
from mapdit.weights import load_model, posthoc_ema

RUN_ID_FILE = "run-id"  # mapdit.ema.RUN_ID_FILE (spelled out so that this module imports on older code)
pytestmark = [pytest.mark.usefixtures("no_fmnist_override"), needs_installed_fmnist]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fid-stats")


def _fid_kw(cache):
    return dict(features="fmnist", ref="fashion-mnist", num_ref=100, steps=2, batch_size=8, cache_dir=cache,
                progress=False)


def _rewrite_checkpoint(run: Path, step: int, delta: float = 0.05) -> None:
    """Replace checkpoint `step` by one with other weights (what a resume that fell back and trained that step
    again, or another run of the same model, leaves): same name, step and format, other content."""
    path = run / "checkpoints" / f"step-{step:07d}.safetensors"
    tensors = load_tensors(path)
    tensors = {k: v + delta if v.is_floating_point() and k.startswith(("model.", "ema.")) else v
               for k, v in tensors.items()}
    meta = json.loads(path.with_suffix(".json").read_text())
    save_checkpoint(run, step, tensors, {k: v for k, v in meta.items() if k not in ("step", "bytes", "sha256")})


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------------------------------------ mapdit fid
def test_fid_samples_are_keyed_by_checkpoint_content(run_copy, tmp_path, cache):
    first = fid_for_run(run_copy, 16, **_fid_kw(cache))
    # another run's checkpoint at the same step: its own samples, not this run's
    other = Path(shutil.copytree(run_copy, tmp_path / "other"))
    _rewrite_checkpoint(other, 4)
    second = fid_for_run(run_copy, 16, ckpt=str(other / "checkpoints" / "step-0000004.safetensors"), **_fid_kw(cache))
    assert second["samples_reused"] is False and second["samples_npz"] != first["samples_npz"]
    assert second["value"] != first["value"]
    # the same checkpoint again: reused
    again = fid_for_run(run_copy, 16, **_fid_kw(cache))
    assert again["samples_reused"] is True and again["value"] == first["value"]
    # a resume that fell back and wrote step 4 again: what was derived from the old step 4 is not reused
    _rewrite_checkpoint(run_copy, 4, delta=0.02)
    rewritten = fid_for_run(run_copy, 16, **_fid_kw(cache))
    assert rewritten["samples_reused"] is False and rewritten["value"] not in (first["value"], second["value"])


def test_fid_damaged_samples_are_rebuilt_in_place(run_copy, cache):
    first = fid_for_run(run_copy, 16, write=False, **_fid_kw(cache))
    npz = Path(first["samples_npz"])
    npz.write_bytes(b"not an npz")
    again = fid_for_run(run_copy, 16, write=False, **_fid_kw(cache))
    assert again["samples_reused"] is False and again["samples_npz"] == str(npz)
    assert again["value"] == first["value"]
    assert sorted(p.name for p in (run_copy / "eval").glob("samples-*")) == [npz.name]  # never -1, -2, ...


def test_fid_result_appears_only_complete_and_temporaries_are_cleaned(run_copy, cache):
    # kill -9 (os._exit) while the result JSON's content is being made durable
    script = f"""
import os, sys
import mapdit.runio as runio
real = runio.os.fsync
def fsync(fd):
    if ".fid-" in os.readlink(f"/proc/self/fd/{{fd}}"):
        os._exit(137)
    real(fd)
runio.os.fsync = fsync
from mapdit.experiments.fid_run import fid_for_run
fid_for_run({str(run_copy)!r}, 16, features="fmnist", ref="fashion-mnist", num_ref=100, steps=2, batch_size=8,
            cache_dir={str(cache)!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    eval_dir = run_copy / "eval"
    assert list(eval_dir.glob("fid-*.json")) == []  # no name claimed before its content
    assert list(eval_dir.glob(".fid-*.tmp")) != []
    result = fid_for_run(run_copy, 16, **_fid_kw(cache))
    assert list(eval_dir.glob(".*.tmp")) == []  # what the killed process left is gone
    assert json.loads(Path(result["result_json"]).read_text())["value"] == result["value"]


def test_reference_is_checked_before_sampling(run_copy, cache, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before the reference was checked")
    monkeypatch.setattr(fid_run_mod, "sample_images", no_sampling)
    kw = {**_fid_kw(cache), "num_ref": None}
    with pytest.raises(UserError, match="does not exist"):
        fid_for_run(run_copy, 16, **{**kw, "ref": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="fewer than the 1000000"):
        fid_for_run(run_copy, 16, **{**kw, "num_ref": 1_000_000})
    with pytest.raises(UserError, match="bogus"):
        fid_for_run(run_copy, 16, **{**kw, "split": "bogus"})


def test_unwritable_statistics_cache_warns_once_and_computes_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where the cache folder should be: no cache can be made (even as root)
    said = []
    stats = reference_stats("fashion-mnist", get_extractor("fmnist"), blocker / "fid-stats", num_samples=50,
                            log=said.append)
    assert stats.count == 50 and stats.info["cached"] is False
    assert len(said) == 1 and said[0].startswith("warning:") and "in memory" in said[0], said
    reference_stats("fashion-mnist", get_extractor("fmnist"), blocker / "fid-stats", num_samples=50, log=said.append)
    assert len(said) == 1  # one warning, not one per score (training scores every --fd-every steps)


# ------------------------------------------------------------------------------------------------ held-out error
def test_heldout_cache_is_keyed_by_checkpoint_content(run_copy):
    before = heldout_for_run(run_copy, weights="raw", num_images=40)
    assert heldout_for_run(run_copy, weights="raw", num_images=40) == before
    _rewrite_checkpoint(run_copy, 4)
    after = heldout_for_run(run_copy, weights="raw", num_images=40)
    assert after["mse"] != before["mse"]
    assert len(list((run_copy / "eval").glob("heldout-raw-*.json"))) == 2


def test_attention_entropy_cache_is_keyed_by_checkpoint_content(run_copy):
    before = attention_entropy_for_run(run_copy, weights="raw", batch_size=4)
    assert attention_entropy_for_run(run_copy, weights="raw", batch_size=4) == before
    _rewrite_checkpoint(run_copy, 4, delta=0.2)
    assert attention_entropy_for_run(run_copy, weights="raw", batch_size=4) != before


def test_damaged_cache_files_are_rebuilt_not_fatal(run_copy):
    mse = heldout_for_run(run_copy, weights="raw", num_images=40)["mse"]
    entropy = attention_entropy_for_run(run_copy, weights="raw", batch_size=4)
    path, tensors = posthoc_ema(run_copy, 0.07, progress=False, log=lambda m: None)
    for cached in [*(run_copy / "eval").glob("heldout-*.json"), *(run_copy / "eval").glob("attention-*.json"), path]:
        cached.write_text("{")  # cut short
    assert heldout_for_run(run_copy, weights="raw", num_images=40)["mse"] == mse
    assert attention_entropy_for_run(run_copy, weights="raw", batch_size=4) == entropy
    again_path, again = posthoc_ema(run_copy, 0.07, progress=False, log=lambda m: None)
    assert again_path == path and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert len(list(path.parent.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ post-hoc EMA
def test_posthoc_cache_and_tracked_width_are_exact(run_copy):
    _, a = posthoc_ema(run_copy, 0.0751, progress=False, log=lambda m: None)
    _, b = posthoc_ema(run_copy, 0.0754, progress=False, log=lambda m: None)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # 0.0754 is not the cached 0.0751
    assert len(list((run_copy / "ema" / "posthoc").glob("*.safetensors"))) == 2
    tracked, _, desc = load_model(run_copy, ema_std=0.05, log=lambda m: None)
    near, _, near_desc = load_model(run_copy, ema_std=0.0504, log=lambda m: None)
    assert "tracked" in desc and "post-hoc" in near_desc and "0.0504" in near_desc
    assert not torch.equal(_params(tracked), _params(near))


def _resave(path: Path, change_tensors=None, drop_meta=()):
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in drop_meta}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        tensors = {k: change_tensors(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)


def test_non_finite_snapshot_is_named_and_nothing_is_cached(run_copy):
    bad = run_copy / "ema" / "sigma-0.100" / "step-0000003.safetensors"
    _resave(bad, lambda t: torch.full_like(t, float("nan")))
    with pytest.raises(UserError, match=str(bad)):
        posthoc_ema(run_copy, 0.07, progress=False, log=lambda m: None)
    assert list((run_copy / "ema" / "posthoc").glob("*.safetensors")) == []


def test_foreign_snapshot_is_refused_by_name_and_old_snapshots_still_work(run_copy, tmp_path):
    # a snapshot of another run of the same architecture, copied in under a name of this run
    mine = run_copy / "ema" / "sigma-0.050" / "step-0000003.safetensors"
    tensors = {k: v + 0.1 for k, v in load_tensors(mine).items()}
    foreign = save_snapshot(tmp_path / "other-run-ema", 0.05, 3, tensors)
    shutil.copy(foreign, mine)
    with pytest.raises(UserError, match=f"{mine}.*another run"):
        posthoc_ema(run_copy, 0.07, progress=False, log=lambda m: None)
    # snapshots written before they carried their run's identity are used as before
    shutil.copy(tmp_path / "other-run-ema" / "sigma-0.050" / "step-0000003.safetensors", mine)
    for path in snapshot_files(run_copy):
        _resave(path, drop_meta=("run_id",))
    (run_copy / "ema" / RUN_ID_FILE).unlink()
    path, _ = posthoc_ema(run_copy, 0.07, progress=False, log=lambda m: None)
    assert path.is_file()


def test_snapshots_carry_their_run_identity(tiny_run):
    ids = set()
    for path in snapshot_files(tiny_run):
        with safe_open(str(path), framework="pt") as f:
            ids.add(f.metadata().get("run_id"))
    assert ids == {(tiny_run / "ema" / RUN_ID_FILE).read_text().strip()}


# ------------------------------------------------------------------------------------------------ --out files
def test_ema_out_never_replaces_a_file_it_did_not_make(run_copy, tmp_path, capsys):
    newest = run_copy / "checkpoints" / "step-0000004.safetensors"
    before = newest.read_bytes()
    assert cli("ema", "--result-dir", run_copy, "--std", 0.07, "--out", newest) == 2
    assert "checkpoints/" in error_line(capsys, "ema")
    assert newest.read_bytes() == before
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert cli("ema", "--result-dir", run_copy, "--std", 0.07, "--out", other) == 2
    assert "exists" in error_line(capsys, "ema") and other.read_text() == "mine"
    out = tmp_path / "ema.safetensors"
    assert cli("ema", "--result-dir", run_copy, "--std", 0.07, "--out", out) == 0
    assert cli("ema", "--result-dir", run_copy, "--std", 0.08, "--out", out) == 0  # its own kind of file: fine
    capsys.readouterr()


def test_fmnist_classifier_out_is_checked_before_training(tmp_path, capsys, monkeypatch):
    import mapdit.evaluate.fmnist_classifier as fc

    def no_training(*a, **k):
        raise AssertionError("trained before --out was checked")
    monkeypatch.setattr(fc, "load_dataset", no_training)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"someone else's")
    assert cli("fmnist-classifier", "--out", taken, "--epochs", 1) == 2
    assert "exists" in error_line(capsys, "fmnist-classifier") and taken.read_bytes() == b"someone else's"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli("fmnist-classifier", "--out", blocker / "c.safetensors", "--epochs", 1) == 2
    assert str(blocker) in error_line(capsys, "fmnist-classifier")  # an unwritable place: one line, no training
    assert not os.path.exists(blocker / "c.safetensors")
