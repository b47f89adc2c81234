"""FID of a trained run (`mapdit fid`, `fid_for_run`) and the sampling hooks for training
(`sample_grid_from_model`, `quick_fid`).

`fid_for_run` samples N images from a run (sharded over torchrun ranks: rank r draws batches r, r + W, ...,
with the same per-batch seeds as one process, so the images do not depend on the number of ranks),
gathers them once on rank 0, keeps them beside the run as an ADM-layout npz (arr_0 uint8 N x H x W x C,
arr_1 labels) and computes the Fréchet distance against a reference with `evaluate_samples`:

    run/eval/samples-<settings>.npz        reused (not resampled) when one with identical settings exists
    run/eval/fid-<features>-<settings>.json    never overwritten (fid-...-1.json, ... next)

<settings> = step<checkpoint>-<raw | ema<std>>-<sampler><steps>-cfg<scale>-seed<seed>-n<N>-bs<batch size>
(the batch size is part of it: sample i gets the noise of batch i // batch_size).

Feature rule: "inception" (FID, 2048-d Inception-v3 pool features via torch-fidelity) when Inception
weights are given or the run's data is not Fashion-MNIST; "fmnist" (FD_fmnist with our classifier, plus
the class-conditioning accuracy) for Fashion-MNIST runs. `--features` overrides the rule.
Reference default: the run's own training data (for Fashion-MNIST: its test split; a prepared latent
folder is decoded with its VAE), prepared at the samples' resolution. Reference statistics are cached
(default $MAPDIT_CACHE/fid-stats, i.e. ~/.cache/mapdit/fid-stats).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from mapdit.errors import UserError

DEFAULT_NUM_SAMPLES = 10_000
_DEFAULT_CACHE = object()  # "use fid.default_cache_dir()" (None disables the cache)


# ------------------------------------------------------------------------------------------------
# torch.distributed helpers (all no-ops in a single process)
# ------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    import torch.distributed as dist

    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_main(fn: Callable, share: bool = True):
    """Run `fn` on rank 0 only. Its failure fails every rank (instead of leaving them waiting in the next
    collective); with `share` every rank gets rank 0's (picklable) result, else the others get None."""
    rank, world = _world()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UserError as err:
            error = ("user", str(err))
        except BaseException as err:
            if world > 1:
                _broadcast((("other", f"rank 0 failed: {type(err).__name__}: {err}"), None))
            raise
    if world == 1:
        if error:
            raise UserError(error[1])
        return result
    error, shared = _broadcast((error, result if share else None))
    if error:
        raise UserError(error[1]) if error[0] == "user" else RuntimeError(error[1])
    return result if rank == 0 else shared


def _gather_on_main(parts: dict):
    """{batch index: array} of every rank, merged on rank 0 (one collective); None on other ranks."""
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return parts
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(parts, gathered, dst=0)
    if rank != 0:
        return None
    return {k: v for part in gathered for k, v in part.items()}


# ------------------------------------------------------------------------------------------------
# Rules and names
# ------------------------------------------------------------------------------------------------
def default_features(data_meta: dict, inception_weights=None) -> str:
    """'inception' when Inception weights are given or the data is not Fashion-MNIST, else 'fmnist'."""
    if inception_weights is not None:
        return "inception"
    return "fmnist" if data_meta.get("kind") == "fashion-mnist" else "inception"


def default_reference(data_meta: dict) -> str:
    """The run's own data: 'fashion-mnist' (its test split), an IDX folder, an image folder, a latent folder."""
    path = data_meta.get("path")
    if not path:
        raise UserError("the run records no data path: pass --ref")
    return str(path)


def reference_options(data_meta: dict) -> dict:
    """load_dataset options that bring a pixel reference to the samples' geometry."""
    if data_meta.get("kind") == "latents":
        size = data_meta.get("image_resolution")
        return {"image_size": int(size)} if size else {}
    return {k: data_meta[k] for k in ("image_size", "patch_size") if data_meta.get(k) is not None}


def settings_tag(s: dict) -> str:
    w = "raw" if s["weights"] == "raw" else f"ema{s['ema_std']:.3f}"
    return (f"step{s['checkpoint_step']:07d}-{w}-{s['sampler']}{s['steps']}-cfg{s['cfg_scale']:g}-"
            f"seed{s['seed']}-n{s['num_samples']}-bs{s['batch_size']}")


def sample_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform class labels from `seed` (the rule `mapdit sample --out x.npz` uses too)."""
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def _check_sampling(num_samples: int, sampler: str, steps: int, batch_size: int) -> str:
    from mapdit.samplers import check_sampler

    if num_samples < 2:
        raise UserError(f"--num-samples {num_samples}: a Fréchet distance needs at least 2 samples")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    return check_sampler(sampler)  # the canonical name; a missing diffusers fails here, before any loading


def _extractor(features, inception_weights, device):
    from mapdit.evaluate.fid import FeatureExtractor, ModuleFeatures, get_extractor

    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, torch.nn.Module):
        return ModuleFeatures(features, type(features).__name__)
    if inception_weights is not None and str(features).lower() not in ("inception", "inception-v3", "inceptionv3"):
        raise UserError("--inception-weights is for --features inception")
    return get_extractor(features, inception_weights, device)


# ------------------------------------------------------------------------------------------------
# Sampling to uint8 images, sharded
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(model, data_meta: dict, labels: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
                  cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = False):
    """uint8 images (N, H, W, C) numpy for `labels` on rank 0 (None on other ranks): every rank samples
    and decodes its own batches, then they are gathered once. The model's train/eval mode is restored."""
    from mapdit.data import clip_denoised_for, decoder_for
    from mapdit.sample import generate

    rank, world = _world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        decode = decoder_for(data_meta, device)
        parts = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                         batch_size=batch_size, progress=progress and rank == 0, rank=rank, world_size=world,
                         clip_denoised=clip_denoised_for(data_meta))
        parts = {b: decode(x.to(device)).cpu().numpy() for b, x in parts.items()}
    finally:
        model.train(was_training)
    parts = _gather_on_main(parts)
    if parts is None:
        return None
    return np.concatenate([parts[b] for b in sorted(parts)])


def _load_if_reusable(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The images of an existing samples npz if it holds exactly these labels (same settings), else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = npz["arr_1"]
            if not np.array_equal(stored, labels):
                return None
            images = npz["arr_0"]
    except (OSError, KeyError, ValueError):
        return None
    return images if images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(labels) else None


# ------------------------------------------------------------------------------------------------
# FID of a run
# ------------------------------------------------------------------------------------------------
def fid_for_run(run_dir: str | Path, num_samples: int = DEFAULT_NUM_SAMPLES, *, ref: str | None = None,
                features=None, weights: str = "ema", ema_std: float | None = None, ckpt: str | None = None,
                cfg_scale: float = 1.0, sampler: str = "ddpm", steps: int = 250, seed: int = 0,
                batch_size: int = 64, inception_weights: str | None = None, cache_dir=_DEFAULT_CACHE,
                num_ref: int | None = None, split: str = "test", device: str | None = None,
                progress: bool = True, write: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Sample `num_samples` images from a run and compute their Fréchet distance to `ref`.

    Call it on every rank under torchrun (sampling is sharded; rank 0 evaluates and writes); every rank
    returns the same dict: evaluate_samples' result ("fid" or "fd_<features>", "metric",
    ["conditioning_accuracy"], "features", "reference", ...) plus "value" (the distance), "settings",
    "samples_npz", "samples_reused" and "result_json" (None with write=False).

    features: "fmnist" | "inception" | a FeatureExtractor / module (None: the rule in the module doc).
    ref: None (the run's data) or what `evaluate_samples` takes. cache_dir None: no reference cache.
    """
    from mapdit import distributed as dist_utils
    from mapdit.evaluate.fid import default_cache_dir, evaluate_samples
    from mapdit.runio import check_writable, claim_new_path, load_run_config, write_json
    from mapdit.sample import save_npz
    from mapdit.weights import load_model, resolve_checkpoint

    d = dist_utils.init(device)
    torch.set_flush_denormal(True)
    say = (log or (lambda m: print(m, file=sys.stderr))) if d.is_main else (lambda m: None)
    sampler = _check_sampling(num_samples, sampler, steps, batch_size)
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if weights not in ("ema", "raw"):
        raise UserError(f"--weights {weights!r}: use 'ema' or 'raw'")
    if weights == "raw" and ema_std is not None:
        raise UserError("--ema-std chooses an EMA width, which contradicts --weights raw: drop one of them")
    data_meta = config["data"]
    if features is None:
        features = default_features(data_meta, inception_weights)
    ref = default_reference(data_meta) if ref is None else ref
    cache = default_cache_dir() if cache_dir is _DEFAULT_CACHE else cache_dir
    ext = _on_main(lambda: _extractor(features, inception_weights, d.device), share=False)  # fail early
    step, ckpt_path = _on_main(lambda: resolve_checkpoint(run_dir, ckpt))
    # samples and results go into the run: a read-only run fails here, not after the sampling
    _on_main(lambda: check_writable(run_dir / "eval", "the run's eval folder",
                                    "copy the run to a writable place to evaluate it"), share=False)
    tracked = config["train"]["ema_stds"]
    settings = {"weights": weights, "ema_std": (min(tracked) if ema_std is None else float(ema_std))
                if weights == "ema" else None, "cfg_scale": float(cfg_scale), "sampler": sampler,
                "steps": int(steps), "seed": int(seed), "num_samples": int(num_samples),
                "batch_size": int(batch_size), "checkpoint_step": int(step), "checkpoint": str(ckpt_path),
                "features": getattr(ext, "name", None) or str(features),  # ext lives on rank 0 only
                "reference": str(ref), "num_reference": num_ref, "split": split}
    tag = settings_tag(settings)
    labels = sample_labels(num_samples, int(config["model"]["num_classes"]), seed)
    npz_path = run_dir / "eval" / f"samples-{tag}.npz"
    images = None

    def load_existing() -> bool:
        nonlocal images
        images = _load_if_reusable(npz_path, labels.numpy())
        return images is not None

    reuse = _on_main(load_existing)
    if reuse:
        say(f"reusing {npz_path} (samples with identical settings exist; delete it to resample)")
    else:
        model, _, desc = load_model(run_dir, weights=weights, ema_std=ema_std, ckpt=str(ckpt_path),
                                    device=d.device, log=say)
        settings["model_weights"] = desc
        say(f"sampling {num_samples} images from {run_dir} ({desc}) on {d.world_size} rank(s): {sampler} "
            f"{steps} steps, cfg {cfg_scale:g}, seed {seed}")
        images = sample_images(model, data_meta, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                               seed=seed, batch_size=batch_size, progress=progress)
        del model
        if d.is_main:
            npz_path = save_npz(npz_path, images, labels.numpy(), new=True)
            say(f"samples -> {npz_path}")

    def evaluate() -> dict:
        result = evaluate_samples(images, labels, ref, ext, cache, extra_settings=settings, num_ref=num_ref,
                                  split=split, data_options=reference_options(data_meta),
                                  batch_size=max(batch_size, 64), progress=progress, log=say)
        result.update(value=result[result["metric"]], run_dir=str(run_dir), samples_npz=str(npz_path),
                      samples_reused=bool(reuse), result_json=None)
        if write:
            path = claim_new_path(run_dir / "eval" / f"fid-{settings['features']}-{tag}.json")  # race-free
            result["result_json"] = str(path)
            try:
                write_json(path, result)
            except BaseException:
                path.unlink(missing_ok=True)  # the empty reservation
                raise
        acc = result.get("conditioning_accuracy")
        say(f"{result['metric']} = {result['value']:.4f}" + (f", conditioning accuracy {acc:.4f}" if acc is not None
                                                             else "") + f" ({num_samples} samples vs {ref})")
        for warning in result.get("warnings", []):
            say(f"warning: {warning}")
        return result

    result = _on_main(evaluate)
    dist_utils.barrier(d)
    return result


# ------------------------------------------------------------------------------------------------
# Training hooks
# ------------------------------------------------------------------------------------------------
def model_with_weights(model, named: Mapping[str, torch.Tensor]):
    """A copy of `model` (the plain DiT) with the parameters in `named` loaded, e.g. an EMA:
    model_with_weights(model, ema.averaged(sigma)). The training model is untouched."""
    twin = copy.deepcopy(model)
    own = dict(twin.named_parameters())
    unknown = set(named) - set(own)
    if unknown:
        raise UserError(f"weights do not match the model (unexpected {sorted(unknown)[:3]})")
    with torch.no_grad():
        for name, value in named.items():
            own[name].copy_(value)
    return twin.eval()


def sample_grid_from_model(model, data_meta: dict, path: str | Path, *, per_class: int = 8,
                           classes: list[int] | None = None, sampler: str = "ddpm", steps: int = 50,
                           cfg_scale: float | None = None, seed: int = 0, batch_size: int = 64) -> Path:
    """A PNG grid, one row per class (default: up to 10 classes spread over the label range), from `model`
    (the plain DiT with the weights to show, e.g. `model_with_weights(model, ema.averaged(s))`).
    cfg_scale None: 4 when the model has a null class, else 1. Single process (call it on rank 0);
    returns the written path (`path`, or path-1.png, ... if it exists)."""
    from mapdit.data import clip_denoised_for, decoder_for
    from mapdit.sample import generate, image_grid, save_png

    cfg = model.config
    if classes is None:
        k = min(cfg.num_classes, 10)
        classes = sorted({round(i * (cfg.num_classes - 1) / max(k - 1, 1)) for i in range(k)})
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    scale = (4.0 if cfg.null_class is not None else 1.0) if cfg_scale is None else cfg_scale
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=scale, seed=seed,
                         batch_size=batch_size, clip_denoised=clip_denoised_for(data_meta))
        x = torch.cat([parts[b] for b in sorted(parts)])
        images = decoder_for(data_meta, device)(x.to(device)).cpu().numpy()
    finally:
        model.train(was_training)
    upscale = max(1, 64 // images.shape[1])
    return save_png(Path(path), image_grid(images, nrow=per_class), upscale=upscale, new=True)


def quick_fid(model, data_meta: dict, num_samples: int, *, ref: str | None = None, features=None,
              sampler: str = "ddpm", steps: int = 50, cfg_scale: float = 1.0, seed: int = 0,
              batch_size: int = 64, num_ref: int | None = None, cache_dir=_DEFAULT_CACHE,
              inception_weights: str | None = None) -> float:
    """The Fréchet distance of `num_samples` samples of `model` (the plain DiT with the weights to score)
    to the reference (default: the data's own; features by the module's rule). Nothing is written but
    the cached reference statistics. Under torchrun call it on every rank: sampling is sharded, rank 0
    evaluates, every rank returns the same value."""
    from mapdit.evaluate.fid import default_cache_dir, evaluate_samples

    sampler = _check_sampling(num_samples, sampler, steps, batch_size)
    device = next(model.parameters()).device
    features = default_features(data_meta, inception_weights) if features is None else features
    ref = default_reference(data_meta) if ref is None else ref
    cache = default_cache_dir() if cache_dir is _DEFAULT_CACHE else cache_dir
    ext = _on_main(lambda: _extractor(features, inception_weights, device), share=False)
    labels = sample_labels(num_samples, model.config.num_classes, seed)
    images = sample_images(model, data_meta, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                           seed=seed, batch_size=batch_size)

    def evaluate() -> float:
        result = evaluate_samples(images, labels, ref, ext, cache, num_ref=num_ref,
                                  data_options=reference_options(data_meta), batch_size=max(batch_size, 64))
        return float(result[result["metric"]])

    return _on_main(evaluate)


# ------------------------------------------------------------------------------------------------
# `mapdit fid`
# ------------------------------------------------------------------------------------------------
def cmd_fid(args: argparse.Namespace) -> dict:
    from mapdit import distributed as dist_utils

    result = fid_for_run(args.result_dir, args.num_samples, ref=args.ref, features=args.features,
                         weights=args.weights, ema_std=args.ema_std, ckpt=args.ckpt, cfg_scale=args.cfg_scale,
                         sampler=args.sampler, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                         inception_weights=args.inception_weights,
                         cache_dir=args.cache_dir if args.cache_dir is not None else _DEFAULT_CACHE,
                         num_ref=args.num_ref, split=args.split, device=args.device)
    if _world()[0] == 0:
        print(result["result_json"])
    dist_utils.shutdown(dist_utils.init(args.device))
    return result


def add_fid_args(p: argparse.ArgumentParser) -> None:
    from mapdit.samplers import SAMPLER_CHOICES

    p.add_argument("--result-dir", required=True, help="a run folder made by training")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--ema-std", type=float, default=None,
                   help="EMA width (default the smallest tracked one; others are reconstructed post hoc)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file (default: the newest complete one)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm",
                   help="ddpm/ancestral, ddim (ours) or dpm++2m, unipc, heun (diffusers; few steps, e.g. --steps 20)")
    p.add_argument("--steps", "--num-sampling-steps", dest="steps", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (per rank)")
    p.add_argument("--ref", default=None,
                   help="reference: 'fashion-mnist', an image folder, a prepared latent folder or an ADM "
                        "reference batch .npz (default: the run's training data)")
    p.add_argument("--num-ref", type=int, default=None, help="use a fixed random subset of the reference")
    p.add_argument("--split", default="test", help="split of an IDX reference (default test)")
    p.add_argument("--features", choices=("fmnist", "inception"), default=None,
                   help="default: fmnist for Fashion-MNIST runs, inception otherwise or with --inception-weights")
    p.add_argument("--inception-weights", default=None, help="a local copy of torch-fidelity's Inception weights")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default ~/.cache/mapdit/fid-stats)")
    p.add_argument("--device", default=None)


def register(sub) -> None:
    p = sub.add_parser("fid", help="FID (or FD_fmnist) of a run's samples against a reference (also under torchrun)")
    add_fid_args(p)
    p.set_defaults(func=cmd_fid)
