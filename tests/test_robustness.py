"""Robustness (issue 20): the README's "mistakes end with one line on stderr and exit code 2; nothing is lost",
tried on full disks, read-only places, non-finite options, damaged config.json files, bad labels, concurrent
outputs, runs stopped during set-up, and where warnings go. One test per item of the issue.

A full disk is a file-size limit (RLIMIT_FSIZE; SIGXFSZ ignored, so writes fail with EFBIG) in a subprocess.
A read-only place is a read-only bind mount in a private mount namespace where that is allowed (root with
CAP_SYS_ADMIN), else a permission-less folder: for root, who ignores permission bits, as user nobody.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ENV, FMNIST, RUN, TINY_ARGS, cli, needs_fmnist, only_error_line, snapshot_files
from mapdit import signals
from mapdit.runio import checkpoint_path, list_checkpoints, load_tensors, verify_checkpoint
from mapdit.sample import save_png

# Runs `mapdit` commands in one process (one torch import for all), each under its own file-size limit
# (0: none), and prints [{rc, err, out}, ...] as JSON. SIGXFSZ is ignored, as Python does by default.
CLI_SCRIPT = r"""
import contextlib, io, json, resource, signal, sys, traceback
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from mapdit.cli import main
results = []
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for limit, argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit or hard, hard))
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc(file=err)
            rc = "traceback"
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    results.append({"rc": rc, "err": err.getvalue(), "out": out.getvalue()})
print(json.dumps(results))
"""


def run_cli_calls(calls: list[tuple[int, list]], prefix: list[str] = (), timeout: float = 1800, **popen) -> list[dict]:
    """Run `mapdit` argvs in one subprocess (see CLI_SCRIPT); each call: (file-size limit in bytes, argv)."""
    payload = json.dumps([(limit, [str(a) for a in argv]) for limit, argv in calls])
    proc = subprocess.run([*prefix, sys.executable, "-c", CLI_SCRIPT, payload], env=popen.pop("env", ENV),
                          capture_output=True, text=True, timeout=timeout, **popen)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_error(result: dict, command: str) -> str:
    """Exit code 2 and exactly one error line on stderr (progress-bar redraws aside), never a traceback."""
    assert result["rc"] == 2, result
    assert "Traceback" not in result["err"], result["err"]
    lines = [line for line in result["err"].replace("\r", "\n").splitlines()
             if line.startswith(f"mapdit {command}: error:")]
    assert len(lines) == 1, result["err"]
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root with its content: to show nothing was lost, changed or left half-written."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------
# 1. full disk on every write path: one line, exit 2, earlier files intact, no temporary files
# ------------------------------------------------------------------------------------------------
@needs_fmnist
def test_full_disk_on_every_write_path_is_one_line_and_keeps_earlier_files(run_copy, tmp_path):
    before = tree(run_copy)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s.npz").write_bytes(b"an earlier result")
    calls = [
        # checkpoint (~30 MB) over the limit; the EMA snapshots (~3 MB) and small files fit
        (8 << 20, ["train", "--resume", run_copy, "--num-steps", 6]),
        # EMA snapshot over the limit
        (1 << 20, ["train", "--resume", run_copy, "--num-steps", 6]),
        # post-hoc EMA, into the run's cache and to --out
        (1 << 20, ["ema", "--result-dir", run_copy, "--std", 0.08]),
        (1 << 20, ["ema", "--result-dir", run_copy, "--std", 0.08, "--out", tmp_path / "out" / "e.safetensors"]),
        # samples: npz and png (the earlier s.npz must stay as it was)
        (100, ["sample", "--result-dir", run_copy, "--weights", "raw", "--steps", 2, "--num-samples", 2,
               "--out", tmp_path / "out" / "s.npz"]),
        (100, ["sample", "--result-dir", run_copy, "--weights", "raw", "--steps", 2, "--num-samples", 1,
               "--class-label", 0, "--out", tmp_path / "out" / "g.png"]),
        # metrics.csv and config.json, rewritten when a resume starts
        (200, ["train", "--resume", run_copy, "--num-steps", 6]),
    ]
    results = run_cli_calls(calls)
    for (limit, argv), result in zip(calls, results):
        line = one_error(result, argv[0])
        assert "disk full while writing" in line, (argv, line)
    lines = [one_error(r, argv[0]) for (_, argv), r in zip(calls, results)]
    assert "checkpoints/step-0000006.safetensors" in lines[0] and "last good checkpoint is step 4" in lines[0]
    assert "free space and resume" in lines[0]
    assert "ema/sigma-0.050/step-0000005.safetensors" in lines[1]
    assert "ema/posthoc/sigma-0.08" in lines[2] and "e.safetensors" in lines[3]  # sigma-0.08-step-N (a48a536)
    assert "s.npz" in lines[4] and "g.png" in lines[5]
    assert "metrics.csv" in lines[6] or "config.json" in lines[6]

    # nothing lost: the checkpoints and snapshots of the run are as they were and verify
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4]
    for step in (2, 4):
        assert verify_checkpoint(checkpoint_path(run_copy, step)) is None
        assert tree(run_copy)[f"checkpoints/step-{step:07d}.safetensors"] == before[
            f"checkpoints/step-{step:07d}.safetensors"]
    for path in snapshot_files(run_copy):  # complete files only (the resumes redid steps 5.. and failed)
        load_tensors(path)
    assert (tmp_path / "out" / "s.npz").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.npz"]
    assert not temporaries(run_copy) and not temporaries(tmp_path / "out")
    assert not (run_copy / "ema" / "posthoc").exists() or not list((run_copy / "ema" / "posthoc").iterdir())

    # prepared latents and eval JSON go through the same writer: a DiskFullError (one line in the CLI)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from mapdit.data.latents import synthetic_latents\n"
        "from mapdit.runio import DiskFullError, write_json\n"
        f"out = {str(tmp_path / 'lat')!r}\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "for write in (lambda: synthetic_latents(out, num_items=64, latent_shape=(4, 8, 8)),\n"
        "              lambda: write_json(out + '/eval.json', {'x': list(range(5000))})):\n"
        "    try:\n"
        "        write()\n"
        "        print('written')\n"
        "    except DiskFullError as err:\n"
        "        print('disk full:', err)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.count("disk full: disk full while writing") == 2, proc.stdout
    assert not temporaries(tmp_path / "lat")

    # free space, resume: the run goes on from its last good checkpoint
    assert cli("train", "--resume", run_copy, "--num-steps", 6) == 0
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4, 6]


# ------------------------------------------------------------------------------------------------
# 2. unwritable places: one line, exit 2; reading a read-only run writes nothing
# ------------------------------------------------------------------------------------------------
def _mount_works(folder: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0"'
                            ' && ! touch "$0/.probe" 2>/dev/null', str(folder)], capture_output=True)
    return probe.returncode == 0 and not (folder / ".probe").exists()


def _read_only(ro: Path) -> tuple[list[str], dict, str]:
    """How to run a subprocess for which `ro` cannot be written: (command prefix, Popen options, how)."""
    if _mount_works(ro):  # a read-only bind mount, private to the subprocess
        return (["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && '
                 'exec "$@"', str(ro)], {}, "read-only mount")
    for p in [ro, *ro.rglob("*")]:  # world-readable, writable by nobody (the owner is not root here)
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.geteuid() != 0:
        return [], {}, "no write permission"

    def drop_privileges():  # root ignores permission bits: run as nobody
        os.setgid(65534)
        os.setuid(65534)
    return [], {"preexec_fn": drop_privileges}, "no write permission (as nobody)"


@needs_fmnist
def test_unwritable_places_are_one_line_and_a_read_only_run_can_be_read(tiny_run):
    base = Path(tempfile.mkdtemp(prefix="mapdit-ro-"))  # not under pytest's 0700 folder: nobody must read it
    try:
        base.chmod(0o755)
        ro, rw = base / "ro", base / "rw"
        run = Path(shutil.copytree(tiny_run, ro / "runs" / RUN))
        (ro / "results").mkdir()
        rw.mkdir()
        rw.chmod(0o777)
        before = tree(ro)
        prefix, popen, how = _read_only(ro)
        calls = [
            (0, ["train", *TINY_ARGS, "--num-steps", 1, "--results-dir", ro / "results"]),
            (0, ["sample", "--result-dir", run, "--steps", 2, "--out", ro / "x.png"]),
            (0, ["sample", "--result-dir", run, "--steps", 2]),  # default place: the run's samples/
            (0, ["ema", "--result-dir", run, "--std", 0.08]),
            (0, ["train", "--resume", run, "--num-steps", 6]),
            # reading the read-only run: a post-hoc EMA is used without caching, said in one line
            (0, ["sample", "--result-dir", run, "--ema-std", 0.08, "--steps", 2, "--class-label", 0,
                 "--num-samples", 1, "--out", rw / "s.png"]),
            (0, ["ema", "--result-dir", run, "--std", 0.08, "--out", rw / "e.safetensors"]),
        ]
        results = run_cli_calls(calls, prefix=prefix, env={**ENV, "HOME": str(rw)}, **popen)
        lines = [one_error(r, argv[0]) for (_, argv), r in zip(calls[:5], results[:5])]
        # checked while parsing since 1236c1d: "--results-dir DIR: DIR is not writable (...)"
        assert "--results-dir" in lines[0] and "is not writable" in lines[0], (how, lines[0])
        assert "--out" in lines[1] and "not writable" in lines[1], (how, lines[1])
        assert "samples folder" in lines[2] and "pass --out" in lines[2], (how, lines[2])
        assert "not writable" in lines[3] and "pass --out FILE" in lines[3], (how, lines[3])
        assert "cannot write into the run folder" in lines[4], (how, lines[4])
        sampled, reconstructed = results[5], results[6]
        assert sampled["rc"] == 0 and "Traceback" not in sampled["err"], (how, sampled)
        notes = [line for line in sampled["err"].splitlines() if "not cached: cannot write" in line]
        assert len(notes) == 1 and "ema/posthoc" in notes[0], (how, sampled["err"])
        assert (rw / "s.png").stat().st_size > 0
        assert reconstructed["rc"] == 0 and (rw / "e.safetensors").exists(), (how, reconstructed)
        assert tree(ro) == before, how  # nothing written, nothing changed
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# 3. every float option refuses NaN and infinities in one line: moved to test_cli.py


# ------------------------------------------------------------------------------------------------
# 4. config.json with values of the wrong type: one line naming the field
# ------------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.parametrize("section, key, value", [
    ("model", "num_classes", "ten"),
    ("model", "mp_silu", "yes"),
    ("model", "model", 5),
    ("train", "ema_stds", "0.05"),
    ("train", "lr", "fast"),
    ("train", "batch_size", 8.5),
])
def test_config_json_with_wrong_types_is_one_line_naming_the_field(run_copy, capsys, section, key, value):
    config = json.loads((run_copy / "config.json").read_text())
    config[section][key] = value
    (run_copy / "config.json").write_text(json.dumps(config))
    before = tree(run_copy)
    assert cli("sample", "--result-dir", run_copy, "--steps", 2) == 2
    line = only_error_line(capsys, "sample")
    assert f"config.json {section}: {key} is {json.dumps(value)}, not " in line, line
    assert cli("train", "--resume", run_copy, "--num-steps", 6) == 2
    assert f"{key} is {json.dumps(value)}" in only_error_line(capsys, "train")
    assert tree(run_copy) == before


def test_model_config_from_dict_checks_types():
    from mapdit.config import ModelConfig, make_config
    from mapdit.errors import UserError

    good = make_config("DiT-XXS/4", preset="E", input_size=28, in_channels=1, num_classes=10).to_dict()
    assert ModelConfig.from_dict(good).num_classes == 10
    for key, value in [("num_classes", "ten"), ("input_size", True), ("mlp_ratio", float("nan")),
                       ("learn_sigma", 1), ("preset", 3)]:
        with pytest.raises(UserError, match=f"config.json: {key} is "):
            ModelConfig.from_dict({**good, key: value}, where="R/config.json")


# ------------------------------------------------------------------------------------------------
# 5. labels outside the declared classes; a class folder without images
# ------------------------------------------------------------------------------------------------
@needs_fmnist
def test_idx_label_outside_the_ten_classes_is_one_line_naming_file_and_index(tmp_path, capsys):
    data = tmp_path / "fm"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).symlink_to(FMNIST / name)
    labels = bytearray(gzip.decompress((FMNIST / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 1234] = 200  # header 8 bytes, then one byte per label
    (data / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    line = only_error_line(capsys)
    assert "train-labels-idx1-ubyte: label 200 at index 1234 is outside the 10 classes" in line
    assert not (tmp_path / "R").exists() or not list((tmp_path / "R").iterdir())


def test_image_folder_with_an_empty_class_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "c"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / name / f"{i}.png")
    (tmp_path / "img" / "b").mkdir()
    (tmp_path / "img" / "b" / "broken.png").write_bytes(b"not an image")
    assert cli("train", "--data-path", tmp_path / "img", "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    line = only_error_line(capsys)
    assert f"class folder {tmp_path / 'img' / 'b'} has no readable image" in line
    assert not (tmp_path / "R").exists() or not list((tmp_path / "R").iterdir())


# ------------------------------------------------------------------------------------------------
# 6. concurrent outputs to one name: every file kept, each under its own name
# ------------------------------------------------------------------------------------------------
def test_concurrent_writes_to_one_name_keep_every_file(tmp_path):
    threads, per_thread = 8, 15
    start = threading.Barrier(threads)
    written: list[Path] = []
    lock = threading.Lock()

    def worker(k: int):
        start.wait()
        for i in range(per_thread):
            image = np.full((4, 4, 1), k * per_thread + i, dtype=np.uint8)  # a value per write
            path = save_png(tmp_path / "same.png", image, new=True)
            with lock:
                written.append((k * per_thread + i, path))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    paths = [p for _, p in written]
    assert len(set(paths)) == threads * per_thread  # no two writers were given the same name
    from PIL import Image

    for value, path in written:  # and each file holds what its writer wrote
        assert np.asarray(Image.open(path)).flat[0] == value
    assert len(list(tmp_path.iterdir())) == threads * per_thread and not temporaries(tmp_path)


@needs_fmnist
def test_concurrent_sample_commands_to_one_out_lose_nothing(tiny_run, tmp_path):
    out = tmp_path / "same.png"
    cmd = [sys.executable, "-m", "mapdit.cli", "sample", "--result-dir", str(tiny_run), "--weights", "raw",
           "--steps", "2", "--class-label", "0", "--num-samples", "1", "--out", str(out)]
    procs = [subprocess.Popen([*cmd, "--seed", str(k)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(3)]
    printed = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, stderr
        printed.append(stdout.strip().splitlines()[-1])
    assert sorted(printed) == sorted(str(p) for p in tmp_path.glob("same*.png")) and len(set(printed)) == 3


# ------------------------------------------------------------------------------------------------
# 7. stopped during set-up: nothing half-made left, SIGTERM exits 0 at any moment
# ------------------------------------------------------------------------------------------------
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
        raise torch.cuda.OutOfMemoryError("out of memory (simulated)")
    monkeypatch.setattr(mapdit.setup, "DiT", failing)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cli(*args)
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


# ------------------------------------------------------------------------------------------------
# 8. skipped and broken checkpoints are reported on stderr in training, as in sampling
# ------------------------------------------------------------------------------------------------
@needs_fmnist
def test_skipped_checkpoints_are_reported_on_stderr_in_training_and_sampling(run_copy, tmp_path, capsys):
    latest = checkpoint_path(run_copy, 4)
    latest.write_bytes(latest.read_bytes()[:1000])
    assert cli("sample", "--result-dir", run_copy, "--weights", "raw", "--steps", 2, "--class-label", 0,
               "--num-samples", 1, "--out", tmp_path / "s.png") == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint step-0000004.safetensors" in err and "skipping checkpoint" not in out
    assert cli("train", "--resume", run_copy) == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint step-0000004.safetensors" in err and "skipping checkpoint" not in out
    assert "set aside 1 damaged checkpoint(s)" in err
    assert (latest.parent / (latest.name + ".broken")).exists()


@pytest.mark.parametrize("exported, expected", [
    ({}, "PASSIVE"),  # mapdit's default: idle OpenMP threads sleep
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's value wins
    ({"GOMP_SPINCOUNT": "10000"}, None),  # so does a spin count: the policy stays unset for libgomp to apply it
])
def test_import_sets_the_openmp_wait_policy_unless_the_user_chose(exported, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, mapdit; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **exported}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(expected)
