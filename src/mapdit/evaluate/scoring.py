"""Scoring a model in memory: which features and which reference a run's data asks for, and `quick_fid`
(sample with a SamplerSpec -- the default one unless told -- then the Fréchet distance; what training logs
every --fd-every steps).

Feature rule: "inception" (FID, 2048-d Inception-v3 pool features via torch-fidelity) when Inception
weights are given or the data is not Fashion-MNIST; "fmnist" (FD_fmnist with our classifier, plus the
class-conditioning accuracy) for Fashion-MNIST. Reference default: the run's own training data (for
Fashion-MNIST: its test split; a prepared latent folder is decoded with its VAE), prepared at the
samples' resolution.
"""
from __future__ import annotations

import torch

from mapdit.distributed import on_main
from mapdit.errors import UserError
from mapdit.evaluate.fid import FeatureExtractor, ModuleFeatures, default_cache_dir, evaluate_samples, get_extractor
from mapdit.sample import sample_images, sample_labels
from mapdit.samplers import SamplerSpec

DEFAULT_CACHE = object()  # "use fid.default_cache_dir()" (None disables the cache)


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


def check_sampling(num_samples: int, batch_size: int) -> None:
    """The sample counts of a score (the sampler is checked by its SamplerSpec)."""
    if num_samples < 2:
        raise UserError(f"--num-samples {num_samples}: a Fréchet distance needs at least 2 samples")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def extractor(features, inception_weights, device):
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, torch.nn.Module):
        return ModuleFeatures(features, type(features).__name__)
    if inception_weights is not None and str(features).lower() not in ("inception", "inception-v3", "inceptionv3"):
        raise UserError("--inception-weights is for --features inception")
    return get_extractor(features, inception_weights, device)


def quick_fid(model, data_meta: dict, num_samples: int, *, ref: str | None = None, features=None,
              spec: SamplerSpec | None = None, seed: int = 0, batch_size: int = 64, num_ref: int | None = None,
              cache_dir=DEFAULT_CACHE, inception_weights: str | None = None, log=None, **spec_fields) -> float:
    """The Fréchet distance of `num_samples` samples of `model` (the plain DiT with the weights to score)
    drawn with `spec` (default: the default SamplerSpec, `spec_fields` replaced) to the reference (default:
    the data's own; features by the module's rule). Nothing is written but the cached reference statistics.
    Under torchrun call it on every rank: sampling is sharded, rank 0 evaluates, every rank returns the same
    value. `log`: where warnings go (e.g. an unwritable statistics cache; default stderr)."""
    spec = SamplerSpec.of(spec, **spec_fields)
    check_sampling(num_samples, batch_size)
    device = next(model.parameters()).device
    features = default_features(data_meta, inception_weights) if features is None else features
    ref = default_reference(data_meta) if ref is None else ref
    cache = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
    ext = on_main(lambda: extractor(features, inception_weights, device), share=False)
    labels = sample_labels(num_samples, model.config.num_classes, seed)
    images = sample_images(model, data_meta, labels, spec, seed=seed, batch_size=batch_size)

    def evaluate() -> float:
        result = evaluate_samples(images, labels, ref, ext, cache, num_ref=num_ref,
                                  data_options=reference_options(data_meta), batch_size=max(batch_size, 64),
                                  log=log)
        return float(result[result["metric"]])

    return on_main(evaluate)
