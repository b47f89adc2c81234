"""Evaluation of runs: `fid_for_run` / `mapdit fid` (sharded sampling, npz reuse, JSON results), the
magnitude study, the training hooks and `mapdit ablate` (table, skipping finished variants, resuming).

One tiny Fashion-MNIST run (DiT-XXS/4, 4 steps, batch 8) is trained once for the module; sampling uses a
handful of steps. Torch runs on one thread here: on a busy 2-core machine two threads spin against each
other and a forward of this model goes from ~30 ms to over a second.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import mapdit.cli
from helpers import free_port, needs_fmnist, tiny_model, tiny_train
from mapdit.data import fashion_mnist
from mapdit.evaluate import magnitudes, scoring
from mapdit.evaluate.fid import ModuleFeatures
from mapdit.experiments.fid_run import fid_for_run
from mapdit.nn import magnitude
from mapdit.runio import list_checkpoints, load_run_config
from mapdit.sample import sample_grid_from_model
from mapdit.train import train
from mapdit.weights import load_model, model_with_weights

pytestmark = [needs_fmnist, pytest.mark.usefixtures("no_fmnist_override")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fid-cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """conftest's tiny run with two EMA snapshots instead of four."""
    return train(tiny_train(tmp_path_factory.mktemp("runs"), ema_snapshots=2), tiny_model())


def run_cli(argv) -> int:
    return mapdit.cli.main([str(a) for a in argv])


class StandIn(nn.Module):
    """A small random conv net standing in for Inception (float images in [-1, 1] -> 8 features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2),
                                 nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def _noisy(images: np.ndarray, sigma: float) -> np.ndarray:
    g = torch.Generator().manual_seed(1)
    x = torch.from_numpy(images).float() / 127.5 - 1 + sigma * torch.randn(images.shape, generator=g)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------ FID
def test_distance_to_itself_is_zero_and_grows_with_noise(tiny_run, tmp_path):
    ext = ModuleFeatures(StandIn(), "standin")
    kw = dict(features=ext, steps=3, batch_size=8, cache_dir=None, progress=False)
    first = fid_for_run(tiny_run, 64, ref="fashion-mnist", num_ref=100, **kw)
    assert first["metric"] == "fd_standin" and first["samples_reused"] is False
    npz = Path(first["samples_npz"])
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (64, 28, 28, 1) and images.dtype == np.uint8 and labels.shape == (64,)
    assert npz.parent == tiny_run / "eval" and npz.name.startswith("samples-step0000004-ema0.050-dpm++2m3-")

    same = fid_for_run(tiny_run, 64, ref=str(npz), **kw)
    assert same["samples_reused"] is True and same["samples_npz"] == str(npz)
    assert Path(same["result_json"]) != Path(first["result_json"])  # never overwritten
    scale = float(np.trace(np.cov(ext(images).numpy().T)))
    assert same["value"] < 1e-9 * scale

    values = []
    for sigma in (0.1, 0.2, 0.4, 0.8):
        ref = tmp_path / f"noisy-{sigma}.npz"
        np.savez(ref, arr_0=_noisy(images, sigma), arr_1=labels)
        values.append(fid_for_run(tiny_run, 64, ref=str(ref), write=False, **kw)["value"])
    assert values[0] > 1e-4 * scale
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_fid_command_end_to_end(tiny_run, cache, capsys, monkeypatch):
    args = ["fid", "--result-dir", tiny_run, "--num-samples", 16, "--steps", 3, "--batch-size", 8,
            "--features", "fmnist", "--ref", "fashion-mnist", "--num-ref", 200, "--cache-dir", cache]
    assert run_cli(args) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent == tiny_run / "eval" and path.name.startswith("fid-fmnist-step0000004-")
    result = json.loads(path.read_text())
    assert result["metric"] == "fd_fmnist" and result["value"] == result["fd_fmnist"] > 0
    assert 0 <= result["conditioning_accuracy"] <= 1
    s = result["settings"]
    assert (s["weights"], s["ema_std"], s["cfg_scale"], s["sampler"], s["steps"], s["seed"], s["num_samples"],
            s["features"], s["reference"], s["checkpoint_step"]) == ("ema", 0.05, 4.0, "dpm++2m", 3, 0, 16, "fmnist",
                                                                     "fashion-mnist", 4)  # guidance: the one default
    assert result["num_reference"] == 200 and result["reference"]["split"] == "test"

    # a second run with the same settings reuses the samples and writes a new JSON
    assert run_cli(args) == 0
    captured = capsys.readouterr()
    assert "reusing" in captured.err and Path(captured.out.strip().splitlines()[-1]) != path

    # Inception without torch-fidelity: exit 2 with one line, before any sampling
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    before = sorted((tiny_run / "eval").iterdir())
    code = run_cli(["fid", "--result-dir", tiny_run, "--num-samples", 16, "--steps", 3, "--features", "inception"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'mapdit[fid]'" in err[0], err
    assert err[0].startswith("mapdit fid: error:")
    assert sorted((tiny_run / "eval").iterdir()) == before


def test_default_feature_rule():
    assert scoring.default_features({"kind": "fashion-mnist"}) == "fmnist"
    assert scoring.default_features({"kind": "fashion-mnist"}, inception_weights="w.pth") == "inception"
    assert scoring.default_features({"kind": "image-folder"}) == "inception"
    assert scoring.default_features({"kind": "latents"}) == "inception"
    meta = {"kind": "fashion-mnist", "patch_size": 8, "image_size": None}
    assert scoring.reference_options(meta) == {"patch_size": 8}
    assert scoring.reference_options({"kind": "latents", "image_resolution": 256}) == {"image_size": 256}


@pytest.mark.slow
def test_sharded_sampling_matches_one_process(tiny_run, cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for dst in (one, two):
        shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("eval"))
    # 3 batches of 4: rank 0 draws batches 0 and 2, rank 1 batch 1
    args = ["fid", "--num-samples", 12, "--batch-size", 4, "--steps", 3, "--seed", 5, "--features", "fmnist",
            "--ref", "fashion-mnist", "--num-ref", 200, "--cache-dir", cache]
    assert run_cli([*args, "--result-dir", one]) == 0
    script = tmp_path / "mapdit_with_eval.py"
    script.write_text("import sys\nimport mapdit.cli as cli\n"
                      "sys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(fashion_mnist.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
                           *map(str, args), "--result-dir", str(two)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz_one, = (one / "eval").glob("samples-*.npz")
    npz_two, = (two / "eval").glob("samples-*.npz")
    assert npz_one.name == npz_two.name
    with np.load(npz_one) as a, np.load(npz_two) as b:
        assert a["arr_0"].shape == (12, 28, 28, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    res_one, = (one / "eval").glob("fid-*.json")
    res_two, = (two / "eval").glob("fid-*.json")
    v1, v2 = json.loads(res_one.read_text())["value"], json.loads(res_two.read_text())["value"]
    assert v1 == pytest.approx(v2, rel=1e-9)


# ------------------------------------------------------------------------------------------------ magnitudes
@torch.no_grad()
def _by_hand(model, x, t, y) -> tuple[list[float], torch.Tensor]:
    """Residual magnitude after each block, running the model's pieces one by one; and the output."""
    h = model.combine(model.x_embedder(x), model.pos_embed)
    c = model.condition(model.t_embedder(t), model.y_embedder(y))
    mags = []
    for block in model.blocks:
        h = block(h, c)
        mags.append(float(magnitude(h)))
    from mapdit.model import unpatchify

    return mags, unpatchify(model.final_layer(h, c), model.patch, model.out_channels)


@needs_fmnist
def test_magnitudes_checks_its_output_folder_before_measuring(tiny_run, tmp_path, capsys, monkeypatch):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    shutil.rmtree(run / "eval", ignore_errors=True)
    (run / "eval").write_text("")  # files cannot be created under it (root ignores permissions)
    measured = []
    monkeypatch.setattr(magnitudes, "measure", lambda *a: measured.append(1) or {})
    assert run_cli(["magnitudes", "--run", run, "--batch-size", 8]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "eval folder" in err and "is not writable" in err
    assert measured == []  # refused before the first checkpoint, not after all of them


def test_magnitudes_csv_matches_direct_measurement(tiny_run, capsys):
    assert run_cli(["magnitudes", "--result-dir", tiny_run, "--batch-size", 8, "--seed", 3]) == 0
    csv_path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert csv_path.parent == tiny_run / "eval" and csv_path.suffix == ".csv"
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["step", "quantity", "block", "value"]
        rows = list(reader)
    table = {(int(r["step"]), r["quantity"], int(r["block"])): float(r["value"]) for r in rows}
    steps = [s for s, _ in list_checkpoints(tiny_run)]
    assert steps == [2, 4] and {s for s, _, _ in table} == set(steps)
    assert {q for _, q, _ in table} == set(magnitudes.QUANTITIES)
    assert len(rows) == len(steps) * len(magnitudes.QUANTITIES) * 4
    info = json.loads(csv_path.with_suffix(".json").read_text())
    assert info["input"] == "data" and info["t"] == 500 and info["batch_size"] == 8

    config = load_run_config(tiny_run)
    x, t, y, source = magnitudes.fixed_batch(config, 8, 3)
    assert source == "data" and (t == 500).all()
    for step, path in list_checkpoints(tiny_run):
        model, _, _ = load_model(tiny_run, weights="raw", ckpt=str(path))
        mags, out = _by_hand(model, x, t, y)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x, t, y))
        for k, value in enumerate(mags):
            assert table[(step, "residual", k)] == pytest.approx(value, rel=1e-5)
            w = model.blocks[k].mlp.fc1.weight.detach()
            assert table[(step, "weight_fc1", k)] == pytest.approx(float(w.pow(2).mean(1).sqrt().mean()), rel=1e-5)
        assert magnitudes.residual_magnitudes(model, x, t, y) == pytest.approx(mags, rel=1e-5)
    # forced weight normalisation (config E) keeps the stored weights at magnitude 1
    assert table[(4, "weight_qkv", 0)] == pytest.approx(1.0, abs=1e-3)

    for quantity in ("residual", "mlp_out", "weight_qkv"):
        png = tiny_run / "eval" / f"{csv_path.stem}-{quantity}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation writes beside, never over
    again = magnitudes.measure_run(tiny_run, batch_size=8, seed=3, plots=False, log=lambda m: None)
    assert again["csv"] != csv_path and again["rows"] == [(s, q, b, pytest.approx(v, rel=1e-6))
                                                           for s, q, b, v in magnitudes.read_csv(csv_path)]


def test_gaussian_inputs_when_the_data_is_missing(tiny_run, capsys):
    config = load_run_config(tiny_run)
    config["data"]["path"] = str(tiny_run / "no-such-data")
    messages = []
    x, t, y, source = magnitudes.fixed_batch(config, 4, 0, log=messages.append)
    assert source == "gaussian" and x.shape == (4, 1, 28, 28) and "Gaussian" in messages[0]
    x2, _, y2, _ = magnitudes.fixed_batch(config, 4, 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)


# ------------------------------------------------------------------------------------------------ training hooks
def test_training_hooks(tiny_run, cache, tmp_path):
    config = load_run_config(tiny_run)
    raw, _, _ = load_model(tiny_run, weights="raw")
    ema_model, _, _ = load_model(tiny_run, weights="ema")
    from mapdit.runio import load_tensors, split_prefix

    _, path = list_checkpoints(tiny_run)[-1]
    twin = model_with_weights(raw, split_prefix(load_tensors(path), "ema.0.050/"))
    for (name, a), b in zip(twin.state_dict().items(), ema_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(twin.blocks[0].attn.qkv.weight, raw.blocks[0].attn.qkv.weight)

    raw.train()
    png = sample_grid_from_model(twin, config["data"], tmp_path / "grid.png", per_class=2, steps=3)
    assert raw.training and png == tmp_path / "grid.png"
    from PIL import Image

    assert Image.open(png).size == ((2 * 30 + 2) * 2, (10 * 30 + 2) * 2)  # 10 class rows, upscaled x2
    assert sample_grid_from_model(twin, config["data"], png, per_class=2, steps=3) == tmp_path / "grid-1.png"

    value = scoring.quick_fid(twin, config["data"], 16, steps=3, batch_size=8, num_ref=200, cache_dir=cache)
    full = fid_for_run(tiny_run, 16, steps=3, batch_size=8, num_ref=200, cache_dir=cache, write=False,
                               progress=False)
    assert full["metric"] == "fd_fmnist" and value == pytest.approx(full["value"], rel=1e-9)


# ------------------------------------------------------------------------------------------------ ablate
@pytest.mark.slow
def test_ablate_table_skip_and_resume(tmp_path, cache, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--configs", "A,E", "--model", "DiT-XXS/4", "--num-steps", 4, "--batch-size", 8,
            "--fid-samples", 16, "--features", "fmnist", "--sampling-steps", 5, "--num-ref", 200,
            "--sample-batch-size", 8, "--magnitude-batch-size", 8, "--ema-snapshots", 0, "--log-every", 2,
            "--cache-dir", cache, "--out", out]
    assert run_cli(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "ablation.md")
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["A-adaln", "E-adaln"]
    for r in rows:
        assert r["seeds"] == "0" and int(r["parameters"]) > 0 and float(r["step_time_ms"]) > 0
        assert float(r["fd_fmnist_mean"]) > 0 and r["fd_fmnist_std"] == ""
        assert 0 <= float(r["conditioning_accuracy"]) <= 1 and float(r["max_block_magnitude"]) > 0
    assert int(rows[0]["parameters"]) != int(rows[1]["parameters"])  # MP linears drop the biases
    md = (out / "ablation.md").read_text()
    assert "| A-adaln | 0 |" in md and "| E-adaln | 0 |" in md and "FD_fmnist" in md
    runs = sorted(out.glob("runs/*/*"))
    assert len(runs) == 2 and all((r / "eval" / "magnitudes.csv").is_file() for r in runs)
    result = json.loads((out / "results" / "E-adaln-seed0.json").read_text())
    assert result["fid_json"] and Path(result["fid_json"]).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*")}

    # rerun: both skipped, nothing retrained
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert err.count("skipped, already finished") == 2 and "training DiT-XXS/4" not in err
    assert sorted(out.glob("runs/*/*")) == runs
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*")} == stamps

    # an unfinished variant (no result yet) continues its own run instead of starting a new one
    (out / "results" / "E-adaln-seed0.json").unlink()
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert "E-adaln-seed0: resuming" in err and err.count("skipped, already finished") == 1
    assert "reusing" in err  # same checkpoint, same settings: the samples are reused
    assert sorted(out.glob("runs/*/*")) == runs
    assert json.loads((out / "results" / "E-adaln-seed0.json").read_text())["value"] == pytest.approx(result["value"])

    # other settings in the same folder are refused
    assert run_cli([*args[:-2], "--out", out, "--fid-samples", 32]) == 2
    assert "other settings" in capsys.readouterr().err
