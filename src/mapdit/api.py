"""The Python API, in the spirit of diffusers' `from_pretrained` and a pipeline call (docs/python-api.md):

    import mapdit
    pipe = mapdit.load_run("results/000-DiT-XXS-4", ema=0.10)   # raw weights, a tracked or a post-hoc EMA
    images = pipe(labels=[0, 1, 2])                              # uint8 (3, H, W, C), the CLI's defaults
    fd = pipe.score(num_samples=1000)                            # FD_fmnist / FID of the run's own data
    model = mapdit.build_model("DiT-S/2", preset="E")            # a fresh model from a config
    pipe = mapdit.load_dit_checkpoint("DiT-XL-2-256x256.pt")     # an original DiT checkpoint + the SD-VAE

Every call samples through `mapdit.sample.sample_images` with a `SamplerSpec`: the default is the one of
`mapdit sample` and `mapdit fid` (dpm++2m, 20 steps, guidance 4 for a model with a null class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import ModelConfig, make_config
from .data.pixels import to_uint8_images
from .errors import UserError
from .evaluate.scoring import DEFAULT_CACHE, quick_fid
from .model import DiT
from .model import load_dit_checkpoint as read_dit_state
from .runio import load_run_config
from .sample import class_rows, grid_name, image_grid, sample_images, save_png
from .samplers import SamplerSpec
from .weights import check_weight_choice, load_model

# DiT's latent scale (DiT sample.py: vae.decode(samples / 0.18215)); Stable Diffusion's VAE fine-tuned on EMA
DIT_LATENT_SCALE = 0.18215
DIT_VAE = "stabilityai/sd-vae-ft-ema"


class Pipeline:
    """A model with the weights to sample, what its samples are (`data_meta`, or a `decode` function) and a
    default SamplerSpec. Call it with labels to get uint8 images (N, H, W, C)."""

    def __init__(self, model: DiT, data_meta: dict | None = None, *, spec: SamplerSpec | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, description: str = "",
                 run_dir: Path | None = None, step: int | None = None, ema_std: float | None = None):
        self.model = model.eval()
        self.data_meta = dict(data_meta or {})
        self.spec = spec or SamplerSpec()
        self.decode = decode
        self.description = description
        self.run_dir, self.step, self.ema_std = run_dir, step, ema_std

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"Pipeline({self.config.model}, {self.description or 'weights in memory'}, {self.spec})"

    def __call__(self, labels: Sequence[int] | torch.Tensor, *, spec: SamplerSpec | None = None, seed: int = 0,
                 batch_size: int = 64, progress: bool = False, **spec_fields) -> np.ndarray:
        """uint8 images (N, H, W, C) for class `labels` (N,), drawn with `spec` (default: this pipeline's)
        with `spec_fields` replaced (sampler, steps, cfg_scale, eta, guide_channels, clip_denoised)."""
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.config.num_classes):
            raise UserError(f"labels must be in 0..{self.config.num_classes - 1}, got {y.tolist()[:8]}")
        spec = SamplerSpec.of(spec or self.spec, **spec_fields)
        return sample_images(self.model, self.data_meta, y, spec, seed=seed, batch_size=batch_size,
                             progress=progress, shard=False, decode=self.decode)

    def grid(self, path: str | Path, *, per_class: int = 8, classes: Sequence[int] | None = None,
             spec: SamplerSpec | None = None, seed: int = 0, **spec_fields) -> Path:
        """A PNG grid, one row per class (default: up to 10 classes spread over the labels); returns the path
        written (never replacing a file: path-1.png, ... if it exists). `path`: a .png file, or a folder that
        gets `mapdit sample`'s name (grid-step0004000-ema0.100-dpm++2m20-cfg4.png for a run)."""
        spec = SamplerSpec.of(spec or self.spec, **spec_fields)
        path = Path(path)
        if path.suffix != ".png":
            cfg_scale = spec.guidance(self.config.null_class)
            path = path / (grid_name(spec, cfg_scale, step=self.step, ema_std=self.ema_std) if self.step is not None
                           else f"grid-{spec.tag(cfg_scale)}.png")
        rows = class_rows(self.config.num_classes, None if classes is None else list(classes))
        images = self([c for c in rows for _ in range(per_class)], spec=spec, seed=seed)
        return save_png(path, image_grid(images, nrow=per_class), upscale=max(1, 64 // images.shape[1]), new=True)

    def score(self, num_samples: int = 1000, *, ref: str | None = None, features=None,
              spec: SamplerSpec | None = None, seed: int = 0, batch_size: int = 64, num_ref: int | None = None,
              cache_dir=DEFAULT_CACHE, **spec_fields) -> float:
        """The Fréchet distance of `num_samples` samples to the reference (default: the run's own data; for
        Fashion-MNIST FD_fmnist with our classifier, else FID), as `mapdit fid` computes it."""
        spec = SamplerSpec.of(spec or self.spec, **spec_fields)
        return quick_fid(self.model, self.data_meta, num_samples, ref=ref, features=features, spec=spec,
                         seed=seed, batch_size=batch_size, num_ref=num_ref, cache_dir=cache_dir)

    def to(self, device: str | torch.device) -> Pipeline:
        self.model.to(device)
        return self


def load_run(run_dir: str | Path, *, ema: float | None = None, weights: str = "ema", ckpt: str | None = None,
             device: str | torch.device = "cpu", spec: SamplerSpec | None = None, log=None) -> Pipeline:
    """A run folder made by `mapdit train` as a Pipeline. `ema`: the EMA width sigma_rel (a tracked one is
    read from the checkpoint, any other reconstructed post hoc from the snapshots and cached; None: the
    smallest tracked one); `weights="raw"`: the trained weights instead. `ckpt`: a checkpoint (default: the
    newest complete one)."""
    check_weight_choice(weights, ema)
    loaded: dict = {}
    model, config, desc = load_model(run_dir, weights=weights, ema_std=ema, ckpt=ckpt, device=device,
                                     log=log or (lambda m: None), info=loaded)
    return Pipeline(model, config["data"], spec=spec, description=desc, run_dir=Path(run_dir),
                    step=loaded["step"], ema_std=loaded["ema_std"])


def run_config(run_dir: str | Path) -> dict:
    """A run's config.json (model, train, data)."""
    return load_run_config(Path(run_dir))


def build_model(name: str = "DiT-S/2", *, preset: str | None = None, seed: int | None = None,
                **config) -> DiT:
    """A fresh DiT from a model name, a preset (A = the original DiT ... E = all MP options) and ModelConfig
    fields (input_size, in_channels, num_classes, ...), as `mapdit train --model NAME --config X` builds it."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiT(make_config(name, preset=preset, **config))


def vae_decoder(vae, *, scale: float = DIT_LATENT_SCALE, batch_size: int = 32):
    """DiT's decoding (its sample.py): images = VAE.decode(z / scale), clamped to [-1, 1], as uint8 (N, H, W, 3).
    `vae`: a diffusers AutoencoderKL, or its hub id / saved folder (loaded by `data.latents.load_vae`)."""
    if isinstance(vae, (str, Path)):
        from .data.latents import load_vae

        vae = load_vae(vae)
    vae = vae.eval()

    def decode(z: torch.Tensor) -> torch.Tensor:
        device = next(vae.parameters()).device
        out = []
        with torch.inference_mode():
            for chunk in z.split(batch_size):
                x = vae.decode(chunk.to(device=device, dtype=torch.float32) / scale).sample.clamp(-1.0, 1.0)
                out.append(to_uint8_images(x.float().cpu()))
        return torch.cat(out) if out else torch.zeros(0, 0, 0, 3, dtype=torch.uint8)

    return decode


def load_dit_checkpoint(path: str | Path, model: str = "DiT-XL/2", *, image_size: int = 256,
                        num_classes: int = 1000, vae=DIT_VAE, which: str = "ema",
                        device: str | torch.device = "cpu", spec: SamplerSpec | None = None) -> Pipeline:
    """An original DiT checkpoint (facebookresearch/DiT: `DiT-XL-2-256x256.pt`, a state dict; or a training
    checkpoint {"model", "ema", "opt", "args"}, whose `which` entry is used) as a Pipeline of our Config-A
    model (the same network: tests/test_dit_reference.py). Read weights-only: nothing in the file is run.

    Latents are decoded by the SD-VAE (`vae`: a hub id or saved folder, loaded from the local cache first,
    or an AutoencoderKL; None: no decoder, and sampling images is refused). DiT's own sampling guides 3 of
    the 4 latent channels: the default spec does the same (guide_channels=3); the rest is the CLI's default."""
    if image_size % 8:
        raise UserError(f"image_size {image_size} must be a multiple of 8 (the SD-VAE downsamples by 8)")
    cfg = make_config(model, preset="A", input_size=image_size // 8, in_channels=4, num_classes=num_classes,
                      learn_sigma=True, class_dropout_prob=0.1)
    net = DiT(cfg)
    try:
        state = read_dit_state(str(path), which=which)
    except FileNotFoundError:
        raise UserError(f"DiT checkpoint {path} not found") from None
    except Exception as err:  # noqa: BLE001 - any unpickling error: not a weights-only DiT file
        raise UserError(f"{path} is not a DiT checkpoint readable weights-only ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{path} does not match {model} at {image_size}x{image_size} with {num_classes} classes "
                        f"({detail})") from None
    decode = vae_decoder(vae) if vae is not None else _no_decoder
    meta = {"kind": "latents", "vae": str(vae) if isinstance(vae, (str, Path)) else None}
    return Pipeline(net.to(device), meta, spec=spec or SamplerSpec(guide_channels=3), decode=decode,
                    description=f"DiT checkpoint {path} ({which if which else 'state dict'})")


def _no_decoder(z: torch.Tensor) -> torch.Tensor:
    raise UserError("this pipeline has no VAE to decode its latents: load it with vae=<hub id, folder or "
                    "AutoencoderKL>")
