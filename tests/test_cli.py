"""The command line's contract: a mistake in the user's input is one line, `mapdit <command>: error: ...`, and
exit code 2, with no traceback (anything else is a bug and stays a traceback); messages say what to do;
one name per concept across sub-commands.

`test_every_option_of_every_command_keeps_the_one_line_contract` is generated from the parser itself: a new
option is tried the moment it exists.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import shutil
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_ARGS, cli, error_line, needs_fmnist, only_error_line, tiny_model, tiny_train
from mapdit.cli import build_parser, main
from mapdit.commands.parsing import OUTPUT, Kind, finite_float, path_text, text, whole_number
from mapdit.runio import checkpoint_path, list_checkpoints
from mapdit.train import train


def subcommands(parser=None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def run_in_process(argv: list) -> tuple[object, str]:
    """`mapdit ARGV` in this process: (exit status or 'traceback', stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - a traceback is what the contract forbids: record it
            traceback.print_exc(file=err)
            rc = "traceback"
    return rc, err.getvalue()


def contract_broken(command: str, rc, err: str) -> str | None:
    """None when (rc, stderr) keep the contract: exit 0, or exit 2 with exactly one error line and no traceback."""
    if "Traceback" in err or rc not in (0, 2):
        return f"rc={rc}: {err.strip()[-600:]}"
    if rc == 2:
        lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith(f"mapdit {command}: error:")]
        if len(lines) != 1:
            return f"rc=2 without one error line: {err.strip()[-600:]}"
    return None


# ------------------------------------------------------------------------------------------------
# 1. generated from the option definitions: every option, out of range, of the wrong type, naming nothing
# ------------------------------------------------------------------------------------------------
def _idx_folder(folder: Path, n=(128, 10)) -> Path:
    """A Fashion-MNIST-shaped IDX folder with one classifier batch of random images (one step per epoch)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in zip(("train", "t10k"), n):
        for stem, arr in (("images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)),
                          ("labels-idx1-ubyte", (np.arange(count) % 10).astype(np.uint8))):
            data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            (folder / f"{prefix}-{stem}.gz").write_bytes(gzip.compress(data))
    return folder


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (60 * i, 90 * c, 20)).save(root / name / f"{i}.png")
    return root


def _tiny_vae(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(path)
    return path


def base_argvs(run: Path, tmp: Path, out: Path) -> dict[str, list]:
    """For each sub-command, valid options with a tiny budget (inputs made in `tmp`, outputs under `out`): a
    case that is legitimately fine finishes in about a second. The option under test comes after them
    (argparse: the last value wins)."""
    return {
        "model-info": ["--model", "DiT-XXS/4"],
        "train": ["--data-path", tmp / "idx", "--model", "DiT-XXS/4", "--num-steps", 1, "--global-batch-size", 2,
                  "--ema-snapshots", 0, "--results-dir", out / "train"],
        "sample": ["--run", run, "--steps", 1, "--num-samples", 1, "--class-label", 0, "--out", out / "s.png"],
        "ema": ["--run", run, "--ema-std", 0.08, "--out", out / "ema.safetensors"],
        "fid": ["--run", run, "--num-samples", 8, "--steps", 1, "--num-ref", 8, "--batch-size", 8,
                "--cache-dir", out / "cache"],
        "magnitudes": ["--run", run, "--batch-size", 2],
        "fmnist-classifier": ["--out", out / "clf.safetensors", "--epochs", 1, "--data-path", tmp / "idx"],
        "prepare": ["--image-folder", tmp / "img", "--out", out / "latents", "--resolution", 16, "--vae", tmp / "vae",
                    "--no-progress"],
        "demo": ["--data-path", tmp / "idx", "--num-steps", 1, "--batch-size", 2, "--sampling-steps", 1,
                 "--model", "DiT-XXS/4", "--results-dir", out / "demo"],
        "ablate": ["--data-path", tmp / "idx", "--num-steps", 1, "--configs", "A", "--model", "DiT-XXS/4",
                   "--batch-size", 2, "--fid-samples", 8, "--num-ref", 8, "--sampling-steps", 1,
                   "--sample-batch-size", 8, "--magnitude-batch-size", 2,
                   "--ema-snapshots", 0, "--out", out / "ablate", "--cache-dir", out / "cache"],
        "study": ["--report-only", "--out", tmp / "study", "--results-md", out / "RESULTS.md",
                  "--docs-dir", out / "docs"],
    }


def bad_values(action: argparse.Action, tmp: Path, i: int) -> list[str]:
    """What the test feeds an option: out of range (negative, zero) and the wrong type for numbers; a word
    for a choice; for a place a command writes, one under a file (nothing can be made there); for other text
    (names, input paths) a word that names nothing and a missing file (unique: an earlier case's output
    must not make them exist), a file of random bytes and a folder of them (a file that is not what it
    should be); and for every path, one the system refuses to look up (too long, a loop of links)."""
    kind = action.type
    if action.choices is not None:
        return ["word"]
    if isinstance(kind, Kind) and kind.convert in (whole_number, finite_float) or kind in (int, float):
        return ["-1", "0", "word"]
    # names the system refuses to look up: over NAME_MAX, and a symbolic link to itself
    refused = [str(tmp / ("n" * 300)), str(tmp / "loop")]
    if kind is OUTPUT:
        return [str(tmp / "afile" / f"out{i}"), *refused]
    return [f"word{i}", str(tmp / f"missing{i}" / "file.npz"), str(tmp / "garbage.npz"), str(tmp / "garbage"),
            *refused]


def all_cases(tmp: Path):
    for command, sub in subcommands().items():
        for i, action in enumerate(sub._actions):
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            for value in bad_values(action, tmp, i):
                yield command, action.option_strings[0], value


@pytest.fixture(scope="module")
def contract_world(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    run = Path(shutil.copytree(tiny_run, tmp / "runs" / tiny_run.name))  # cases write into it (eval/, ema/)
    _idx_folder(tmp / "idx")
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "loop").symlink_to(tmp / "loop")
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp / "garbage.npz").write_bytes(garbage)
    (tmp / "garbage" / "a").mkdir(parents=True)
    for name in ("config.json", "latents.json", "x.png", "train-images-idx3-ubyte.gz", "step-0000001.safetensors"):
        (tmp / "garbage" / name).write_bytes(garbage)
        (tmp / "garbage" / "a" / name).write_bytes(garbage)
    # a finished tiny study (one rate of Config A) for `study --report-only`
    rc, err = run_in_process(["study", "--quick", "--studies", "rates", "--configs", "A", "--rates", "A=1e-2",
                              "--out", tmp / "study", "--num-steps", 1, "--checkpoints", 1,
                              "--batch-size", 2, "--fid-samples", 8, "--num-ref", 8, "--sampling-steps", 1,
                              "--heldout-images", 8, "--sample-batch-size", 8, "--magnitude-batch-size", 2,
                              "--results-md", tmp / "study" / "RESULTS.md"])
    assert rc == 0, err[-2000:]
    _image_folder(tmp / "img")
    _tiny_vae(tmp / "vae")
    return run, tmp


def offline_hub(monkeypatch):
    """`prepare --vae word` would try the hub (and wait for the network): no network here, at once."""
    from diffusers import AutoencoderKL

    real = AutoencoderKL.from_pretrained.__func__

    def offline(cls, name, *args, **kwargs):
        if not Path(str(name)).is_dir():
            raise OSError("no network in this test")
        return real(cls, name, *args, **kwargs)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(offline))


@needs_fmnist
def test_every_option_of_every_command_keeps_the_one_line_contract(contract_world, monkeypatch):
    run, tmp = contract_world
    monkeypatch.chdir(tmp)  # 'word' as a path names nothing here
    offline_hub(monkeypatch)
    bases = base_argvs(run, tmp, tmp / "out")
    assert set(bases) == set(subcommands()), "a new sub-command needs a tiny valid base in base_argvs"
    broken, counts = [], {0: 0, 2: 0}
    for i, (command, flag, value) in enumerate(all_cases(tmp)):
        base = [str(a).replace(".safetensors", f"-{i}.safetensors") for a in bases[command]]  # new outputs
        rc, err = run_in_process([command, *base, f"{flag}={value}"])
        problem = contract_broken(command, rc, err)
        if problem:
            broken.append(f"mapdit {command} {flag} {value}: {problem}")
        else:
            counts[rc] += 1
    assert not broken, "\n".join(broken)
    assert counts[2] > 3 * counts[0]  # most of these values are mistakes


@needs_fmnist
@pytest.mark.slow
def test_every_base_argv_of_the_contract_test_is_valid(contract_world, monkeypatch):
    """The contract test's bases must themselves run (else every case would fail for the base's sake)."""
    run, tmp = contract_world
    monkeypatch.chdir(tmp)
    for command, base in base_argvs(run, tmp, tmp / "bases").items():
        rc, err = run_in_process([command, *base])
        assert rc == 0, (command, err[-2000:])


@pytest.mark.parametrize("argv", [
    ["fid", "--run", "R", "--ref", "fmnist"],  # another name of the installed Fashion-MNIST
    ["train", "--data-path", "FASHION-MNIST"],
    ["fid", "--run", "R", "--inception-weights", "~/w.pth", "--cache-dir", "~/cache"],  # ~ is the home folder
])
def test_the_input_checks_accept_what_the_library_accepts(tmp_path, monkeypatch, argv):
    from mapdit.commands.parsing import check_inputs

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.pth").write_bytes(b"x")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run = None  # the run folder is not what is tried here
    check_inputs(parser, args)  # no UserError


# ------------------------------------------------------------------------------------------------
# 2. option mistakes found while parsing (moved from test_robustness.py and test_reliability.py)
# ------------------------------------------------------------------------------------------------
def _float_options() -> list[tuple[str, str]]:
    """(command, option) for every option of every sub-command that takes floats."""
    return [(name, opt.option_strings[0]) for name, sub in subcommands().items() for opt in sub._actions
            if opt.option_strings and isinstance(opt.type, Kind) and opt.type.convert is finite_float
            and not isinstance(opt.nargs, int)]  # --x=nan gives one value


def test_every_float_option_refuses_nan_and_inf(capsys):
    options = _float_options()
    assert ("sample", "--cfg-scale") in options and ("train", "--lr") in options and ("ema", "--ema-std") in options
    for command, option in options:
        for value in ("nan", "inf", "-inf", "NaN"):
            assert cli(command, f"{option}={value}") == 2  # --x=-inf: a value, not an option
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"mapdit {command}: error: argument {option}"), err
            assert "not a finite number" in err[0], err
    assert cli("sample", "--cfg-scale", "four") == 2  # not a number at all: one line as well
    assert capsys.readouterr().err.count("\n") == 1


def test_every_text_option_refuses_an_empty_value(capsys):
    """'' names nothing; before, --data-path '' became the default data through `or DEFAULT_DATA` and trained."""
    options = [(name, opt.option_strings[0]) for name, sub in subcommands().items() for opt in sub._actions
               if opt.option_strings and isinstance(opt.type, Kind) and opt.type.convert in (text, path_text)
               and opt.choices is None and not isinstance(opt.nargs, int)]
    for expected in [("train", "--data-path"), ("sample", "--ckpt"), ("sample", "--out"), ("model-info", "--model"),
                     ("fid", "--ref"), ("prepare", "--image-folder"), ("train", "--modulation")]:
        assert expected in options
    for command, option in options:
        for value in ("", " "):
            assert cli(command, f"{option}={value}") == 2
            line = only_error_line(capsys, command)
            assert f"argument {option}" in line and f"{value!r} is empty" in line, line


def test_every_path_option_expands_the_home_folder_where_its_check_does(monkeypatch, tmp_path):
    # --out=~/x.png (the shell expands no ~ after '=') was checked as $HOME/x.png but written to ./~/x.png
    monkeypatch.setenv("HOME", str(tmp_path))
    paths = [(name, sub, opt) for name, sub in subcommands().items() for opt in sub._actions
             if opt.option_strings and isinstance(opt.type, Kind) and opt.type.convert is path_text]
    assert {("sample", "--out"), ("train", "--data-path"), ("fid", "--ref"), ("ema", "--run"), ("sample", "--ckpt"),
            ("prepare", "--vae")} <= \
        {(name, opt.option_strings[0]) for name, _, opt in paths}
    for _, _, opt in paths:
        assert opt.type("~/x") == str(tmp_path / "x")
    assert subcommands()["sample"].parse_args(["--run=~/r", "--out=~/g.png"]).out == str(tmp_path / "g.png")


@needs_fmnist
def test_nan_guidance_writes_nothing(tiny_run, tmp_path, capsys):
    assert cli("sample", "--result-dir", tiny_run, "--cfg-scale", "nan", "--out", tmp_path / "s.npz") == 2
    assert not (tmp_path / "s.npz").exists()
    assert "--cfg-scale: nan is not a finite number" in only_error_line(capsys, "sample")


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model", "DiT-Q/3"], "unknown model 'DiT-Q/3'"),
    (["model-info", "--model", "DiT-Q/3"], "unknown model 'DiT-Q/3'"),
    (["model-info", "--model", "DiT-XXS/8", "--input-size", "28"], "patch size 8 of DiT-XXS/8 does not divide"),
    (["train", *TINY_ARGS, "--image-size", "30"], "--image-size 30 is not divisible by the patch size 4"),
    (["train", *TINY_ARGS, "--ema-snapshots", "-1"], "--ema-snapshots -1 must be 0"),
    (["train", *TINY_ARGS, "--log-every", "0"], "--log-every 0 must be at least 1"),
    (["train", *TINY_ARGS, "--grad-clip", "0"], "--grad-clip 0.0 must be a positive number"),
    (["train", *TINY_ARGS, "--min-snr-gamma", "-1"], "--min-snr-gamma -1.0 must be a positive number"),
    (["train", *TINY_ARGS, "--ema-stds", "0.05", "0.0501"], "must differ in the first 3 decimals"),
    (["train", *TINY_ARGS, "--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["train", "--recipe", "imagenet-paper", "--num-steps", "1"], "--recipe imagenet-paper trains on data you pass"),
    (["train", *TINY_ARGS, "--adam-betas", "0.9", "1.5"], "--adam-betas 1.5 must be in [0, 1)"),  # was torch's
    (["train", *TINY_ARGS, "--log-every", "2", "--fd-every", "3"], "--fd-every 3 must be a multiple of --log-every"),
    (["train", "--resume"], "no run folder with a config.json"),
    (["sample", "--result-dir", "nowhere"], "run folder nowhere does not exist"),
])
def test_bad_options_give_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert cli(*argv) == 2
    assert expected in only_error_line(capsys, argv[0])
    assert not list(tmp_path.rglob("*-DiT-*"))  # no run folder was made


@needs_fmnist
@pytest.mark.parametrize("argv, expected", [
    (["--weights", "raw", "--ema-std", "0.08"], "contradicts --weights raw"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
])
def test_sample_contradictions(tiny_run, capsys, argv, expected):
    assert cli("sample", "--result-dir", tiny_run, *argv) == 2
    assert expected in only_error_line(capsys, "sample")


# ------------------------------------------------------------------------------------------------
# 3. messages that say what to do (issue 30)
# ------------------------------------------------------------------------------------------------
@needs_fmnist
def test_the_results_folder_passed_as_a_run_lists_the_runs_inside(tiny_run, capsys):
    assert cli("sample", "--run", tiny_run.parent, "--steps", 1) == 2
    line = only_error_line(capsys, "sample")
    assert "holds runs but is not one" in line and f"--run {tiny_run}" in line and tiny_run.name in line


@needs_fmnist
def test_a_checkpoint_file_passed_as_the_run_names_its_run(tiny_run, capsys):
    ckpt = list_checkpoints(tiny_run)[-1][1]
    assert cli("fid", "--run", ckpt) == 2
    line = only_error_line(capsys, "fid")
    assert "is a checkpoint file, not a run folder" in line and f"--run {tiny_run} " in line
    assert f"--ckpt {ckpt.name}" in line


@needs_fmnist
def test_resume_of_the_results_folder_or_a_checkpoint_names_the_run(tiny_run, capsys):
    assert cli("train", "--resume", tiny_run.parent) == 2
    assert f"holds runs but is not one: pass one of them, e.g. --resume {tiny_run} " in only_error_line(capsys)
    ckpt = list_checkpoints(tiny_run)[-1][1]
    assert cli("train", "--resume", ckpt) == 2
    line = only_error_line(capsys)
    assert line.endswith(f"is a checkpoint file, not a run folder: pass its run, --resume {tiny_run}")


def test_a_missing_run_folder_suggests_a_close_one(tmp_path, capsys):
    (tmp_path / "003-DiT-S-2").mkdir()
    (tmp_path / "003-DiT-S-2" / "config.json").write_text("{}")
    assert cli("ema", "--run", tmp_path / "003-DiT-S2", "--ema-std", 0.1) == 2
    assert f"did you mean {tmp_path / '003-DiT-S-2'}?" in only_error_line(capsys, "ema")


@needs_fmnist
def test_ckpt_is_found_in_the_runs_checkpoints_folder_and_a_wrong_one_lists_them(tiny_run, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.chdir(tmp_path)  # not beside the checkpoints
    assert cli("sample", "--run", tiny_run, "--ckpt", "step-0000002.safetensors", "--steps", 1, "--class-label", 0,
               "--num-samples", 1, "--out", tmp_path / "a.png") == 0
    assert "at step 2" in capsys.readouterr().err
    assert cli("sample", "--run", tiny_run, "--ckpt", "step-0000003.safetensors", "--steps", 1) == 2
    line = only_error_line(capsys, "sample")
    assert "step-0000003.safetensors not found" in line
    assert "step-0000002.safetensors, step-0000004.safetensors" in line


@needs_fmnist
def test_a_checkpoint_of_another_run_is_one_short_line(run_copy, tmp_path, capsys):
    other = train(tiny_train(tmp_path / "other", num_steps=1, ckpt_every=1, ema_snapshots=0),
                  tiny_model(preset="A"))
    capsys.readouterr()
    foreign = list_checkpoints(other)[-1][1]
    assert cli("sample", "--run", run_copy, "--ckpt", foreign, "--steps", 1) == 2
    line = only_error_line(capsys, "sample")
    assert "does not match the run's model config" in line and "another run" in line
    assert "Error(s) in loading" not in line and "torch.Size" not in line and len(line) < 400
    # the same file dropped into the run as its newest checkpoint: resume says the same
    shutil.copy(foreign, checkpoint_path(run_copy, 9))
    shutil.copy(foreign.with_suffix(".json"), checkpoint_path(run_copy, 9).with_suffix(".json"))
    assert cli("train", "--resume", run_copy, "--num-steps", 10) == 2
    assert "does not match the run's model" in error_line(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--num-stepz", "3"], "did you mean --num-steps?"),
    (["train", "--lr-rate=3"], "did you mean --lr"),
    (["sample", "--rn", "x"], "did you mean --run?"),
    (["fid", "--sampler", "dpm++2"], "did you mean 'dpm++2m'?"),
])
def test_a_flag_typo_points_to_the_subcommands_help_with_a_close_match(capsys, argv, expected):
    assert cli(*argv) == 2
    line = only_error_line(capsys, argv[0])
    assert expected in line and f"(see mapdit {argv[0]} --help)" in line


def test_a_misspelt_subcommand_gets_a_close_match(capsys):
    assert cli("sampel", "--run", "x") == 2
    assert "did you mean 'sample'?" in capsys.readouterr().err


def test_a_missing_ref_or_data_path_says_what_to_pass(tmp_path, capsys):
    run = tmp_path / "000-DiT-S-2"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run as far as the options are checked
    assert cli("fid", "--run", run, "--ref", tmp_path / "nothing.npz") == 2
    assert "does not exist: pass 'fashion-mnist', an image folder" in only_error_line(capsys, "fid")
    assert cli("train", "--data-path", tmp_path / "nothing") == 2
    assert "does not exist: pass 'fashion-mnist', a folder of IDX files" in only_error_line(capsys, "train")


@needs_fmnist
@pytest.mark.parametrize("ref", ["missing.npz", "bad.npz", "emptydir"])
def test_a_bad_fid_ref_is_reported_before_sampling(tiny_run, tmp_path, monkeypatch, capsys, ref):
    import mapdit.experiments.fid_run as fid_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not an npz at all")
    (tmp_path / "emptydir").mkdir()
    monkeypatch.setattr(fid_run, "sample_images", lambda *a, **k: pytest.fail("sampled before checking --ref"))
    assert cli("fid", "--run", tiny_run, "--num-samples", 8, "--steps", 1, "--ref", ref,
               "--cache-dir", tmp_path / "c") == 2
    assert ref in only_error_line(capsys, "fid")


# ------------------------------------------------------------------------------------------------
# 4. one name per concept: the old spellings still work, and --help names them
# ------------------------------------------------------------------------------------------------
@needs_fmnist
def test_old_spellings_of_the_run_folder_and_the_ema_width_are_accepted(tiny_run, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert cli("ema", "--result-dir", tiny_run, "--std", 0.08, "--out", out) == 0 and out.exists()
    for command in ("sample", "fid", "ema", "magnitudes"):
        sub = subcommands()[command]
        strings = {s for a in sub._actions for s in a.option_strings}
        assert {"--run", "--result-dir"} <= strings, command
        help_text = " ".join(sub.format_help().split())
        assert "(also: --result-dir)" in help_text, command
    assert "(also: --std)" in " ".join(subcommands()["ema"].format_help().split())


def test_one_flag_name_per_concept_across_subcommands():
    """The run folder is --run and the EMA width --ema-std wherever a command takes one (train's list of
    tracked widths too); the old spellings stay as aliases."""
    for command, sub in subcommands().items():
        by_dest = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
        if "run" in by_dest:
            assert by_dest["run"] == "--run", command
        for dest in ("result_dir", "std"):
            assert dest not in by_dest, (command, dest)
        for dest in ("ema_std", "ema_stds"):  # one width (sample, fid, ema, ...) or the tracked ones (train)
            if dest in by_dest:
                assert by_dest[dest] == "--ema-std", command
    train = {s for a in subcommands()["train"]._actions if a.dest == "ema_stds" for s in a.option_strings}
    assert train == {"--ema-std", "--ema-stds"}



@pytest.mark.parametrize("command", ["sample", "fid", "ema", "magnitudes", "prepare", "fmnist-classifier"])
def test_every_option_has_help_that_shows_its_default(command):
    sub = subcommands()[command]
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (command, action.option_strings)
        if action.nargs != 0 and action.default is not None:
            assert "default" in action.help, (command, action.option_strings)


# ------------------------------------------------------------------------------------------------
# the environment: memory that the sizes asked for
@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 60000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError("Unable to allocate 55.9 GiB for an array with shape (60000, 1000, 1000)"),
])
def test_memory_the_sizes_ask_for_is_one_line_and_a_bug_stays_a_traceback(tmp_path, monkeypatch, capsys, failure):
    # train --image-size 1000 on Fashion-MNIST asked the allocator for 60 GB and ended in a traceback
    def load(*args, **kwargs):
        raise failure

    monkeypatch.setattr("mapdit.train.load_data", load)
    assert cli("train", *TINY_ARGS, "--num-steps", 1, "--results-dir", tmp_path / "r") == 2
    line = error_line(capsys, "train")
    assert "not enough memory" in line and "--image-size" in line
    monkeypatch.setattr("mapdit.train.load_data", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli("train", *TINY_ARGS, "--num-steps", 1, "--results-dir", tmp_path / "r2")


# ------------------------------------------------------------------------------------------------
# the environment: a reader of the output that goes away (`mapdit model-info | head -1`)
class ClosedPipe(io.StringIO):
    """A stream whose reader has gone: every write and flush fails as a pipe's does."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_report_to_a_reader_that_went_away_is_not_an_error(monkeypatch):
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["model-info", "--model", "DiT-XXS/4"]) == 0


@needs_fmnist
def test_training_goes_on_when_the_reader_of_its_output_goes_away(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    monkeypatch.setattr("sys.stderr", ClosedPipe())  # the progress bar's stream too
    assert main(["train", *TINY_ARGS, "--num-steps", "2", "--ckpt-every", "1", "--ema-snapshots", "0",
                 "--results-dir", str(tmp_path)]) == 0
    run = next(tmp_path.iterdir())
    assert [s for s, _ in list_checkpoints(run)] == [1, 2]
    assert "finished" in (run / "log.txt").read_text()


def test_a_closed_pipe_on_stdout_leaves_no_word_on_stderr(tmp_path):
    """In a real process: the interpreter's own last flush of stdout is quiet too."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "mapdit.cli", "model-info", "--model", "DiT-XXS/4"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")
