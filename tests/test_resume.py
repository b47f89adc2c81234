"""The resume policy (mapdit.resume): every option of `mapdit train`, enumerated from the config dataclasses'
declarations, is either applied or refused in one line on --resume; none is ignored."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import cli, error_line, needs_fmnist, only_error_line, read_metrics, tiny_model, tiny_train
from mapdit.cli import build_parser
from mapdit.commands.options import UNSET
from mapdit.commands.train import resumed_run_configs
from mapdit.config import ModelConfig, TrainConfig
from mapdit.errors import UserError
from mapdit.options import options
from mapdit.resume import RESUME_MAY_CHANGE, RESUME_MUST_MATCH, resume_settings
from mapdit.runio import list_checkpoints
from mapdit.train import train

DATA_SIZES = ("input_size", "in_channels", "num_classes")  # train takes these from the data, not the command line
# a value for an option whose type alone does not give a valid other one
SPECIAL = {"model": "DiT-XS/4", "modulation": "scale", "data_path": "elsewhere", "device": "cpu", "ema_stds": (0.07,),
           "adam_betas": (0.8, 0.9)}


def fake_run(tmp_path: Path, preset: str = "A") -> Path:
    """A run folder with only its config.json: all that the resume checks read."""
    run = tmp_path / "runs" / "000-DiT-XXS-4"
    run.mkdir(parents=True)
    tc = tiny_train(run.parent).resolved(tiny_model(preset))
    doc = {"model": tiny_model(preset).to_dict(), "train": tc.to_dict(), "data": {"kind": "fashion-mnist"}}
    (run / "config.json").write_text(json.dumps(doc))
    return run


def other_value(o, stored):
    """A valid value for option `o` that differs from the run's `stored` one, and its command-line words."""
    if o.name in SPECIAL:
        value = SPECIAL[o.name]
    elif o.choices is not None:
        value = next(c for c in o.choices if c != stored)
    elif o.base_type is bool:
        value = not stored
    elif o.base_type is int:
        value = 7 if stored is None else stored + 7
    elif o.base_type is float:
        value = 0.5 if stored is None else stored * 2
    else:
        raise AssertionError(f"no test value for the new option {o.flag}: add one to SPECIAL")
    if o.base_type is bool:
        on_flag = o.flag if not o.default else "--" + o.name.replace("_", "-")
        off_flag = "--no-" + o.name.replace("_", "-") if not o.default else o.flag
        return value, [on_flag if value else off_flag]
    words = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return value, [o.flag, *words]


def train_options():
    """(dataclass, option) for every option `mapdit train` takes from the config dataclasses."""
    found = [(TrainConfig, o) for o in options(TrainConfig, cli_only=True)]
    found += [(ModelConfig, o) for o in options(ModelConfig, cli_only=True) if o.name not in DATA_SIZES]
    return found


def test_every_train_option_comes_from_the_dataclasses():
    """An option added to the train parser by hand (not declared on a dataclass) fails here, so the test below
    sees every option."""
    parser = build_parser()
    train_parser = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    dests = {a.dest for a in train_parser.choices["train"]._actions}
    assert dests == {o.name for _, o in train_options()} | {"help", "resume", "use_all_mp"}
    # every one has help, and the policy is declared for every field
    assert all(a.help for a in train_parser.choices["train"]._actions)
    for cls in (TrainConfig, ModelConfig):
        assert {o.name for o in options(cls)} == {f.name for f in dataclasses.fields(cls)}
    assert {"num_steps", "lr", "sample_every", "fid_every", "fid_samples", "magnitude_every"} <= set(RESUME_MAY_CHANGE)
    assert {"batch_size", "seed", "ema_stds", "precision"} <= set(RESUME_MUST_MATCH)


@pytest.mark.parametrize("cls,o", train_options(), ids=lambda v: getattr(v, "flag", ""))
def test_every_option_on_resume_is_applied_or_refused(tmp_path, cls, o):
    run = fake_run(tmp_path)
    stored = json.loads((run / "config.json").read_text())["model" if cls is ModelConfig else "train"]
    if o.name == "results_dir":  # it says where the run is: the run's own folder is applied, another refused
        value, words = str(run.parent), [o.flag, str(run.parent)]
    else:
        value, words = other_value(o, stored.get(o.name, o.default))
    args = build_parser().parse_args(["train", "--resume", str(run), *words])
    assert getattr(args, o.name) is not UNSET  # the parser saw it
    if cls is ModelConfig or o.resume == "match":
        with pytest.raises(UserError, match="continues the run as it was trained|needs MP linears"):
            resumed_run_configs(args)
    else:
        _, tc = resumed_run_configs(args)
        assert getattr(tc, o.name) == value, o.flag


def test_use_all_mp_and_another_results_dir_are_refused(tmp_path):
    run = fake_run(tmp_path)
    for words in (["--use-all-mp"], ["--results-dir", str(tmp_path / "other")]):
        with pytest.raises(UserError, match="continues the run as it was trained"):
            resumed_run_configs(build_parser().parse_args(["train", "--resume", str(run), *words]))


def test_options_left_out_keep_the_runs_own_values(tmp_path):
    run = fake_run(tmp_path)
    stored = json.loads((run / "config.json").read_text())["train"]
    _, tc = resumed_run_configs(build_parser().parse_args(["train", "--resume", str(run)]))
    assert {k: v for k, v in tc.to_dict().items() if k != "results_dir"} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k != "results_dir"}


def test_the_same_value_given_again_is_accepted(tmp_path):
    run = fake_run(tmp_path, preset="E")
    tc = resume_settings(run, {"batch_size": 8, "preset": "E", "cosine_attention": True, "seed": 1}, TrainConfig())
    assert tc.batch_size == 8 and tc.seed == 1


def test_a_refusal_is_one_line_naming_the_options(tmp_path, capsys):
    run = fake_run(tmp_path)
    assert cli("train", "--resume", run, "--global-batch-size", 16, "--ema-stds", 0.2, "--config", "E") == 2
    line = error_line(capsys)
    assert "--global-batch-size 16 (the run has 8)" in line and "--config" in line
    assert "--ema-std 0.2 (the run has 0.05 0.1)" in line  # values as typed, not Python's [0.2] or None


@needs_fmnist
def test_a_report_option_given_on_resume_takes_effect(tmp_path):
    """--magnitude-every was silently ignored on --resume before: now the resumed steps write magnitudes."""
    run = train(tiny_train(tmp_path, num_steps=2), tiny_model())
    assert not (run / "residual_magnitudes.csv").exists()
    assert cli("train", "--resume", run, "--num-steps", 4, "--magnitude-every", 2) == 0
    rows = (run / "residual_magnitudes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows if r[:1].isdigit()] == ["4"]
    assert [int(r["step"]) for r in read_metrics(run)] == [2, 4]


@needs_fmnist
@pytest.mark.parametrize("argv, expected", [
    (["--model", "DiT-S/2"], "--model DiT-S/2 (the run is DiT-XXS/4)"),
    (["--config", "A"], "--config gives --use-cosine-attention off (the run has on)"),
    (["--modulation", "scale"], "--modulation scale+gate (the run has adaln)"),
    (["--global-batch-size", "16"], "--global-batch-size 16 (the run has 8)"),
    (["--ema-stds", "0.07"], "--ema-std 0.07 (the run has 0.05 0.1)"),  # the old spelling is an alias
    (["--min-snr-gamma", "5"], "--min-snr-gamma 5 (the run has none)"),
])
def test_resume_with_contradicting_options(run_copy, capsys, argv, expected):
    before = sorted(p.name for p in run_copy.rglob("*"))
    assert cli("train", "--resume", run_copy, *argv) == 2
    line = only_error_line(capsys)
    assert expected in line and "start a new run without --resume" in line
    assert sorted(p.name for p in run_copy.rglob("*")) == before


@needs_fmnist
def test_resume_with_agreeing_model_flags_is_fine(run_copy):
    assert cli("train", "--resume", run_copy, "--model", "DiT-XXS/4", "--config", "E", "--num-steps", 5) == 0
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 4, 5]
