"""A small Fashion-MNIST CNN: its penultimate features give a Fréchet distance for Fashion-MNIST
samples ("FD_fmnist", the analogue of FID with a feature network that has seen this data), and
its predictions give the class-conditioning accuracy of conditional samples.

The trained weights ship with the package (mapdit/assets/fmnist_classifier.safetensors, with the
test accuracy, seed, epochs and torch version in the file's metadata); rebuild them with

    mapdit fmnist-classifier --out src/mapdit/assets/fmnist_classifier.safetensors

Architecture: three blocks of 3x3 conv + BatchNorm + ReLU + 2x2 max-pool (28 -> 14 -> 7 -> 3),
then a 128-d fully connected layer + ReLU (the features) and a linear layer to the 10 logits.

Inputs are uint8 images in [0, 255] (float tensors are taken to be on the same 0..255 scale):
  - layout (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; 3 channels are averaged;
  - 28x28 is the native size; 32x32 is center-cropped by 2 pixels per side (the project pads
    Fashion-MNIST 28 -> 32 for patch size 8 with background 0, so the crop undoes the padding);
    any other square size is resized to 28x28 (bilinear, antialiased).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from mapdit.data import load_dataset
from mapdit.errors import UserError
from mapdit.runio import check_new_output, load_tensors, save_tensors

ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "fmnist_classifier.safetensors"
FORMAT = "mapdit-fmnist-classifier-1"
NATIVE_SIZE = 28
DEFAULT_EPOCHS = 8
DEFAULT_WIDTHS = (16, 32, 64)
DEFAULT_FEATURE_DIM = 128


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------
def prepare_images(images) -> torch.Tensor:
    """uint8 images in any accepted layout/size -> float32 (N, 1, 28, 28) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W[, C]) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        pass  # (N, C, H, W)
    elif x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[2:]
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    if h == NATIVE_SIZE + 4:
        x = x[:, :, 2:-2, 2:-2]
    elif h != NATIVE_SIZE:
        x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
class FmnistClassifier(nn.Module):
    """conv blocks -> `features` (feature_dim, after ReLU) -> `head` (10 logits)."""

    def __init__(self, widths=DEFAULT_WIDTHS, feature_dim: int = DEFAULT_FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        layers, c_in, size = [], 1, NATIVE_SIZE
        for c_out in self.widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, size = c_out, size // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * size * size, self.feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        self.meta: dict = {}
        self.fingerprint = "untrained"

    def arch(self) -> dict:
        return {"widths": list(self.widths), "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space (N, 1, 28, 28) float -> penultimate features (N, feature_dim)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def _device(self) -> torch.device:
        return self.head.weight.device

    def features(self, images) -> torch.Tensor:
        """uint8 images (see module doc) -> penultimate features float32 (N, feature_dim)."""
        return self._features(prepare_images(images).to(self._device()))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, images) -> torch.Tensor:
        """uint8 images -> logits (N, num_classes)."""
        return self.classify_features(self.features(images))


# ------------------------------------------------------------------------------------------------
# Loading and using the shipped weights
# ------------------------------------------------------------------------------------------------
def _file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FmnistClassifier:
    """The classifier from `path` (default: the weights shipped in mapdit/assets), in eval mode."""
    path = Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise UserError(f"Fashion-MNIST classifier weights not found at {path}: train them with "
                        f"`mapdit fmnist-classifier --out {path}` (a few CPU minutes)")
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a mapdit Fashion-MNIST classifier (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
    model = FmnistClassifier(**json.loads(meta["arch"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match the classifier architecture ({err})") from None
    model.meta = {k: (json.loads(v) if k in ("test_accuracy", "seed", "epochs", "arch", "seconds") else v)
                  for k, v in meta.items()}
    model.fingerprint = _file_fingerprint(path)
    model.requires_grad_(False)
    return model.to(device).eval()


@torch.no_grad()
def predict(images, classifier: FmnistClassifier | None = None, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class ids int64 (N,) on the CPU."""
    classifier = classifier if classifier is not None else load_classifier()
    was_training = classifier.training
    classifier.eval()
    n = len(images)
    out = [classifier(images[i: i + batch_size]).argmax(dim=1).cpu() for i in range(0, n, batch_size)]
    classifier.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def conditioning_accuracy(images_uint8, labels, classifier: FmnistClassifier | None = None,
                          batch_size: int = 1000) -> float:
    """Share of images whose predicted class equals their (conditioning) label."""
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    labels = labels.to(torch.int64).cpu()
    if labels.shape != (len(images_uint8),):
        raise ValueError(f"labels must have shape ({len(images_uint8)},), got {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no images")
    pred = predict(images_uint8, classifier, batch_size)
    return float((pred == labels).to(torch.float64).mean())


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(model: FmnistClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(images, model) == labels).to(torch.float64).mean())


def train_classifier(
    out_path: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    threads: int = 1,
    batch_size: int = 128,
    lr: float = 2e-3,
    data_path: str = "fashion-mnist",
    command: str | None = None,
    log=print,
) -> dict:
    """Train on the Fashion-MNIST train split (random horizontal flips), save to `out_path`.

    Deterministic for a given seed and thread count (CPU convolution reductions depend on the number
    of threads, so the default is 1, which is how the shipped weights were made; it is also faster
    than 2 on a busy 2-core machine): fixed initialisation, data order and flips from one seeded
    generator, deterministic algorithms. Adam with a cosine learning-rate decay to zero.
    Returns {"test_accuracy", "seconds", ...}; the file's metadata records the same.
    """
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    # before the training: never replace a file this command did not make (a classifier file may be), never
    # write into a run's checkpoints/, and an unwritable place fails now
    check_new_output(out_path, "--out", own_format=FORMAT)
    train = load_dataset(data_path, split="train")
    test = load_dataset(data_path, split="test")
    if train.resolution != NATIVE_SIZE or train.channels != 1:
        raise UserError(f"{data_path} holds {train.channels}x{train.resolution}x{train.resolution} images; "
                        f"the classifier is for 1x{NATIVE_SIZE}x{NATIVE_SIZE} Fashion-MNIST")
    if len(train) < batch_size:  # the last partial batch is dropped: an epoch would make no step
        raise UserError(f"{data_path} holds {len(train)} training images, fewer than one batch of {batch_size}: "
                        "pass the full Fashion-MNIST")

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = FmnistClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        n = len(train)
        steps_per_epoch = n // batch_size  # the last partial batch is dropped
        total = epochs * steps_per_epoch
        start = time.time()
        step = 0
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
            running = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size: (b + 1) * batch_size]
                x = train.images[idx]
                flip = flips[idx]
                x[flip] = x[flip].flip(-1)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + np.cos(np.pi * step / total))
                loss = F.cross_entropy(model(x), train.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += float(loss.detach())
                step += 1
            model.eval()
            acc = _accuracy(model, test.images, test.labels)
            log(f"epoch {epoch + 1}/{epochs}  loss {running / steps_per_epoch:.4f}  "
                f"test accuracy {acc:.4f}  {time.time() - start:.0f}s")
        seconds = time.time() - start
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)

    result = {"test_accuracy": round(acc, 6), "seconds": round(seconds, 1), "epochs": epochs, "seed": seed}
    metadata = {
        "format": FORMAT,
        "arch": json.dumps(model.arch()),
        "test_accuracy": json.dumps(result["test_accuracy"]),
        "seed": json.dumps(seed),
        "epochs": json.dumps(epochs),
        "seconds": json.dumps(result["seconds"]),
        "threads": str(threads),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "torch_version": torch.__version__,
        "command": command or f"mapdit fmnist-classifier --out {out_path} --epochs {epochs} --seed {seed}",
    }
    save_tensors(out_path, model.state_dict(), metadata=metadata)
    result["path"] = str(out_path)
    result["bytes"] = Path(out_path).stat().st_size
    return result
