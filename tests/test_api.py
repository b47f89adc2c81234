"""The Python API (mapdit.api, docs/python-api.md): the page's examples run as written, a pipeline samples
what `mapdit sample` samples, and an original DiT checkpoint (a tiny random one in DiT's layout) samples
through a VAE."""
import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mapdit
from helpers import RUN, cli, needs_fmnist
from mapdit.config import make_config
from mapdit.errors import UserError
from mapdit.model import DiT

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
NOT_RUN = "<!-- not run"


def doc_blocks() -> list[str]:
    """The ```python blocks of docs/python-api.md, in order, except those under a 'not run' comment."""
    text = DOC.read_text()
    blocks = []
    for m in re.finditer(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", text, re.S):
        if not m.group("before").startswith(NOT_RUN):
            blocks.append(m.group("code"))
    return blocks


@needs_fmnist
def test_docs_examples_run(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_run, tmp_path / "results" / RUN)
    monkeypatch.setenv("MAPDIT_CACHE", str(tmp_path / "cache"))
    blocks = doc_blocks()
    assert len(blocks) == 5  # load and sample, specs, grid, score, build
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documentation's own examples
    out = capsys.readouterr().out
    assert "(3, 28, 28, 1) uint8" in out
    assert namespace["path"].name == "grid-step0000004-ema0.100-dpm++2m20-cfg4.png"  # as the page says
    assert namespace["path"].is_file() and np.isfinite(namespace["fd"]) and namespace["fd"] > 0
    assert namespace["raw"].ema_std is None and namespace["pipe"].ema_std == 0.10
    assert namespace["model"].config.model == "DiT-XXS/4"


@needs_fmnist
def test_pipeline_samples_what_the_cli_samples(tiny_run, tmp_path):
    """Same defaults, same seed, same batch size, same labels: the same images as `mapdit sample`."""
    out = tmp_path / "x.npz"
    assert cli("sample", "--run", tiny_run, "--num-samples", 10, "--out", out, "--seed", 2, "--batch-size", 4,
               "--steps", 3) == 0
    with np.load(out) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    pipe = mapdit.load_run(tiny_run)
    assert pipe.ema_std == 0.05 and pipe.step == 4  # the CLI's default weights: the smallest tracked EMA
    again = pipe(labels=labels.tolist(), seed=2, batch_size=4, steps=3)
    assert again.dtype == np.uint8 and np.array_equal(again, images)
    with pytest.raises(UserError, match="labels must be in 0..9"):
        pipe(labels=[10])


def test_build_model_is_make_config():
    model = mapdit.build_model("DiT-XXS/4", preset="E", input_size=28, in_channels=1, num_classes=10, seed=0)
    assert model.config == make_config("DiT-XXS/4", preset="E", input_size=28, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    twin = DiT(model.config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_import_mapdit_stays_light():
    code = ("import sys, mapdit; assert 'torch' not in sys.modules, 'torch loaded'; "
            "mapdit.SamplerSpec; assert 'torch' in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------------------------------------ DiT checkpoints
def dit_layout(state: dict[str, torch.Tensor], patch: int) -> dict[str, torch.Tensor]:
    """Our Config-A state dict in facebookresearch/DiT's layout: the patch embedding as a conv kernel
    (D, C, p, p) instead of our linear over (row, column, channel) patches (D, p*p*C)."""
    out = dict(state)
    w = out["x_embedder.proj.weight"]
    out["x_embedder.proj.weight"] = w.reshape(w.shape[0], patch, patch, -1).permute(0, 3, 1, 2).contiguous()
    return out


def tiny_vae():
    """A random AutoencoderKL with the SD-VAE's shape rules (4 latent channels, downsampling 8)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                   norm_num_groups=4).eval()


@pytest.fixture
def dit_files(tmp_path):
    """A tiny Config-A model (32x32 images: 4x4 latents) saved as DiT saves: a published-style state dict,
    and a training checkpoint with model / ema / opt / args (an argparse Namespace, as DiT's train.py)."""
    cfg = make_config("DiT-XXS/4", preset="A", input_size=4, in_channels=4, num_classes=10)
    torch.manual_seed(1)
    raw, ema = DiT(cfg), DiT(cfg)
    with torch.no_grad():
        for a, b in zip(raw.parameters(), ema.parameters()):
            a.add_(0.05 * torch.randn_like(a))
            b.add_(0.05 * torch.randn_like(b))
    published = tmp_path / "DiT-XXS-4-32x32.pt"
    torch.save(dit_layout(ema.state_dict(), 4), published)
    training = tmp_path / "0001000.pt"
    torch.save({"model": dit_layout(raw.state_dict(), 4), "ema": dit_layout(ema.state_dict(), 4), "opt": {},
                "args": argparse.Namespace(model="DiT-XXS/4", image_size=32)}, training)
    return published, training, ema, raw


def test_dit_checkpoint_loads_and_samples(dit_files):
    published, training, ema, raw = dit_files
    vae = tiny_vae()
    for path in (published, training):  # a training checkpoint: its EMA, as DiT's sample.py uses
        pipe = mapdit.load_dit_checkpoint(path, model="DiT-XXS/4", image_size=32, num_classes=10, vae=vae)
        for (name, a), b in zip(pipe.model.state_dict().items(), ema.state_dict().values()):
            assert torch.equal(a, b), name
        assert pipe.spec.guide_channels == 3 and pipe.spec.sampler == "dpm++2m"  # DiT guides 3 of 4 channels
    images = pipe(labels=[1, 2, 3], steps=3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    # the same latents, decoded by hand as DiT's sample.py does: vae.decode(z / 0.18215)
    from mapdit.sample import Sampler, SamplerSpec, generate

    spec = SamplerSpec(steps=3, guide_channels=3)
    parts = generate(pipe.model, torch.tensor([1, 2, 3]), Sampler.for_model(spec, pipe.model, pipe.data_meta))
    with torch.no_grad():
        x = vae.decode(parts[0] / 0.18215).sample.clamp(-1, 1)
    by_hand = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(by_hand.astype(int) - images.astype(int)).max() <= 1
    raw_pipe = mapdit.load_dit_checkpoint(training, model="DiT-XXS/4", image_size=32, num_classes=10, vae=vae,
                                          which="model")
    assert torch.equal(raw_pipe.model.final_layer.linear.weight, raw.final_layer.linear.weight)


def test_dit_checkpoint_mistakes_are_one_line(dit_files, tmp_path):
    published, _, _, _ = dit_files
    with pytest.raises(UserError, match="does not match DiT-XXS/2"):
        mapdit.load_dit_checkpoint(published, model="DiT-XXS/2", image_size=32, num_classes=10, vae=None)
    with pytest.raises(UserError, match="not found"):
        mapdit.load_dit_checkpoint(tmp_path / "missing.pt", model="DiT-XXS/4", image_size=32, num_classes=10)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "code": print}, evil)  # a function: refused weights-only
    with pytest.raises(UserError, match="readable weights-only"):
        mapdit.load_dit_checkpoint(evil, model="DiT-XXS/4", image_size=32, num_classes=10, vae=None)
    pipe = mapdit.load_dit_checkpoint(published, model="DiT-XXS/4", image_size=32, num_classes=10, vae=None)
    with pytest.raises(UserError, match="no VAE"):
        pipe(labels=[0], steps=2)
