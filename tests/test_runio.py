"""The run folder's files (mapdit.runio): atomic writes on a full disk or in an unwritable place (one line, exit
2, earlier files intact), race-free run folders, one trainer per run, metrics trimming, checkpoints that are
skipped and said on stderr, and pickles that are never unpickled.

A full disk is a file-size limit (RLIMIT_FSIZE; SIGXFSZ ignored, so writes fail with EFBIG) in a subprocess.
A read-only place is a read-only bind mount in a private mount namespace where that is allowed (root with
CAP_SYS_ADMIN), else a permission-less folder: for root, who ignores permission bits, as user nobody.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from helpers import (
    ENV,
    RUN,
    TINY_ARGS,
    cli,
    needs_fmnist,
    only_error_line,
    plant_pickle,
    snapshot_files,
    temporaries,
    tree,
)
from mapdit.run_writer import METRIC_FIELDS
from mapdit.runio import (
    checkpoint_path,
    create_run_dir,
    list_checkpoints,
    load_tensors,
    run_lock,
    run_to_resume,
    trim_metrics,
    verify_checkpoint,
)

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


# ------------------------------------------------------------------------------------------------
# finding runs and making run folders: race-free, one trainer per run
# ------------------------------------------------------------------------------------------------
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
# a full disk on every write path: one line, exit 2, earlier files intact, no temporary files
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
# unwritable places: one line, exit 2; reading a read-only run writes nothing
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


# ------------------------------------------------------------------------------------------------
# skipped and unsafe checkpoints: said on stderr, never unpickled
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


@needs_fmnist
def test_malicious_pickle_named_like_a_checkpoint_is_not_executed(run_copy, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = checkpoint_path(run_copy, 9)
    plant_pickle(evil, marker, step=9)
    plant_pickle(run_copy / "ema" / "sigma-0.050" / "step-0000009.safetensors", marker)

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
