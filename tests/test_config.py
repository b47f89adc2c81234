"""The configs (mapdit.config) and the options declared on them (mapdit.options): resolved values in
config.json, old run folders rebuilt as they were built, the modulation and preset rules, one EMA-width bound,
one learning-rate rule, the generated command lines and the recipes."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import cli, error_line, needs_fmnist, only_error_line, tiny_model, tree
from mapdit import ema
from mapdit.cli import build_parser
from mapdit.commands.options import UNSET, given
from mapdit.commands.train import new_run_configs
from mapdit.config import (
    MP_OPTIONS,
    PRESETS,
    SIGMA_REL_MAX,
    ModelConfig,
    TrainConfig,
    default_lr,
)
from mapdit.errors import UserError
from mapdit.experiments.budgets import paper_rate
from mapdit.model import DiT
from mapdit.options import opt, options
from mapdit.recipes import RECIPES
from mapdit.resume import resume_settings, stored_train_config

OLD_RUNS = Path(__file__).parent / "fixtures" / "old_runs"  # config.json of 1-step runs by e95bf9f (README there)


# ------------------------------------------------------------------------------------------------
# config.json: resolved values; old run folders rebuilt exactly
# ------------------------------------------------------------------------------------------------
# what e95bf9f built for each run (null meant: fourier/balanced by its rules; a gate-less name kept its gate;
# per-modulator gains on a model without MP linears built nothing)
OLD_BUILT = {
    "E": {"time_embedding": "fourier", "conditioning": "balanced", "modulation": "adaln"},
    "A": {"time_embedding": "sinusoid", "conditioning": "sum", "modulation": "adaln"},
    "C": {"time_embedding": "sinusoid", "conditioning": "balanced", "modulation": "adaln"},
    "E-rotate-nogate": {"time_embedding": "fourier", "conditioning": "balanced", "modulation": "rotate+gate"},
    "A-per-modulator": {"time_embedding": "sinusoid", "conditioning": "sum", "modulation_gains": "shared"},
}


@pytest.mark.parametrize("name", sorted(OLD_BUILT))
def test_old_run_folders_rebuild_the_model_they_built(name):
    doc = json.loads((OLD_RUNS / name / "config.json").read_text())
    assert doc["model"]["time_embedding"] is None and doc["model"]["conditioning"] is None  # as e95bf9f wrote
    cfg = ModelConfig.from_dict(doc["model"])
    assert {k: getattr(cfg, k) for k in OLD_BUILT[name]} == OLD_BUILT[name]
    with torch.device("meta"):
        built = {k: list(v.shape) for k, v in DiT(cfg).state_dict().items()}
    assert built == json.loads((OLD_RUNS / name / "model_shapes.json").read_text())  # e95bf9f's checkpoint
    # and its training settings load (device, compile and label_dropout were stored then)
    tc = stored_train_config(doc, OLD_RUNS / name)
    assert tc.lr == doc["train"]["lr"] and tc.ema_stds == tuple(doc["train"]["ema_stds"])


def test_an_old_run_resumes_with_its_own_settings(tmp_path):
    run = tmp_path / "000-DiT-XXS-4"
    run.mkdir()
    (run / "config.json").write_text((OLD_RUNS / "E" / "config.json").read_text())
    tc = resume_settings(run, {"num_steps": 9}, TrainConfig())
    assert tc.num_steps == 9 and tc.batch_size == 2 and tc.device is None and tc.results_dir == str(tmp_path)


def test_config_json_records_resolved_values_only():
    for preset in PRESETS:
        model = tiny_model(preset)
        assert None not in (model.time_embedding, model.conditioning)
        doc = TrainConfig(num_steps=300).resolved(model).to_dict()
        assert all(doc[k] is not None for k in ("lr", "warmup_steps", "decay_start", "ckpt_every"))
        assert "device" not in doc and "compile" not in doc  # the invocation's, not the run's
        assert ModelConfig.from_dict(model.to_dict()) == model  # round trip


def test_a_null_default_keeps_the_meaning_it_had_when_written():
    """null in a config.json means what e95bf9f resolved it to, frozen in from_dict: a later change of a
    default cannot rebuild an existing run as another model."""
    for preset, built in (("A", ("sinusoid", "sum")), ("C", ("sinusoid", "balanced")), ("E", ("fourier", "balanced"))):
        data = {**tiny_model(preset).to_dict(), "time_embedding": None, "conditioning": None}
        cfg = ModelConfig.from_dict(data)
        assert (cfg.time_embedding, cfg.conditioning) == built


# ------------------------------------------------------------------------------------------------
# modulation, per-modulator gains, presets
# ------------------------------------------------------------------------------------------------
def test_nogate_builds_no_gate():
    gated, plain = tiny_model("E", modulation="scale"), tiny_model("E", modulation="scale+nogate")
    assert gated.modulation == "scale+gate" and plain.modulation == "scale+nogate"
    assert plain.modulation_parts == ("scale",)
    assert ModelConfig.from_dict(plain.to_dict()).modulation_parts == ("scale",)  # survives config.json
    with torch.device("meta"):
        g, p = DiT(gated), DiT(plain)
    d = gated.hidden_size
    # one chunk fewer in each block's modulation linear (scale, gate -> scale), twice (attention and MLP sites)
    assert g.blocks[0].adaLN_modulation[-1].weight.shape[0] - p.blocks[0].adaLN_modulation[-1].weight.shape[0] == 2 * d
    assert sum(t.numel() for t in g.parameters()) > sum(t.numel() for t in p.parameters())


def test_per_modulator_gains_need_mp_linears(capsys):
    with pytest.raises(UserError, match="needs MP linears"):
        tiny_model("A", modulation_gains="per-modulator")
    assert tiny_model("C", modulation_gains="per-modulator").modulation_gains == "per-modulator"
    assert cli("model-info", "--config", "B", "--modulation-gains", "per-modulator") == 2
    assert "needs MP linears" in error_line(capsys, "model-info")


def test_presets_change_what_they_name_and_what_their_help_says():
    """A preset turns on its MP options; the only other fields that differ from Config A are the two defaults
    that follow them, as --config's help says: conditioning (balanced with MP linears: C, D, E) and the
    time embedding (fourier with --use-mp-embedding: E)."""
    a = tiny_model("A")
    for preset, named in PRESETS.items():
        cfg = tiny_model(preset)
        differ = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(a, f.name)} - {"preset"}
        follows = {"conditioning"} if cfg.uses_mp_linear else set()
        follows |= {"time_embedding"} if cfg.mp_embedding else set()
        assert differ == set(named) | follows, preset
    help_text = next(o.help for o in options(ModelConfig) if o.name == "preset")
    assert "(C, D, E) --conditioning resolves to balanced" in help_text and "--time-embedding to fourier" in help_text


def test_an_explicit_choice_beats_the_default_that_follows_the_preset():
    assert tiny_model("C", conditioning="sum").conditioning == "sum"
    assert tiny_model("E", time_embedding="table").time_embedding == "table"


# ------------------------------------------------------------------------------------------------
# one bound, one rule
# ------------------------------------------------------------------------------------------------
def test_one_ema_width_bound_the_peak_of_edm2s_sigma_rel():
    gammas = torch.linspace(-0.99, 5, 20001, dtype=torch.float64)
    peak = max(ema.gamma_to_sigma_rel(float(g)) for g in gammas)
    assert SIGMA_REL_MAX == ema.SIGMA_REL_MAX == pytest.approx(peak, abs=1e-9)
    assert ema.gamma_to_sigma_rel(1 / ((1 + math.sqrt(5)) / 2) - 1) == pytest.approx(SIGMA_REL_MAX)
    TrainConfig(ema_stds=(0.29,)).check()  # above 1/sqrt(12) (gamma 0), below the bound: a real profile
    assert ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(0.29)) == pytest.approx(0.29)
    with pytest.raises(UserError, match="0.3003"):
        TrainConfig(ema_stds=(0.31,)).check()


def test_default_learning_rate_follows_weight_normalisation():  # moved from test_train.py
    assert TrainConfig().resolved(tiny_model("A")).lr == 1e-4
    assert TrainConfig().resolved(tiny_model("C")).lr == 1e-2
    assert TrainConfig(lr=3e-3).resolved(tiny_model("E")).lr == 3e-3


def test_one_learning_rate_rule():
    for preset in PRESETS:
        cfg = tiny_model(preset)
        assert TrainConfig().resolved(cfg).lr == default_lr(cfg) == paper_rate("DiT-XXS/4", preset)
        assert default_lr(cfg) == (1e-2 if preset in "CDE" else 1e-4)


# ------------------------------------------------------------------------------------------------
# the generated command lines
# ------------------------------------------------------------------------------------------------
def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return action.choices


@pytest.mark.parametrize("command", ["train", "model-info", "demo"])
def test_every_generated_option_is_helped_with_its_default(command):
    for action in _subparsers()[command]._actions:
        if action.dest in ("help", "resume", "json", "use_all_mp") or action.help is None:
            assert action.dest in ("help", "resume", "json", "use_all_mp"), action.dest
            continue
        assert "default" in action.help or "turn" in action.help, (command, action.option_strings)


def test_given_sees_only_what_was_typed():
    args = build_parser().parse_args(["train", "--lr", "0.1", "--config", "e", "--hflip", "--ema-stds", "0.1", "0.2"])
    assert given(args, TrainConfig) == {"lr": 0.1, "hflip": True, "ema_stds": (0.1, 0.2)}
    assert args.preset == "E" and args.num_steps is UNSET


def test_every_option_needs_help():
    with pytest.raises(ValueError, match="help"):
        opt(1, "")


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------
def _configs(*argv):
    return new_run_configs(build_parser().parse_args(["train", *argv]))


def test_plain_train_keeps_the_papers_defaults():
    tc, model = _configs()
    assert tc == TrainConfig() and tc.recipe is None
    assert (model.model, model.preset, model.enabled_mp_options()) == ("DiT-S/2", None, [])


def test_a_recipe_gives_defaults_that_options_override():
    recipe = RECIPES["fmnist-cpu"]
    tc, model = _configs("--recipe", "fmnist-cpu")
    assert tc.recipe == "fmnist-cpu"
    assert {k: getattr(tc, k) for k in recipe.train} == dict(recipe.train)
    assert (model.model, model.preset, model.enabled_mp_options()) == ("DiT-XXS/4", "E", list(MP_OPTIONS))
    assert (tc.num_steps, tc.batch_size, tc.lr, tc.min_snr_gamma) == (7000, 32, 3e-2, 5.0)  # the demo's recipe
    tc, model = _configs("--recipe", "fmnist-cpu", "--lr", "0.01", "--model", "DiT-XS/4", "--num-steps", "10")
    assert (tc.lr, tc.num_steps, tc.batch_size, model.model, model.preset) == (0.01, 10, 32, "DiT-XS/4", "E")


def test_the_paper_recipe():
    tc, model = _configs("--recipe", "imagenet-paper", "--data-path", "latents")
    assert (model.model, model.preset, tc.num_steps, tc.batch_size, tc.ema_stds) == (
        "DiT-XS/2", "E", 400_000, 256, (0.05, 0.10))
    assert tc.resolved(model).lr == 1e-2 and tc.data_path == "latents"


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
