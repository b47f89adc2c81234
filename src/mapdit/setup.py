"""Set-up of a training run, before its first step: the settings (resolved once), the device, the data
(and its fingerprint: a resume refuses other data unless told), the model with its optimizer and EMA, and
what config.json records. Files are only read until the settings and the data check out; the run folder is
made after that (`NewRun` removes it again if set-up fails or is stopped)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from . import distributed as dist_utils
from .config import ModelConfig, TrainConfig
from .data import load_dataset
from .distributed import Dist
from .ema import PowerEMA
from .errors import UserError
from .model import DiT
from .recipes import RECIPES
from .resume import resolve_run_dir, resume_config, stored_train_config
from .runio import load_run_config

DEFAULT_DATA = "fashion-mnist"
FINGERPRINT_IMAGES = 4096  # images hashed for the data fingerprint, evenly spaced (all of a smaller set)


@dataclass
class Settings:
    """What a run is driven by: `tc` with every default filled, the model config (sizes from the data once
    it is loaded), and on resume the run folder and its saved config.json."""

    tc: TrainConfig
    model_cfg: ModelConfig
    run_dir: Path | None = None
    saved: dict | None = None


def settings(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None) -> Settings:
    """On resume the run's own settings with what `resume_config` takes from `tc`; every default is filled
    here, once (`TrainConfig.resolved`: learning rate, warm-up, decay, checkpoint interval; the data path),
    and checked (one line per mistake) before anything is read or written."""
    run_dir: Path | None = None
    saved: dict | None = None
    if resume is not None:
        run_dir = resolve_run_dir(tc.results_dir, resume)
        saved = load_run_config(run_dir)
        model_cfg = ModelConfig.from_dict(saved["model"])
        tc = resume_config(stored_train_config(saved, run_dir), tc, run_dir)
    elif model_cfg is None:
        raise ValueError("train() needs a model config unless it resumes a run")
    tc = tc.resolved(model_cfg)  # a copy with the defaults filled (they need only the model's MP options)
    if tc.data_path is None and tc.recipe is not None and "data_path" not in RECIPES[tc.recipe].train:
        # a recipe that names no data is for the user's data (imagenet-paper: prepared latents); the default,
        # Fashion-MNIST, trained DiT-XS/2 on 28x28 images at 21 s a step instead
        raise UserError(f"--recipe {tc.recipe} trains on data you pass: add --data-path (its recipe: "
                        f"{RECIPES[tc.recipe].what})")
    tc.data_path = tc.data_path or DEFAULT_DATA
    tc.check(dist_utils.world_size_from_env())
    return Settings(tc, model_cfg, run_dir, saved)


def init_device(tc: TrainConfig) -> Dist:
    """The process group under torchrun (else one process) and its device, with the fast float settings."""
    d = dist_utils.init(tc.device)
    torch.set_flush_denormal(True)  # CPU: denormal floats (tiny Adam moments, zero-init layers) cost ~10x per op
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return d


def check_labels(data, data_path: str) -> None:
    labels = getattr(data, "labels", None)
    if labels is None or not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= data.num_classes:
        first = int(torch.nonzero((labels < 0) | (labels >= data.num_classes))[0, 0])
        raise UserError(f"the data at {data_path} has class labels {lo}..{hi} but {data.num_classes} classes "
                        f"(first: label {int(labels[first])} at index {first}): every label must be in "
                        f"0..{data.num_classes - 1} (fix the labels or the class list)")


def data_fingerprint(data) -> dict:
    """What identifies a training set, cheaply: its size, the shape of an item, and a checksum (BLAKE2b) of
    every label and of up to FINGERPRINT_IMAGES items evenly spaced (prepared latents: their shards'
    recorded sha256 instead of the items)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(data.labels.cpu().numpy().tobytes())
    images = getattr(data, "images", None)
    if images is not None:
        pick = torch.linspace(0, len(data) - 1, min(len(data), FINGERPRINT_IMAGES)).round().long()
        h.update(images[pick].cpu().numpy().tobytes())
    else:
        h.update(" ".join(shard.get("sha256", "") for shard in data.index.get("shards", [])).encode())
    return {"count": len(data), "shape": [data.channels, data.resolution, data.resolution],
            "checksum": h.hexdigest()}


def check_same_data(s: Settings, fingerprint: dict, allow_new_data: bool) -> None:
    """On resume, the data must be the run's own (the fingerprint config.json recorded), unless the user says
    otherwise; a run recorded before fingerprints resumes as it always did."""
    old = (s.saved or {}).get("data_fingerprint")
    if old is None or old == fingerprint or allow_new_data:
        return
    raise UserError(f"--resume {s.run_dir}: the data at {s.tc.data_path} ({fingerprint['count']} items, checksum "
                    f"{fingerprint['checksum'][:12]}) is not the data the run was trained on ({old.get('count')} "
                    f"items, checksum {str(old.get('checksum'))[:12]}): resume with the run's own data, or pass "
                    "--allow-new-data to go on with this data")


def run_record(s: Settings, model_cfg: ModelConfig, data, fingerprint: dict, start_step: int, world_size: int,
               fd_metric: str) -> dict:
    """What config.json records: the model, the run's settings, the data and its fingerprint, the name of the
    FD in metrics.csv, versions; data the run trained on before (--allow-new-data) in data_history."""
    record = {"model": model_cfg.to_dict(), "train": s.tc.to_dict(), "data": data.meta(),
              "data_fingerprint": fingerprint, "fd_metric": fd_metric, "mapdit_version": __version__,
              "torch_version": torch.__version__, "world_size": world_size}
    saved = s.saved or {}
    history = list(saved.get("data_history", []))
    if saved.get("data_fingerprint") not in (None, fingerprint):  # new data, allowed: remember the old
        history.append({"until_step": start_step, "data": saved.get("data"),
                        "data_fingerprint": saved["data_fingerprint"]})
    if history:
        record["data_history"] = history
    return record


def load_data(s: Settings):
    """(the training data, the model config with the data's sizes, the data's fingerprint). On resume the
    data must fit the run's model and be the run's own data (or --allow-new-data)."""
    tc, model_cfg, saved = s.tc, s.model_cfg, s.saved
    data = load_dataset(tc.data_path, patch_size=model_cfg.patch_size, image_size=tc.image_size, hflip=tc.hflip)
    check_labels(data, tc.data_path)
    if data.num_classes > model_cfg.num_classes and saved is not None:
        raise UserError(f"the data has {data.num_classes} classes but the run was trained with "
                        f"{model_cfg.num_classes}: resume with the run's own data")
    model_cfg = dataclasses.replace(model_cfg, input_size=data.resolution, in_channels=data.channels,
                                    num_classes=data.num_classes).validate()
    if saved is not None and model_cfg.to_dict() != ModelConfig.from_dict(saved["model"]).to_dict():
        raise UserError(f"the data at {tc.data_path} ({data.channels}x{data.resolution}x{data.resolution}, "
                        f"{data.num_classes} classes) does not match the run's model "
                        f"({saved['model']['in_channels']}x{saved['model']['input_size']}, "
                        f"{saved['model']['num_classes']} classes)")
    fingerprint = data_fingerprint(data)
    check_same_data(s, fingerprint, tc.allow_new_data)
    return data, model_cfg, fingerprint


def model_optimizer_ema(model_cfg: ModelConfig, tc: TrainConfig, device: torch.device):
    """(model, its trainable parameters, Adam over them, their power EMA); the model is seeded by tc.seed."""
    torch.manual_seed(tc.seed)
    model = DiT(model_cfg).to(device)
    named = model.trainable_parameters()
    params = [p for _, p in named]
    # fused Adam: one kernel over all parameters; on the CPU 3.5x faster than foreach (BENCHMARKS.md)
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.Adam(params, lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
                           foreach=not fused, fused=fused or None)
    ema = PowerEMA(dict(named), sigma_rels=tc.ema_stds)
    return model, params, opt, ema


def forward_of(model: DiT, d: Dist, compile: bool):
    """What the loss calls: the model, in DistributedDataParallel under torchrun, compiled with --compile
    under torchrun (one process compiles the loss with it: `losses_of`)."""
    fwd = model
    if d.enabled:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                        else None)
        if compile:
            fwd = torch.compile(fwd)
    return fwd


class CompiledLosses:
    """`--compile` in one process: the model and the IDDPM loss compiled as one graph, so that Inductor fuses
    the loss's elementwise work (q_sample, the MSE, the variational bound) with the model's and compiles the
    backward with it. It stands in for the diffusion in `train_step`, which only calls `training_losses`."""

    def __init__(self, diffusion, fwd):
        self.num_timesteps = diffusion.num_timesteps
        self._losses = torch.compile(functools.partial(diffusion.training_losses, fwd))

    def training_losses(self, fwd, x0, t, y, noise=None, min_snr_gamma=None) -> dict:
        return self._losses(x0, t, y, noise=noise, min_snr_gamma=min_snr_gamma)


def losses_of(diffusion, fwd, d: Dist, compile: bool):
    """What `train_step` takes the loss from: the diffusion, or with --compile in one process CompiledLosses."""
    return CompiledLosses(diffusion, fwd) if compile and not d.enabled else diffusion


class NewRun:
    """The run folder `train` made before its first step: removed again if set-up fails or is stopped, so a
    run that never reached step 1 leaves nothing behind (and the next run takes its number)."""

    def __init__(self):
        self.path: Path | None = None
        self.started = False
