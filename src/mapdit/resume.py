"""The resume policy: which run `--resume` continues, and which settings a resumed run may change.

`--resume` names a run folder (or "latest"). The policy is each option's declared `resume` (mapdit.options,
in mapdit.config): a "match" option (every model option, and the training settings that shape the run) keeps
the run's own value, and given again with another value it is a one-line refusal; an "apply" option given
on --resume is used from then on; a "never" option (device, compile) belongs to the invocation. No option is
ignored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from .config import MP_OPTIONS, ModelConfig, TrainConfig, make_config
from .errors import UserError
from .options import flag_of, options
from .runio import latest_run_dir, load_run_config

RESUME_MAY_CHANGE = tuple(o.name for o in options(TrainConfig) if o.resume == "apply")
RESUME_MUST_MATCH = tuple(o.name for o in options(TrainConfig) if o.resume == "match")
INVOCATION = tuple(o.name for o in options(TrainConfig) if o.resume == "never")  # not stored
MODEL_FLAGS = (*(o.name for o in options(ModelConfig)), "use_all_mp")
_TUPLES = tuple(o.name for o in options(TrainConfig) if o.is_tuple)


def resolve_run_dir(results_dir: str | Path, resume: str) -> Path:
    """`--resume` names a run folder, or "latest": the newest run in results_dir."""
    return latest_run_dir(results_dir) if resume == "latest" else Path(resume)


def stored_train_config(saved: dict, run_dir: Path) -> TrainConfig:
    """The TrainConfig a run folder's config.json records (the invocation's settings that older versions
    stored, device and compile, are left out: a resumed run takes them from its own invocation)."""
    doc = {k: v for k, v in saved["train"].items() if k not in INVOCATION}
    # older config.json files also kept the label dropout here; the one field is now the model's
    # class_dropout_prob (they were always equal: no option set either)
    old_dropout = doc.pop("label_dropout", None)
    if old_dropout is not None and old_dropout != saved["model"].get("class_dropout_prob", 0.1):
        raise UserError(f"{run_dir / 'config.json'} trains with label dropout {old_dropout} but its model's "
                        f"class_dropout_prob is {saved['model'].get('class_dropout_prob')}: this mapdit cannot "
                        "continue such a run")
    unknown = set(doc) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"{run_dir / 'config.json'} has unknown training keys {sorted(unknown)}: was it written "
                        "by a newer mapdit?")
    for key in _TUPLES:
        if doc.get(key) is not None:
            doc[key] = tuple(doc[key])
    return TrainConfig(**doc)


def resume_config(stored: TrainConfig, given: TrainConfig, run_dir: Path) -> TrainConfig:
    """The run's own settings with what a resume may change taken from `given`: each "apply" option as
    given (None: the run's own), each "never" option as given; everything else stays the run's."""
    changes = {name: getattr(given, name) for name in INVOCATION}
    for name in RESUME_MAY_CHANGE:
        if getattr(given, name) is not None:
            changes[name] = getattr(given, name)
    changes["results_dir"] = str(run_dir.parent)
    return dataclasses.replace(stored, **changes)


def flag_name(dest: str) -> str:
    """The command-line name of an option, for messages: seed -> --global-seed, mp_silu -> --use-mp-silu."""
    return flag_of(dest, ModelConfig, TrainConfig)


def as_typed(value) -> str:
    """A value as it is typed on the command line, for messages: None -> none, True -> on, (0.05, 0.1) -> 0.05 0.1."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(as_typed(v) for v in value)
    return str(value)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return [float(v) for v in a] == [float(v) for v in b]
    return a == b


def resume_settings(run_dir: Path, given: Mapping[str, object], tc: TrainConfig) -> TrainConfig:
    """The resume policy for options given by name (`given`: field name -> value, only those the user typed;
    model options by ModelConfig's field names and use_all_mp): a model option or a "match" training option
    that asks for something else than the run has is a one-line UserError naming them. Returns the run's
    settings with every "apply" option given taken over (and the "never" ones from `given`, else `tc`), ready
    for `train(tc, None, resume=run_dir)`."""
    saved = load_run_config(run_dir)
    stored = stored_train_config(saved, run_dir)
    model = ModelConfig.from_dict(saved["model"])
    problems, model_problems = [], []
    typed_model = [k for k in MODEL_FLAGS if k in given]
    if "model" in given and given["model"] != model.model:
        model_problems.append(f"--model {given['model']} (the run is {model.model})")
    elif typed_model:
        choices = {k: given[k] for k in typed_model if k not in ("model", "preset", "use_all_mp")}
        wanted = make_config(model.model, preset=given.get("preset"), use_all_mp=bool(given.get("use_all_mp")),
                             **{**choices, "input_size": model.input_size, "in_channels": model.in_channels,
                                "num_classes": model.num_classes})
        compare = set(choices)
        if set(given) & {"preset", "use_all_mp"}:  # a preset names the whole set of MP options
            compare |= set(MP_OPTIONS)
        shown = " ".join(flag_name(k) for k in typed_model)
        model_problems = [f"{'' if flag_name(k) == shown else shown + ' gives '}{flag_name(k)} "
                          f"{as_typed(getattr(wanted, k))} (the run has {as_typed(getattr(model, k))})"
                          for k in sorted(compare) if getattr(wanted, k) != getattr(model, k)]
    if "results_dir" in given and Path(str(given["results_dir"])).resolve() != run_dir.resolve().parent:
        problems.append(f"--results-dir {given['results_dir']} (the run is in {run_dir.parent})")
    for key in RESUME_MUST_MATCH:
        if key in given and not _same(given[key], getattr(stored, key)):
            problems.append(f"{flag_name(key)} {as_typed(given[key])} (the run has {as_typed(getattr(stored, key))})")
    problems += model_problems  # after the training ones: a preset alone can name eight
    if problems:
        raise UserError(f"--resume {run_dir} continues the run as it was trained, but {'; '.join(problems[:3])}: "
                        "drop these options, or start a new run without --resume")
    # options left out keep the run's own values (not the command's defaults)
    changes = {name: given[name] for name in RESUME_MAY_CHANGE if name in given}
    changes.update({name: given.get(name, getattr(tc, name)) for name in INVOCATION})
    changes["results_dir"] = str(run_dir.parent)
    return dataclasses.replace(stored, **changes)
