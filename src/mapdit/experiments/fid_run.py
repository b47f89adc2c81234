"""FID of a trained run (`mapdit fid`, `fid_for_run`): sample it, keep the samples, score and record them.

`fid_for_run` samples N images from a run (sharded over torchrun ranks: rank r draws batches r, r + W, ...,
with the same per-batch seeds as one process, so the images do not depend on the number of ranks),
gathers them once on rank 0, keeps them beside the run as an ADM-layout npz (arr_0 uint8 N x H x W x C,
arr_1 labels) and computes the Fréchet distance against a reference with `evaluate_samples`:

    run/eval/samples-<settings>-k<key>.npz        reused (not resampled) when one with the same key exists;
                                                  a damaged one is rebuilt in place (it is a cache)
    run/eval/fid-<features>-<settings>-k<key>.json    never overwritten (fid-...-1.json, ... next); written
                                                  complete, then linked to its name

<settings> = step<checkpoint>-<raw | ema<std>>-<sampler><steps>-cfg<scale>-seed<seed>-n<N>-bs<batch size>
(the batch size is part of it: sample i gets the noise of batch i // batch_size) is for people; <key>
is a digest of everything the images depend on: the checkpoint's content (its recorded sha256), the EMA
width at full precision (and, for a post-hoc width, the snapshots it is reconstructed from), the sampler
settings, the model config and the data's description. A checkpoint of another run, or one rewritten by
a resume that fell back, gives another key, so its samples are never taken for these.

Features and reference follow the rules of `mapdit.evaluate.scoring` (`--features` overrides them).
Reference statistics are cached (default $MAPDIT_CACHE/fid-stats, i.e. ~/.cache/mapdit/fid-stats).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mapdit import distributed as dist_utils
from mapdit.config import ModelConfig
from mapdit.distributed import on_main
from mapdit.ema import weights_identity
from mapdit.evaluate.fid import default_cache_dir, evaluate_samples, reference_stats
from mapdit.evaluate.scoring import (
    DEFAULT_CACHE,
    check_sampling,
    default_features,
    default_reference,
    extractor,
    reference_options,
)
from mapdit.runio import (
    cache_key,
    check_writable,
    checkpoint_identity,
    clean_temporaries,
    load_run_config,
    write_new_json,
)
from mapdit.sample import sample_images, sample_labels, save_npz
from mapdit.samplers import SamplerSpec
from mapdit.weights import check_weight_choice, load_model, resolve_checkpoint

DEFAULT_NUM_SAMPLES = 10_000


def settings_tag(s: dict) -> str:
    w = "raw" if s["weights"] == "raw" else f"ema{s['ema_std']:.3f}"
    return (f"step{s['checkpoint_step']:07d}-{w}-{s['sampler']}{s['steps']}-cfg{s['cfg_scale']:g}-"
            f"seed{s['seed']}-n{s['num_samples']}-bs{s['batch_size']}")


def load_if_reusable(path: Path, labels: np.ndarray) -> np.ndarray | None:
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


def fid_for_run(run_dir: str | Path, num_samples: int = DEFAULT_NUM_SAMPLES, *, ref: str | None = None,
                features=None, weights: str = "ema", ema_std: float | None = None, ckpt: str | None = None,
                spec: SamplerSpec | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                steps: int | None = None, seed: int = 0,
                batch_size: int = 64, inception_weights: str | None = None, cache_dir=DEFAULT_CACHE,
                num_ref: int | None = None, split: str = "test", device: str | None = None,
                progress: bool = True, write: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Sample `num_samples` images from a run and compute their Fréchet distance to `ref`.

    Call it on every rank under torchrun (sampling is sharded; rank 0 evaluates and writes); every rank
    returns the same dict: evaluate_samples' result ("fid" or "fd_<features>", "metric",
    ["conditioning_accuracy"], "features", "reference", ...) plus "value" (the distance), "settings",
    "samples_npz", "samples_reused" and "result_json" (None with write=False).

    spec: how to sample (default: the default SamplerSpec; cfg_scale, sampler, steps replace its fields).
    features: "fmnist" | "inception" | a FeatureExtractor / module (None: the rule in the module doc).
    ref: None (the run's data) or what `evaluate_samples` takes. cache_dir None: no reference cache.
    """
    d = dist_utils.init(device)
    torch.set_flush_denormal(True)
    say = (log or (lambda m: print(m, file=sys.stderr))) if d.is_main else (lambda m: None)
    spec = SamplerSpec.of(spec, sampler=sampler, steps=steps, cfg_scale=cfg_scale)  # checked before any loading
    check_sampling(num_samples, batch_size)
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    sampler, steps = spec.sampler, spec.steps
    cfg_scale = spec.guidance(ModelConfig.from_dict(config["model"]).null_class)
    check_weight_choice(weights, ema_std)
    data_meta = config["data"]
    if features is None:
        features = default_features(data_meta, inception_weights)
    ref = default_reference(data_meta) if ref is None else ref
    cache = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
    ext = on_main(lambda: extractor(features, inception_weights, d.device), share=False)  # fail early
    step, ckpt_path = on_main(lambda: resolve_checkpoint(run_dir, ckpt))
    # samples and results go into the run: a read-only run fails here, not after the sampling
    on_main(lambda: check_writable(run_dir / "eval", "the run's eval folder",
                                    "copy the run to a writable place to evaluate it"), share=False)
    on_main(lambda: clean_temporaries(run_dir / "eval"), share=False)  # what a killed `mapdit fid` left
    # the reference before the sampling: a missing --ref, a --num-ref larger than it, a bad --split fail now
    ref_stats = on_main(lambda: reference_stats(ref, ext, cache, split=split, num_samples=num_ref,
                                                data_options=reference_options(data_meta),
                                                batch_size=max(batch_size, 64), progress=progress, log=say),
                        share=False)
    tracked = config["train"]["ema_stds"]
    settings = {"weights": weights, "ema_std": (min(tracked) if ema_std is None else float(ema_std))
                if weights == "ema" else None, "cfg_scale": float(cfg_scale), "sampler": sampler,
                "steps": int(steps), "seed": int(seed), "num_samples": int(num_samples),
                "batch_size": int(batch_size), "checkpoint_step": int(step), "checkpoint": str(ckpt_path),
                "eta": spec.eta, "guide_channels": spec.guide_channels, "clip_denoised": spec.clip(data_meta),
                "features": getattr(ext, "name", None) or str(features),  # ext lives on rank 0 only
                "reference": str(ref), "num_reference": num_ref, "split": split}
    key = on_main(lambda: cache_key({
        "checkpoint_sha256": checkpoint_identity(ckpt_path),
        **weights_identity(run_dir / "ema", config["train"]["ema_stds"], weights, ema_std, step),
        **{k: settings[k] for k in ("cfg_scale", "sampler", "steps", "seed", "num_samples", "batch_size", "eta",
                                    "guide_channels", "clip_denoised")},
        "model": config["model"], "data": data_meta}))
    settings["cache_key"] = key
    tag = f"{settings_tag(settings)}-k{key}"
    labels = sample_labels(num_samples, int(config["model"]["num_classes"]), seed)
    npz_path = run_dir / "eval" / f"samples-{tag}.npz"
    images = None

    def load_existing() -> bool:
        nonlocal images
        images = load_if_reusable(npz_path, labels.numpy())
        return images is not None

    reuse = on_main(load_existing)
    if reuse:
        say(f"reusing {npz_path} (samples with identical settings exist; delete it to resample)")
    else:
        model, _, desc = load_model(run_dir, weights=weights, ema_std=ema_std, ckpt=str(ckpt_path),
                                    device=d.device, log=say)
        settings["model_weights"] = desc
        say(f"sampling {num_samples} images from {run_dir} ({desc}) on {d.world_size} rank(s): {sampler} "
            f"{steps} steps, cfg {cfg_scale:g}, seed {seed}")
        images = sample_images(model, data_meta, labels, spec, seed=seed, batch_size=batch_size, progress=progress)
        del model
        if d.is_main:  # same key, same images: a damaged or stale file of this name is replaced, never multiplied
            npz_path = save_npz(npz_path, images, labels.numpy())
            say(f"samples -> {npz_path}")

    def evaluate() -> dict:
        result = evaluate_samples(images, labels, ref, ext, cache, extra_settings=settings, num_ref=num_ref,
                                  split=split, data_options=reference_options(data_meta),
                                  batch_size=max(batch_size, 64), progress=progress, log=say, ref_stats=ref_stats)
        result.update(value=result[result["metric"]], run_dir=str(run_dir), samples_npz=str(npz_path),
                      samples_reused=bool(reuse), result_json=None)
        if write:  # complete content first, then a name no other file has (race-free); it names itself
            path = write_new_json(run_dir / "eval" / f"fid-{settings['features']}-{tag}.json",
                                  lambda p: {**result, "result_json": str(p)})
            result["result_json"] = str(path)
        acc = result.get("conditioning_accuracy")
        say(f"{result['metric']} = {result['value']:.4f}" + (f", conditioning accuracy {acc:.4f}" if acc is not None
                                                             else "") + f" ({num_samples} samples vs {ref})")
        for warning in result.get("warnings", []):
            say(f"warning: {warning}")
        return result

    result = on_main(evaluate)
    dist_utils.barrier(d)
    return result
