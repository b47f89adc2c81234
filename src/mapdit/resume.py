"""The resume policy: which run `--resume` continues, and which settings a resumed run may change.

`--resume` names a run folder (or "latest"); the run's own model and training settings are used, except what
RESUME_MAY_CHANGE lists; an option given again with another value is a one-line refusal, never ignored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from .config import CHOICE_KEYS, MP_OPTIONS, ModelConfig, TrainConfig, make_config
from .errors import UserError
from .runio import latest_run_dir, load_run_config

# What `--resume` may change (RESUME_MAY_CHANGE); every other training option (RESUME_MUST_MATCH) and every
# model option is the run's own: given again with another value it is a contradiction, never ignored.
RESUME_MAY_CHANGE = ("num_steps", "lr", "grad_clip", "skip_nonfinite", "log_every", "ckpt_every", "data_path",
                     "device", "compile", "results_dir")
RESUME_MUST_MATCH = ("batch_size", "seed", "warmup_steps", "decay_start", "ema_stds", "ema_snapshots",
                     "snapshot_dtype", "precision", "image_size", "hflip", "min_snr_gamma")
MODEL_FLAGS = ("model", "preset", "use_all_mp", *MP_OPTIONS, *CHOICE_KEYS)
_FLAG_NAMES = {"batch_size": "--global-batch-size", "seed": "--global-seed", "preset": "--config"}


def resolve_run_dir(results_dir: str | Path, resume: str) -> Path:
    """`--resume` names a run folder, or "latest": the newest run in results_dir."""
    return latest_run_dir(results_dir) if resume == "latest" else Path(resume)


def stored_train_config(saved: dict, run_dir: Path) -> TrainConfig:
    """The TrainConfig a run folder's config.json records."""
    doc = dict(saved["train"])
    unknown = set(doc) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"{run_dir / 'config.json'} has unknown training keys {sorted(unknown)}: was it written "
                        "by a newer mapdit?")
    for key in ("adam_betas", "ema_stds"):
        if key in doc:
            doc[key] = tuple(doc[key])
    return TrainConfig(**doc)


def resume_config(stored: TrainConfig, given: TrainConfig, run_dir: Path) -> TrainConfig:
    """The run's own settings with what a resume may change (RESUME_MAY_CHANGE) taken from `given`:
    num_steps, log_every, device and compile as given; data_path, lr, grad_clip and ckpt_every when given
    (not None); skip_nonfinite when either asks for it. Everything else stays the run's."""
    return dataclasses.replace(
        stored, num_steps=given.num_steps, log_every=given.log_every, device=given.device,
        compile=given.compile, results_dir=str(run_dir.parent), data_path=given.data_path or stored.data_path,
        lr=stored.lr if given.lr is None else given.lr,
        grad_clip=stored.grad_clip if given.grad_clip is None else given.grad_clip,
        ckpt_every=stored.ckpt_every if given.ckpt_every is None else given.ckpt_every,
        skip_nonfinite=given.skip_nonfinite or stored.skip_nonfinite)


def flag_name(dest: str) -> str:
    """The command-line name of an option, for messages: seed -> --global-seed, mp_silu -> --use-mp-silu."""
    if dest in MP_OPTIONS:
        return "--use-" + dest.replace("_", "-")
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def resume_settings(run_dir: Path, given: Mapping[str, object], tc: TrainConfig) -> TrainConfig:
    """The resume policy for options given by name (`given`: option -> value, only those the user gave; model
    options by the names of MODEL_FLAGS): a model option or a RESUME_MUST_MATCH option that asks for something
    else than the run has is a one-line UserError naming them. Returns `tc` with num_steps and log_every the
    run's own unless given; `train(tc, None, resume=run_dir)` then takes RESUME_MAY_CHANGE from it
    (`resume_config`)."""
    saved = load_run_config(run_dir)
    stored = stored_train_config(saved, run_dir)
    model = ModelConfig.from_dict(saved["model"])
    problems = []
    if "model" in given and given["model"] != model.model:
        problems.append(f"--model {given['model']} (the run is {model.model})")
    elif set(given) & set(MODEL_FLAGS):
        wanted = make_config(model.model, preset=given.get("preset"), use_all_mp=bool(given.get("use_all_mp")),
                             **{name: given.get(name) for name in MP_OPTIONS},
                             **{key: given.get(key) for key in CHOICE_KEYS}, input_size=model.input_size,
                             in_channels=model.in_channels, num_classes=model.num_classes)
        compare = set(given) & set(MP_OPTIONS + CHOICE_KEYS)
        if set(given) & {"preset", "use_all_mp"}:  # a preset names the whole set of MP options
            compare |= set(MP_OPTIONS)
        shown = " ".join(flag_name(k) for k in MODEL_FLAGS if k in given)
        for key in sorted(compare):
            if getattr(wanted, key) != getattr(model, key):
                problems.append(f"{shown} gives {key}={getattr(wanted, key)} (the run has {getattr(model, key)})")
    for key in RESUME_MUST_MATCH:
        if key not in given:
            continue
        mine, theirs = given[key], getattr(stored, key)
        if key == "ema_stds":
            mine, theirs = [float(v) for v in mine], [float(v) for v in theirs]
        if mine != theirs:
            problems.append(f"{flag_name(key)} {mine} (the run has {theirs})")
    if problems:
        raise UserError(f"--resume {run_dir} continues the run as it was trained, but {'; '.join(problems[:3])}: "
                        "drop these options, or start a new run without --resume")
    # options left out keep the run's own values (not the command's defaults)
    return dataclasses.replace(tc, num_steps=given.get("num_steps", stored.num_steps),
                               log_every=given.get("log_every", stored.log_every))
