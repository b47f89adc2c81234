"""Run folders and files on disk: atomic writes, numbered experiment folders, checkpoints, safe loading.

A run folder is the contract between training, sampling, post-hoc EMA and evaluation:

    results/003-DiT-S-2/
      config.json                      resolved model + training config and the dataset's description
      log.txt, metrics.csv             human log; one row per report (every --log-every steps)
      checkpoints/step-0000100.safetensors   model, EMA, optimizer, schedule (tensors only)
      checkpoints/step-0000100.json          step, size and sha256 of the .safetensors (written last)
      ema/sigma-0.050/step-0000100.safetensors   EMA snapshots for post-hoc reconstruction
      samples/, eval/                  grids, npz files, FID and magnitude results

Tensors are only ever read from safetensors and metadata from JSON: nothing here unpickles.
A checkpoint counts only when its JSON sidecar exists and the file's size and checksum match it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError

CHECKPOINT_RE = re.compile(r"step-(\d{7,})\.safetensors$")
_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write a file by `write(tmp_path)` into a temporary file beside `path`, fsync, then rename.

    A crash or a full disk at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == 28:  # ENOSPC
            raise UserError(f"disk full while writing {path}; the previous files are intact: free space "
                            "and resume") from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); is it the right file?") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); tensors are only loaded from "
                        "safetensors") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Experiment folders
# ------------------------------------------------------------------------------------------------
def create_run_dir(results_dir: str | Path, model_name: str) -> Path:
    """Make results_dir/NNN-<model>/ with the next free number. `mkdir` is atomic, so two runs started
    at once get different folders; an existing folder is never reused."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = model_name.replace("/", "-")
    while True:
        numbers = [int(m.group(1)) for p in results_dir.iterdir() if (m := re.match(r"(\d{3,})-", p.name))]
        path = results_dir / f"{max(numbers, default=-1) + 1:03d}-{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def latest_run_dir(results_dir: str | Path) -> Path:
    results_dir = Path(results_dir)
    runs = sorted((p for p in results_dir.glob("[0-9][0-9][0-9]*-*") if (p / "config.json").exists()),
                  key=lambda p: int(p.name.split("-")[0]))
    if not runs:
        raise UserError(f"no run folder with a config.json in {results_dir}: start a run without --resume first")
    return runs[-1]


def load_run_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass the folder a training run created "
                        "(e.g. results/000-DiT-S-2)")
    return read_json(run_dir / "config.json")


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
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        return "no sidecar .json (the write did not finish)"
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable sidecar .json"
    if not path.exists():
        return "file missing"
    if path.stat().st_size != meta.get("bytes"):
        return f"size {path.stat().st_size} != {meta.get('bytes')} recorded (truncated?)"
    if sha256_file(path) != meta.get("sha256"):
        return "checksum mismatch (corrupt)"
    return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.safetensors") if (m := CHECKPOINT_RE.search(p.name))]
    return sorted(found)


def find_resumable_checkpoint(run_dir: str | Path, log: Callable[[str], None] = print) -> tuple[int, Path] | None:
    """The newest intact checkpoint; every newer broken one is reported in one line and skipped."""
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return step, path
        log(f"skipping checkpoint {path.name}: {problem}; falling back to the previous one")
    return None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
