"""Run folders and files on disk: atomic writes, numbered experiment folders, checkpoints, safe loading.

A run folder is the contract between training, sampling, post-hoc EMA and evaluation:

    results/003-DiT-S-2/
      config.json                      resolved model + training config and the dataset's description
      log.txt, metrics.csv             human log; one row per report (every --log-every steps)
      checkpoints/step-0000100.safetensors   model, EMA, optimizer, schedule (tensors only)
      checkpoints/step-0000100.json          step, size and sha256 of the .safetensors (written last)
      checkpoints/*.broken             newer checkpoints found damaged on resume, set aside (never loaded)
      ema/sigma-0.050/step-0000100.safetensors   EMA snapshots for post-hoc reconstruction
      samples/, eval/                  grids, npz files, FID and magnitude results

Tensors are only ever read from safetensors and metadata from JSON: nothing here unpickles.
A checkpoint counts only when its JSON sidecar exists, the file's size and checksum match it and its
header parses as safetensors. Every file here is written by `atomic_write` (temporary file, fsync, rename),
except log.txt and metrics.csv, which grow a line at a time; on resume metrics.csv is cut back to the
checkpoint's step (rewritten atomically), so a killed and resumed run has no duplicate rows.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import errno
import hashlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, TrainConfig, check_field_types
from .errors import UserError, reading, short_path

CHECKPOINT_RE = re.compile(r"step-(\d{7,})\.safetensors$")
# A full disk, a full quota, or a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so it shows as EFBIG)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A place the user may not write: a read-only mount, missing permission
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# A path the system refuses whatever the disk: a name over NAME_MAX/PATH_MAX, a loop of symbolic links
BAD_PATH = (errno.ENAMETOOLONG, errno.ELOOP)
_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------------
# Errors of the environment (full disk, read-only places): one line each, never a traceback
# ------------------------------------------------------------------------------------------------
class DiskFullError(UserError):
    """The disk (or quota, or file-size limit) filled up while writing `path`; files written before are intact."""

    def __init__(self, path: str | Path, message: str | None = None):
        self.path = Path(path)
        super().__init__(message or f"disk full while writing {path}; files written before are intact: free "
                                    "space and run the command again")


class NotWritableError(UserError):
    """`path` is on a read-only mount or in a folder this user may not write."""

    def __init__(self, path: str | Path, reason: str = "read-only or no permission"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path} ({reason}): choose a writable place")


def os_errno(err: BaseException) -> int | None:
    """The errno of an OSError, or of the OS error a SafetensorError wraps ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        m = re.search(r"os error (\d+)", str(err))
        return int(m.group(1)) if m else None
    return None


def out_of_memory(err: BaseException) -> bool:
    """Did an allocation fail (numpy's MemoryError, torch's CPU allocator or a GPU out of memory)? The
    sizes the user chose (batch, image size, model) are what asked for it."""
    return (isinstance(err, (MemoryError, torch.OutOfMemoryError))
            or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))


def environment_error(err: BaseException, path: str | Path | None = None, writing: bool = True) -> UserError | None:
    """The one-line UserError for an error of the environment (full disk, read-only place, no permission, not
    enough memory) met while writing `path` (default: the file the error names); None for any other error.
    `writing=False`: not known to be a write (the CLI's last resort), so a permission error is not called one."""
    if out_of_memory(err):
        said = " ".join(str(err).split("DefaultCPUAllocator:")[-1].split())  # torch's: after its source location
        return UserError(f"not enough memory for what was asked ({said}): use a smaller --batch-size, --image-size "
                         "or model, or a machine with more memory")
    code = os_errno(err)
    where = path if path is not None else (getattr(err, "filename", None) or "a file")
    if code in DISK_FULL:
        return DiskFullError(where)
    if code in BAD_PATH:  # writing: a NotWritableError like the others, which callers of a write expect
        reason = os.strerror(code).lower()
        return (NotWritableError(short_path(where), reason) if writing
                else UserError(f"{short_path(where)}: {reason}: choose another path"))
    if code in NOT_WRITABLE:
        if not writing:
            return UserError(f"{where}: {os.strerror(code).lower()} (a read-only place or no permission)")
        return NotWritableError(where, os.strerror(code).lower())
    return None


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[str], None], new: bool = False, only_name: bool = False) -> Path:
    """Write a file by `write(tmp_path)` into a temporary file beside `path`, fsync, then rename.

    A crash or a full disk at any moment leaves either the old file or the new one, never half of one.
    A full disk or an unwritable place becomes a one-line UserError naming `path`; the temporary file is
    removed. `new=True`: never replace a file; the result goes to the first free name of path, path-1,
    path-2, ... chosen race-free (a hard link fails if the name exists), which is returned; with `only_name`
    too, only `path` itself is tried (FileExistsError if it exists).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: `clean_temporaries` removes only what a dead process left
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if new:
            path = _link_to_free_name(tmp, path, [path] if only_name else None)
            Path(tmp).unlink(missing_ok=True)  # gone already where the name was taken by a rename
        else:
            os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, SafetensorError)) and (user := environment_error(err, path)) is not None:
            raise user from None
        raise
    fsync_dir(path.parent)
    return path


_TMP_PID = re.compile(r"\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def clean_temporaries(folder: str | Path, max_age_s: float = 3600.0) -> int:
    """Remove the temporary files of atomic writes that a killed process left in `folder` (kill -9 gives no
    chance to clean up): those whose writer (the pid in the name) is gone, and unnamed ones older than
    `max_age_s`. A live writer's file is left alone. Returns the number removed."""
    removed = 0
    now = time.time()
    for p in Path(folder).glob(".*.tmp"):
        m = _TMP_PID.search(p.name)
        try:
            if m is not None and _pid_alive(int(m.group(1))):
                continue
            if m is None and now - p.stat().st_mtime < max_age_s:
                continue
            p.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def write_new_json(path: str | Path, build: Callable[[Path], dict]) -> Path:
    """Write JSON that names its own file (`build(final_path)` gives the content) under the first free name of
    path, path-1, ...: written completely into a temporary file, then hard-linked to a name that does not exist
    (race-free), so a result file appears only complete and never replaces another."""
    path = Path(path)
    for candidate in free_names(path):
        if candidate.exists():
            continue
        text = json.dumps(build(candidate), indent=2) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)
        try:
            return atomic_write(candidate, write, new=True, only_name=True)
        except FileExistsError:
            continue  # taken meanwhile by another process: the content must name the next one
    raise UserError(f"too many files named like {path}")


def free_names(path: Path, limit: int = 10_000) -> Iterator[Path]:
    """path, path-1, path-2, ... (the candidates for a file that must not replace another)."""
    yield path
    for i in range(1, limit):
        yield path.with_name(f"{path.stem}-{i}{path.suffix}")


def _link_to_free_name(tmp: str, path: Path, names: list[Path] | None = None) -> Path:
    """Give the finished file `tmp` the first free name of `path`'s series. `os.link` fails if the name exists,
    so two processes never take the same one; where hard links are not supported, an O_EXCL placeholder
    reserves the name and the file replaces it."""
    for candidate in free_names(path) if names is None else names:
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
        try:  # no hard links here: reserve the name, then move the file onto the reservation
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        os.replace(tmp, candidate)
        return candidate
    if names is not None:
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    raise UserError(f"too many files named like {path}")


def check_writable(folder: str | Path, what: str, hint: str) -> Path:
    """Make sure files can be created in `folder` (made if missing) before any long work; else a one-line
    UserError: '<what> <folder> is not writable (<reason>): <hint>'. Leaves nothing behind."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFullError(folder, f"disk full: cannot create files in {what} {folder}: {hint}") from None
        reason = (err.strerror or str(err)).lower()
        raise UserError(f"{what} {folder} is not writable ({reason}): {hint}") from None
    return folder


def safetensors_format(path: str | Path) -> str | None:
    """The "format" metadata of a safetensors file (None if it has none or is not one)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def check_outside_training(path: str | Path, option: str = "--out") -> Path:
    """`path` must not be in a folder only training writes: a run's checkpoints/ or ema/sigma-*/ (a stray file
    there is listed as a checkpoint or snapshot). One-line UserError otherwise."""
    path = Path(path)
    parent = path.absolute().parent
    owned = ((parent.name == "checkpoints" and (parent.parent / "config.json").exists())
             or (parent.name.startswith("sigma-") and parent.parent.name == "ema"
                 and (parent.parent.parent / "config.json").exists()))
    if owned:
        where = "checkpoints/" if parent.name == "checkpoints" else f"ema/{parent.name}/"
        raise UserError(f"{option} {path} is inside a run's {where} folder, where only training writes: "
                        "choose another place")
    return path


def check_new_output(path: str | Path, option: str = "--out", own_format: str | None = None) -> Path:
    """A file a command is asked to write: it must not exist (a command replaces only files it made: with
    `own_format`, a safetensors file of that format may be replaced) and must not be inside a run's
    checkpoints/ (only training writes there); its folder must be writable. Checked before any long work;
    one-line UserError otherwise."""
    path = check_outside_training(path, option)
    parent = path.absolute().parent
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: name a file")
    if (path.exists() or path.is_symlink()) and (own_format is None or safetensors_format(path) != own_format):
        raise UserError(f"{option} {path} exists and was not made by this command: choose a new file name (or "
                        "delete it first)")
    check_writable(parent, f"the folder of {option}", f"choose a writable place for {option}")
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, new: bool = False) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write, new=new)


def write_json(path: str | Path, data, new: bool = False) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n", new=new)


def read_json(path: str | Path, what: str = "the JSON file") -> dict:
    path = Path(path)
    with reading(path, what):
        return json.loads(path.read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path, device: str = "cpu", what: str = "the safetensors file") -> dict[str, torch.Tensor]:
    with reading(path, what, "tensors are only loaded from safetensors"):
        return load_file(str(path), device=device)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    """12 hex digits of the sha256 of `parts` as sorted JSON: the name part of a cache file that changes
    whenever anything its content depends on does."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_identity(path: str | Path) -> str:
    """A checkpoint's content identity: the sha256 its sidecar records (checked against the file by
    `verify_checkpoint`), else the file's own. Unlike the step, it tells apart the checkpoints of two runs and a
    step rewritten by a resume that fell back."""
    try:
        sha = json.loads(Path(path).with_suffix(".json").read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        sha = None
    return sha if isinstance(sha, str) else sha256_file(path)


# ------------------------------------------------------------------------------------------------
# Experiment folders
# ------------------------------------------------------------------------------------------------
def create_run_dir(results_dir: str | Path, model_name: str) -> Path:
    """Make results_dir/NNN-<model>/ with the next free number. `mkdir` is atomic, so two runs started
    at once get different folders; an existing folder is never reused."""
    results_dir = Path(results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--results-dir {results_dir} is not a folder") from None
    except OSError as err:
        raise UserError(f"cannot create --results-dir {results_dir}: {err.strerror}") from None
    tag = model_name.replace("/", "-")
    while True:
        numbers = [int(m.group(1)) for p in results_dir.iterdir() if (m := re.match(r"(\d{3,})-", p.name))]
        path = results_dir / f"{max(numbers, default=-1) + 1:03d}-{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took this number between our listing and mkdir
            continue
        except OSError as err:
            raise UserError(f"cannot create a run folder in --results-dir {results_dir} "
                            f"({(err.strerror or str(err)).lower()}): choose a writable --results-dir") from None


def latest_run_dir(results_dir: str | Path) -> Path:
    results_dir = Path(results_dir)
    runs = sorted((p for p in results_dir.glob("[0-9][0-9][0-9]*-*") if (p / "config.json").exists()),
                  key=lambda p: int(p.name.split("-")[0]))
    if not runs:
        raise UserError(f"no run folder with a config.json in {results_dir}: start a run without --resume first")
    return runs[-1]


def run_to_resume(results_dir: str | Path) -> Path | None:
    """The run a script that trains into `results_dir` should resume: its newest run folder with a
    config.json, or None when there is none (nothing started, or stopped before its config was written)."""
    results_dir = Path(results_dir)
    return latest_run_dir(results_dir) if any(results_dir.glob("[0-9][0-9][0-9]*-*/config.json")) else None


def runs_in(folder: Path) -> list[Path]:
    """The run folders (a config.json inside) directly in `folder`, by number."""
    return sorted((p for p in folder.glob("[0-9][0-9][0-9]*-*") if (p / "config.json").is_file()),
                  key=lambda p: int(p.name.split("-")[0]))


def _listing(paths: list[Path], limit: int = 5) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[-limit:]) + (f" and {len(names) - limit} older" if len(names) > limit else "")


def check_run_folder(run_dir: str | Path, flag: str = "--run") -> Path:
    """`run_dir` must be a run folder (made by training, with its config.json); else one line saying what it
    is instead and what to pass: the results folder above runs (its runs listed), a checkpoint file (its
    run), a folder whose training stopped before it started, a name that does not exist (a close one)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        owner = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else None
        if owner is not None and (owner / "config.json").is_file():
            pick = "" if flag == "--resume" else f" (add --ckpt {run_dir.name} for this checkpoint)"
            raise UserError(f"{run_dir} is a checkpoint file, not a run folder: pass its run, {flag} {owner}{pick}")
        raise UserError(f"{run_dir} is a file, not a run folder: pass the folder a training run created "
                        "(e.g. results/000-DiT-S-2)")
    if not run_dir.is_dir():
        parent = run_dir.parent
        near = difflib.get_close_matches(run_dir.name, [p.name for p in runs_in(parent)], n=1) \
            if parent.is_dir() else []
        hint = f"did you mean {parent / near[0]}?" if near else \
            "pass the folder a training run created (e.g. results/000-DiT-S-2)"
        raise UserError(f"run folder {run_dir} does not exist: {hint}")
    if not (run_dir / "config.json").exists():
        inside = runs_in(run_dir)
        if inside:
            raise UserError(f"{run_dir} holds runs but is not one: pass one of them, e.g. {flag} {inside[-1]} "
                            f"(runs: {_listing(inside)})")
        if run_dir.name == "checkpoints" and (run_dir.parent / "config.json").is_file():
            raise UserError(f"{run_dir} is the checkpoints folder of a run: pass the run, {flag} {run_dir.parent}")
        if not re.match(r"\d{3,}-", run_dir.name):
            raise UserError(f"{run_dir} is not a run folder (no config.json, no runs inside): pass the folder a "
                            "training run created (e.g. results/000-DiT-S-2)")
        raise UserError(f"run folder {run_dir} has no config.json: its training was stopped before it started, "
                        "so there is nothing to resume or sample; start a new run")
    return run_dir


def load_run_config(run_dir: str | Path) -> dict:
    run_dir = check_run_folder(run_dir)
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "train")):
        raise UserError(f"{run_dir / 'config.json'} is not a mapdit run config (no model and train sections)")
    if not isinstance(config.get("data", {}), dict):
        raise UserError(f"{run_dir / 'config.json'}: data is {json.dumps(config['data'])}, not a JSON object")
    # every value of the model and training sections has the type its option has (one line naming the field)
    check_field_types(ModelConfig, config["model"], f"{run_dir / 'config.json'} model")
    check_field_types(TrainConfig, config["train"], f"{run_dir / 'config.json'} train")
    return config


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while training it: a second `--resume` of the same run
    fails at once instead of both writing into it. The kernel drops the lock when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(run_dir) / ".lock"
    try:
        f = open(path, "a+")
    except OSError as err:
        if environment_error(err, run_dir) is None:
            raise
        raise UserError(f"cannot write into the run folder {run_dir} ({(err.strerror or str(err)).lower()}): "
                        "training writes checkpoints there; copy the run to a writable place and resume the copy") \
            from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise UserError(f"{run_dir} is being trained by {holder}: wait for it to finish (or stop it) "
                                "before resuming") from None
            locked = False  # this filesystem has no locks (some NFS): go on without
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}")
            f.flush()
        try:
            yield
        finally:
            if locked:
                f.seek(0)
                f.truncate()
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------
# Resuming: cut the run back to the checkpoint it continues from
# ------------------------------------------------------------------------------------------------
def trim_metrics(path: str | Path, fields: list[str], max_step: int) -> int:
    """Keep the header and the well-formed rows with step <= max_step (rows after the checkpoint will be
    logged again; a row cut short by a kill is dropped). Rewritten atomically. Returns rows dropped."""
    path = Path(path)
    header, rows, dropped = list(fields), [], 0
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            found = next(reader, None)
            if found and found[0] == "step":
                header = found
            for row in reader:
                if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= max_step:
                    rows.append(row)
                else:
                    dropped += 1
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return dropped


def _step_of(name: str) -> int | None:
    m = re.search(r"step-(\d+)\.safetensors$", name)
    return int(m.group(1)) if m else None


def rewind_run(run_dir: str | Path, step: int) -> list[str]:
    """Remove what a killed run left beyond checkpoint `step`; returns one line per kind of thing removed.

    - temporary files of interrupted atomic writes (checkpoints/, ema/sigma-*/, the run folder);
    - EMA snapshots after `step` (an abandoned future; the resumed run writes its own) and post-hoc EMA
      results cached for steps after it;
    - checkpoints newer than `step` (they failed verification, or resume would have used them): renamed
      to *.broken, kept for inspection but never loaded.
    """
    run_dir = Path(run_dir)
    notes = []
    tmp = [p for folder in (run_dir, run_dir / "checkpoints", *run_dir.glob("ema/sigma-*"))
           for p in folder.glob(".*.tmp*") if p.is_file()]
    for p in tmp:
        p.unlink(missing_ok=True)
    if tmp:
        notes.append(f"removed {len(tmp)} temporary file(s) of interrupted writes")
    later = [p for p in (*run_dir.glob("ema/sigma-*/step-*.safetensors"), *run_dir.glob("ema/posthoc/*.safetensors"))
             if (s := _step_of(p.name)) is not None and s > step]
    for p in later:
        p.unlink(missing_ok=True)
    if later:
        notes.append(f"removed {len(later)} EMA file(s) after step {step}")
    broken = [p for s, p in list_checkpoints(run_dir) if s > step]
    for p in broken:
        os.replace(p, p.with_name(p.name + ".broken"))
        sidecar = p.with_suffix(".json")
        if sidecar.exists():
            os.replace(sidecar, sidecar.with_name(sidecar.name + ".broken"))
    if broken:
        notes.append(f"set aside {len(broken)} damaged checkpoint(s) after step {step} as *.broken")
    return notes


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}.safetensors"


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Tensors first, then the JSON sidecar with size and checksum: a checkpoint without a matching
    sidecar is incomplete and is never resumed from."""
    path = checkpoint_path(run_dir, step)
    save_tensors(path, tensors, metadata={"format": "mapdit-checkpoint-1", "step": str(step)})
    write_json(path.with_suffix(".json"), {**meta, "step": step, "bytes": path.stat().st_size,
                                           "sha256": sha256_file(path)})
    return path


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        return "no sidecar .json (the write did not finish)"
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return "unreadable sidecar .json"
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
        return "sidecar .json lacks the size and checksum"
    if not path.exists():
        return "file missing"
    if path.stat().st_size != meta["bytes"]:
        return f"size {path.stat().st_size} != {meta['bytes']} recorded (truncated?)"
    if sha256_file(path) != meta["sha256"]:
        return "checksum mismatch (corrupt)"
    try:  # reads only the JSON header: a file that is not safetensors (e.g. a pickle) is never opened as one
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        return f"not a safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.safetensors") if (m := CHECKPOINT_RE.search(p.name))]
    return sorted(found)


def find_resumable_checkpoint(run_dir: str | Path, remedy: str,
                              log: Callable[[str], None] = print) -> tuple[int, Path] | None:
    """The newest intact checkpoint, or None when the run has no checkpoint at all. Newer damaged ones are
    reported in one line each and skipped. When there are checkpoints but none is intact, a UserError names
    them and `remedy` (what the caller's user can do): a run's progress is never dropped without a word."""
    damaged = []
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            for line in damaged:
                log(f"skipping checkpoint {line}; falling back to the previous one")
            return step, path
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        said = "; ".join(damaged[:2]) + (f"; and {len(damaged) - 2} more" if len(damaged) > 2 else "")
        raise UserError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({said}): {remedy}")
    return None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
