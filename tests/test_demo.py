"""`mapdit demo` at a few steps: it trains Config E with the recipe's loss weighting, writes the grid and prints
a scoring command that reproduces the grid's settings."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from helpers import cli, needs_installed_fmnist
from mapdit import demo


@needs_installed_fmnist
def test_demo_trains_the_recipe_and_prints_a_scoring_command_with_the_grids_settings(tmp_path, capsys):
    assert cli("demo", "--num-steps", 2, "--batch-size", 8, "--sampling-steps", 2, "--results-dir", tmp_path) == 0
    err = capsys.readouterr().err
    grid = Path(err.split("grid written to ")[1].split()[0])
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"
    command = shlex.split(err.split("\n  mapdit fid ")[1].splitlines()[0])
    run_dir = Path(command[command.index("--run") + 1])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["min_snr_gamma"] == demo.DEMO_MIN_SNR_GAMMA == 5.0
    assert config["train"]["lr"] == demo.DEMO_LR and config["model"]["mp_residual"] is True  # Config E
    settings = dict(zip(command[::2], command[1::2]))
    assert settings["--sampler"] == demo.DEMO_SAMPLER and settings["--steps"] == "2"
    assert float(settings["--cfg-scale"]) == demo.DEMO_CFG and float(settings["--ema-std"]) == demo.DEMO_EMA
