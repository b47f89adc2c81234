"""One sampling path: the SamplerSpec (one default, validated once), the integer schedules every sampler
evaluates the model at (every step count 1-1000), one scheduler per call, and today's samples kept."""
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import ENV, cli, error_line, needs_fmnist, only_error_line, temporaries
from mapdit import sample as sample_module
from mapdit import samplers as samplers_module
from mapdit.config import make_config
from mapdit.errors import UserError
from mapdit.model import DiT
from mapdit.sample import save_png
from mapdit.samplers import (
    DEFAULT_CFG,
    PAPER_SPEC,
    SAMPLER_CHOICES,
    SAMPLER_NAMES,
    Sampler,
    SamplerSpec,
    model_timesteps,
    sample,
)
from mapdit.schedulers import (
    DIFFUSERS_SAMPLERS,
    make_scheduler,
    model_evaluations,
    set_integer_timesteps,
    trailing_timesteps,
)

# diffusers' own set_timesteps calls np.array on torch tensors (a numpy 2 DeprecationWarning, thousands here)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FIXTURE = Path(__file__).parent / "fixtures" / "sampler_reference.safetensors"
SAMPLERS = sorted(set(SAMPLER_NAMES.values()))  # ddim, ddpm, dpm++2m, heun, unipc
T = 1000


# ------------------------------------------------------------------------------------------------ the spec
def test_one_default_spec():
    spec = SamplerSpec()
    assert (spec.sampler, spec.steps, spec.cfg_scale, spec.eta, spec.guide_channels, spec.clip_denoised) == (
        "dpm++2m", 20, None, 0.0, None, "auto")
    assert spec.guidance(null_class=10) == DEFAULT_CFG == 4.0  # a model trained with label dropout
    assert spec.guidance(null_class=None) == 1.0  # one without: no guidance
    assert spec.tag(4.0) == "dpm++2m20-cfg4"
    # ablate scores with the paper's sampler, spelled out
    assert (PAPER_SPEC.sampler, PAPER_SPEC.steps, PAPER_SPEC.cfg_scale) == ("ddpm", 250, 1.0)


def test_spec_canonical_names_and_replacement():
    assert SamplerSpec("ancestral").sampler == "ddpm"
    base = SamplerSpec("ddim", 50, cfg_scale=2.0)
    assert SamplerSpec.of(base) is base
    assert SamplerSpec.of(base, steps=7) == SamplerSpec("ddim", 7, cfg_scale=2.0)
    assert SamplerSpec.of(None, steps=None, sampler="heun") == SamplerSpec("heun")  # None: not given


@pytest.mark.parametrize("fields, message", [
    ({"sampler": "lms"}, "unknown sampler 'lms'; valid names"),
    ({"steps": 0}, "--steps 0 must be at least 1"),
    ({"steps": 2.5}, "--steps 2.5 must be a whole number"),
    ({"cfg_scale": -1.0}, "--cfg-scale -1.0 must be a finite number >= 0"),
    ({"cfg_scale": float("nan")}, "--cfg-scale nan must be a finite number"),
    ({"eta": 0.5}, "--eta applies to --sampler ddim only, not dpm++2m"),
    ({"sampler": "ddim", "eta": 2.0}, "--eta 2.0 must be in [0, 1]"),
    ({"guide_channels": 0}, "--guide-channels 0 must be at least 1"),
    ({"clip_denoised": "maybe"}, "--clip-denoised 'maybe': use one of auto, yes, no"),
])
def test_spec_refuses_bad_values_in_one_line(fields, message):
    with pytest.raises(UserError) as err:
        SamplerSpec(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_spec_checks_against_the_model():
    with pytest.raises(UserError, match="needs a model trained with label dropout"):
        SamplerSpec(cfg_scale=2.0).guidance(null_class=None)
    with pytest.raises(UserError, match="--steps 1001 must be between 1 and 1000"):
        Sampler(SamplerSpec(steps=1001))
    with pytest.raises(UserError, match="--guide-channels 5 is more than the model's 4 channels"):
        Sampler(SamplerSpec(guide_channels=5), channels=4)


def test_cli_defaults_are_the_spec_defaults():
    """`mapdit sample` and `mapdit fid` generate their sampling options from SamplerSpec: same defaults, and
    every field is an option of both (with its help and default shown)."""
    from mapdit.cli import build_parser
    from mapdit.commands.options import from_args

    parser = build_parser()
    for command in ("sample", "fid"):
        assert from_args(SamplerSpec, parser.parse_args([command, "--run", "somewhere"])) == SamplerSpec()
        args = parser.parse_args([command, "--run", "x", "--sampler", "ancestral", "--num-sampling-steps", "7",
                                  "--cfg-scale", "2", "--guide-channels", "1", "--clip-denoised", "no"])
        assert from_args(SamplerSpec, args) == SamplerSpec("ddpm", 7, 2.0, guide_channels=1, clip_denoised="no")
    assert set(SAMPLER_CHOICES) >= set(DIFFUSERS_SAMPLERS) | {"ddpm", "ddim", "ancestral"}


# ------------------------------------------------------------------------------------------------ schedules
def test_trailing_timesteps_every_count():
    """Integer, in [0, T-1], strictly decreasing, `steps` of them, first T-1, for every count 1..T."""
    for n in range(1, T + 1):
        ts = np.asarray(trailing_timesteps(n, T))
        assert len(ts) == n and ts[0] == T - 1 and ts[-1] >= 0, n
        assert (np.diff(ts) < 0).all(), n
    assert trailing_timesteps(20, T) == list(range(999, 0, -50))  # the default: diffusers' own 20 steps
    # diffusers' float arange gives 62 steps for 61: [999, 983, ..., 32, 15, -1]
    assert len(trailing_timesteps(61, T)) == 61 and trailing_timesteps(61, T)[-3:] == [48, 32, 15]
    with pytest.raises(ValueError):
        trailing_timesteps(T + 1, T)


def test_trailing_matches_diffusers_where_diffusers_is_right():
    """Where diffusers' float spacing yields `steps` valid steps, ours are the same but at exact halves."""
    differ = []
    for n in range(1, T + 1):
        theirs = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        if len(theirs) != n or theirs.min() < 0:
            continue  # the 62 counts (61, 103, ...) where it gains a step at t = -1
        ours = np.asarray(trailing_timesteps(n, T))
        if not np.array_equal(ours, theirs):
            differ.append(n)
            assert np.abs(ours - theirs).max() == 1, n  # one step at a k T / n that is exactly x.5
            assert ((np.arange(n, 0, -1) * 2 * T) % n == 0).any(), n
    assert 20 not in differ and 50 not in differ and 25 not in differ


@pytest.mark.parametrize("name", SAMPLERS)
def test_model_timesteps_every_count(name):
    """What the model is called at, for every step count: integer steps in [0, 999], the expected count,
    strictly decreasing (heun: each step but the first is evaluated twice, predictor and corrector). For the
    diffusers samplers, the scheduler (one, reused for all counts) is set to them and must agree."""
    scheduler = make_scheduler(name) if name in DIFFUSERS_SAMPLERS else None
    for n in range(1, T + 1):
        calls = model_timesteps(name, n, T)
        assert len(calls) == model_evaluations(name, n), (name, n)
        assert all(isinstance(t, int) and 0 <= t <= T - 1 for t in calls), (name, n)
        distinct = calls if name != "heun" else [calls[0], *calls[1::2]]
        # first T-1; ours at 1 step: the respacing keeps step 0 alone (IDDPM's space_timesteps does too)
        assert calls[0] == (0 if n == 1 and name in ("ddpm", "ddim") else T - 1), (name, n)
        assert all(a > b for a, b in zip(distinct, distinct[1:])), (name, n)
        if name == "heun":
            assert calls[1::2] == calls[2::2]
        if scheduler is not None:
            set_integer_timesteps(scheduler, trailing_timesteps(n, T))
            assert scheduler.timesteps.round().long().tolist() == calls, (name, n)
            assert len(scheduler.sigmas) == len(scheduler.timesteps) + 1


class Calls:
    """A cheap model_fn (eps = 0.1 x, v = 0) that records the steps it is called at."""

    def __init__(self):
        self.t = []

    def __call__(self, x, t, y):
        assert t.dtype == torch.int64 and len(set(t.tolist())) == 1
        self.t.append(int(t[0]))
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)


COUNTS = [1, 2, 3, 7, 20, 48, 61, 103, 121, 122, 201, 333, 999, 1000]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_loop_calls_the_model_at_the_schedule(name):
    """The whole loop, on counts that include diffusers' extra-step ones: the model sees exactly
    model_timesteps, never -1; one Sampler (one scheduler) serves every batch."""
    runner = {n: Sampler(SamplerSpec(name, n)) for n in COUNTS}
    for n in COUNTS:
        for batch in range(2):  # the same scheduler twice: its state is reset each batch
            fn = Calls()
            x = runner[n](fn, y=torch.zeros(1, dtype=torch.long), noise=torch.randn(1, 1, 2, 2))
            assert torch.isfinite(x).all()
            assert fn.t == model_timesteps(name, n, T), (name, n, batch)


def test_one_scheduler_per_call(monkeypatch):
    """sample_images builds one diffusers scheduler for all its batches (was: one per batch)."""
    made = []
    real = samplers_module.make_scheduler
    monkeypatch.setattr(samplers_module, "make_scheduler", lambda *a, **k: made.append(a) or real(*a, **k))
    model = tiny(preset="E", channels=1)
    images = sample_module.sample_images(model, {"kind": "fashion-mnist"}, torch.arange(7) % 3, steps=3,
                                         batch_size=2, shard=False)
    assert images.shape == (7, 8, 8, 1) and images.dtype == np.uint8 and len(made) == 1


# ------------------------------------------------------------------------------------------------ same samples
def tiny(preset: str, channels: int) -> DiT:
    """A DiT-XXS/4 on 8x8 inputs, 3 classes, every weight perturbed (as tests/fixtures/make_sampler_reference.py)."""
    torch.manual_seed(0)
    model = DiT(make_config("DiT-XXS/4", preset=preset, input_size=8, in_channels=channels, num_classes=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset, channels", [("A", 4), ("E", 1)])
def test_default_samples_equal_todays(preset, channels):
    """The default sampler (dpm++2m, 20 steps, guidance 4) gives the samples that mapdit's sampling gave
    before the one-path rewrite (fixture written by the old code: tests/fixtures/make_sampler_reference.py),
    and so do unipc and heun at 20 steps, where diffusers' own spacing was right."""
    reference = load_file(str(FIXTURE))
    model = tiny(preset, channels)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    clip = "yes" if channels == 1 else "no"
    for name in DIFFUSERS_SAMPLERS:
        spec = SamplerSpec(name, 20, cfg_scale=4.0, clip_denoised=clip)
        parts = sample_module.generate(model, labels, Sampler.for_model(spec, model), seed=3, batch_size=3)
        x = torch.cat([parts[b] for b in sorted(parts)])
        expected = reference[f"{preset}-{name}-20"]
        # float rounding only: the model's own float order may change (the A model's samples reach ~950)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5 * (1 + expected.abs().max().item()))


def test_low_level_sample_keeps_its_keywords():
    """`sample(model_fn, sampler=..., steps=..., cfg_scale=...)` is the default spec with those fields."""
    fn = Calls()
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = sample(fn, shape=noise.shape, y=torch.zeros(2, dtype=torch.long), noise=noise, steps=5)
    b = sample(Calls(), shape=noise.shape, y=torch.zeros(2, dtype=torch.long), noise=noise,
               spec=SamplerSpec("dpm++2m", 5))
    assert torch.equal(a, b) and fn.t == trailing_timesteps(5, T)


# ------------------------------------------------------------------------------------------------ grid names
@needs_fmnist
def test_sample_grid_name_says_what_it_shows(run_copy, capsys):
    """`mapdit sample` names its grid after the checkpoint step, the weights, the sampler and the guidance,
    and prints the path (the last line of stdout)."""
    assert cli("sample", "--run", run_copy, "--steps", 2, "--num-samples", 1) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == run_copy / "samples" / "grid-step0000004-ema0.050-dpm++2m2-cfg4.png" and path.is_file()
    assert cli("sample", "--run", run_copy, "--steps", 2, "--weights", "raw", "--class-label", 3,
               "--sampler", "ddim", "--cfg-scale", 1.5, "--num-samples", 2) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.name == "class3-step0000004-raw-ddim2-cfg1.5.png" and path.is_file()


@needs_fmnist
@pytest.mark.parametrize("label", [10, -1])
def test_sample_class_label_out_of_range(tiny_run, tmp_path, capsys, label):
    assert cli("sample", "--result-dir", tiny_run, "--class-label", label, "--steps", 2,
               "--out", tmp_path / "x.png") == 2
    assert f"--class-label {label} is out of range" in error_line(capsys, "sample")
    assert not (tmp_path / "x.png").exists()


@needs_fmnist
@pytest.mark.parametrize("where", ["checkpoints/step-0000004-1.safetensors", "checkpoints/new.png",
                                   "ema/sigma-0.050/step-0000099.safetensors"])
def test_sample_out_never_writes_into_what_training_owns(run_copy, capsys, where):
    # a grid written as checkpoints/step-...-1.safetensors or as an EMA snapshot sat among training's files
    before = sorted(p.name for p in run_copy.rglob("*"))
    assert cli("sample", "--run", run_copy, "--steps", 2, "--num-samples", 1, "--out", run_copy / where) == 2
    assert "where only training writes" in error_line(capsys, "sample")
    assert sorted(p.name for p in run_copy.rglob("*")) == before


@needs_fmnist
@pytest.mark.parametrize("out, expected", [("folder", "is a folder: name a .png or .npz file"),
                                           ("new/", "is a folder: name a .png or .npz file"),
                                           ("grid.txt", "name a .png file (a grid) or an .npz file")])
def test_sample_out_that_is_not_a_png_or_npz_name_is_refused_before_sampling(tiny_run, tmp_path, capsys, out,
                                                                             expected):
    # --out DIR/ wrote the grid next to the folder (DIR-1), --out x.txt wrote PNG bytes under a .txt name
    (tmp_path / "folder").mkdir()
    assert cli("sample", "--run", tiny_run, "--steps", 2, "--num-samples", 1, "--out", f"{tmp_path}/{out}") == 2
    assert expected in only_error_line(capsys, "sample")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


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
