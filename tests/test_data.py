"""Tests for mapdit.data: IDX / image-folder loading, the uint8 <-> model rule, IndexStream."""

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import INSTALLED_FMNIST, RUN, cli, only_error_line
from helpers import needs_installed_fmnist as needs_fmnist
from mapdit.data import ImageDataset, IndexStream, fashion_mnist, load_dataset, to_uint8_images, uint8_to_model
from mapdit.errors import UserError

# "fashion-mnist" must resolve to the installed copy regardless of the caller's environment
pytestmark = pytest.mark.usefixtures("no_fmnist_override")


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_train():
    return load_dataset("fashion-mnist", split="train")


@needs_fmnist
def test_fashion_mnist_train(fmnist_train):
    ds = fmnist_train
    assert len(ds) == 60000 and ds.images.shape == (60000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert (ds.channels, ds.resolution, ds.kind) == (1, 28, "fashion-mnist")
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert ds.num_classes == 10
    x, y = ds.batch(torch.arange(0, 60000, 97))
    assert x.dtype == torch.float32 and x.shape == (619, 1, 28, 28)
    assert x.min() == -1.0 and x.max() == 1.0  # Fashion-MNIST uses the full 0..255 range
    assert torch.equal(y, ds.labels[::97])
    meta = json.loads(json.dumps(ds.meta()))
    assert meta["original_size"] == [28, 28] and meta["rule"] == "none" and meta["resolution"] == 28


@needs_fmnist
def test_fashion_mnist_test_split_and_patch_padding():
    ds8 = load_dataset("fmnist", split="test", patch_size=8)
    assert ds8.images.shape == (10000, 1, 32, 32)
    assert ds8.meta()["pad"] == [2, 2, 2, 2] and ds8.meta()["rule"] == "pad"
    x, _ = ds8.batch(torch.arange(50))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == -1.0).all()  # pad value is the background -1
    assert x[:, :, 2:30, 2:30].max() > 0  # the image itself sits in the middle
    for patch in (2, 4):
        ds = load_dataset("fashion-mnist", split="test", patch_size=patch)
        assert ds.resolution == 28 and ds.meta()["rule"] == "none"
        assert torch.equal(ds.images, ds8.images[:, :, 2:30, 2:30])


# ---------------------------------------------------------------- uint8 <-> model space


def test_to_uint8_rounds_with_dit_rule():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, 1 / 127.5 - 1, 0.5 / 127.5 - 1, 0.49 / 127.5 - 1])
    u = to_uint8_images(x.view(1, 1, 1, -1)).flatten().tolist()
    # 0.5/127.5-1 is uint8 0.5 -> rounds half up to 1; 0.49 -> 0 (truncation would give 0 for both)
    assert u == [0, 255, 128, 0, 255, 1, 1, 0]


def test_to_uint8_layout_and_exact_round_trip():
    u = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1).view(2, 3, 16, 16)
    u[1] = u[1].flip(-1)
    back = to_uint8_images(uint8_to_model(u))
    assert back.shape == (2, 16, 16, 3) and back.dtype == torch.uint8
    assert torch.equal(back, u.permute(0, 2, 3, 1))


# ---------------------------------------------------------------- synthetic IDX folders


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx_folder(folder, gz: bool, n=(6, 4), size=28):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in zip(("train", "t10k"), n):
        images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for stem, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            name = folder / f"{prefix}-{stem}{'.gz' if gz else ''}"
            name.write_bytes(gzip.compress(data) if gz else data)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_idx_folder_loads(tmp_path, gz):
    folder = _write_idx_folder(tmp_path / "idx", gz)
    train = load_dataset(str(folder), patch_size=8)
    test = load_dataset(str(folder), split="test", image_size=16, channels=3)
    assert train.images.shape == (6, 1, 32, 32) and train.kind == "fashion-mnist"
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert test.images.shape == (4, 3, 16, 16) and test.meta()["rule"] == "resize"
    assert torch.equal(test.images[:, 0], test.images[:, 2])  # gray repeated to 3 channels


def test_env_var_points_alias_elsewhere(tmp_path, monkeypatch):
    folder = _write_idx_folder(tmp_path / "idx", gz=True)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(folder))
    assert len(load_dataset("fashion-mnist", split="test")) == 4
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist")


@pytest.mark.parametrize("how", ["truncated-gz", "truncated-plain", "bad-magic"])
def test_corrupt_idx_file_names_the_file(tmp_path, how):
    folder = _write_idx_folder(tmp_path / "idx", gz=how.endswith("gz"))
    target = folder / ("train-images-idx3-ubyte" + (".gz" if how.endswith("gz") else ""))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if how.startswith("truncated") else b"\x00\x00\x09\x03" + data[4:])
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset(str(folder))
    load_dataset(str(folder), split="test")  # the other split is untouched and still loads


def test_label_count_mismatch(tmp_path):
    folder = _write_idx_folder(tmp_path / "idx", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(UserError, match="3 labels but"):
        load_dataset(str(folder), split="test")


def test_missing_split_file_and_bad_paths(tmp_path):
    folder = _write_idx_folder(tmp_path / "idx", gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_dataset(str(folder), split="test")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders and no IDX files"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not divisible"):
        load_dataset(str(folder), image_size=30, patch_size=8)


# ---------------------------------------------------------------- image folders


def _write_image_folder(root):
    rng = np.random.default_rng(1)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")  # noqa: E731
    (root / "b_cats").mkdir(parents=True)
    (root / "a_dogs").mkdir()
    (root / "c_birds" / "nested").mkdir(parents=True)
    rgb(20, 20).save(root / "a_dogs" / "rgb.png")
    rgb(20, 20).convert("L").save(root / "a_dogs" / "gray.png")
    rgb(20, 20).convert("P").save(root / "b_cats" / "palette.png")
    rgb(20, 20).convert("CMYK").save(root / "b_cats" / "cmyk.jpg")
    rgba = rgb(20, 20).convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> composited over black
    rgba.save(root / "c_birds" / "rgba.png")
    rgb(40, 24).save(root / "c_birds" / "nested" / "wide.png")
    (root / "c_birds" / "corrupt.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "a_dogs" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_loads_all_modes(tmp_path):
    root = _write_image_folder(tmp_path / "imgs")
    ds = load_dataset(str(root), image_size=16)
    assert ds.kind == "image-folder" and ds.class_names == ["a_dogs", "b_cats", "c_birds"]
    assert ds.images.shape == (6, 3, 16, 16) and ds.images.dtype == torch.uint8
    # sorted files per class: a_dogs: gray, rgb; b_cats: cmyk, palette; c_birds: nested/wide, rgba
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.images[5].max() == 0  # transparent RGBA -> black background
    assert torch.equal(ds.images[0, 0], ds.images[0, 1])  # grayscale replicated to RGB
    skipped = {os.path.basename(p): reason for p, reason in ds.skipped}
    assert set(skipped) == {"corrupt.png", "notes.txt"} and all(skipped.values())
    meta = json.loads(json.dumps(ds.meta()))
    assert meta["skipped"] == 2 and meta["resolution"] == 16 and meta["channels"] == 3


def test_image_folder_center_crop_gray_and_default_size(tmp_path):
    root = tmp_path / "crop"
    (root / "only").mkdir(parents=True)
    wide = np.zeros((24, 40, 3), dtype=np.uint8)
    wide[:, 8:32] = 255  # the centered 24x24 square is white, the side strips black
    Image.fromarray(wide).save(root / "only" / "wide.png")
    ds = load_dataset(str(root), channels=1)
    assert ds.images.shape == (1, 1, 32, 32)  # default size 32, channels=1 -> 'L'
    assert ds.images.min() >= 250  # the crop kept only the white center
    ds6 = load_dataset(str(root), patch_size=6)  # 32 not divisible by 6 -> padded to 36
    assert ds6.resolution == 36 and ds6.meta()["pad"] == [2, 2, 2, 2]


def test_image_folder_with_nothing_readable(tmp_path):
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable image"):
        load_dataset(str(tmp_path / "bad"))


def test_batch_hflip_uses_generator():
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4).repeat(8, 1, 1, 1)
    ds = ImageDataset(images, torch.zeros(16, dtype=torch.int64), ["a"], "fashion-mnist", "x", hflip=True)
    plain, _ = ds.batch(torch.arange(16))
    assert torch.equal(plain, uint8_to_model(images))  # no generator -> no flips
    a, _ = ds.batch(torch.arange(16), torch.Generator().manual_seed(3))
    b, _ = ds.batch(torch.arange(16), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = (a != plain).flatten(1).any(1)
    assert 0 < flipped.sum() < 16 and torch.equal(a[flipped], plain[flipped].flip(-1))


# ---------------------------------------------------------------- IndexStream


def test_index_stream_deterministic_and_epoch_coverage():
    s1, s2 = IndexStream(103, 10, seed=7), IndexStream(103, 10, seed=7)
    assert s1.steps_per_epoch == 10
    for step in (0, 5, 9, 10, 31):
        assert torch.equal(s1.indices(step), s2.indices(step))
        assert s1.indices(step).shape == (10,) and s1.indices(step).dtype == torch.int64
    for epoch in (0, 1):
        seen = torch.cat([s1.indices(epoch * 10 + i) for i in range(10)])
        assert len(seen.unique()) == 100 and seen.min() >= 0 and seen.max() < 103  # 3 dropped
    assert not torch.equal(s1.indices(0), s1.indices(10))  # a fresh permutation each epoch
    assert not torch.equal(s1.indices(0), IndexStream(103, 10, seed=8).indices(0))


def test_index_stream_rank_shards_concatenate_to_single_process():
    world, per_rank = 4, 3
    single = IndexStream(50, per_rank * world, seed=1)
    ranks = [IndexStream(50, per_rank, seed=1, rank=r, world_size=world) for r in range(world)]
    for step in range(12):  # 4 steps per epoch: crosses 3 epoch boundaries
        assert torch.equal(torch.cat([r.indices(step) for r in ranks]), single.indices(step))


def test_index_stream_resume_equals_continuing():
    run = IndexStream(37, 4, seed=5, rank=1, world_size=2)
    continued = [run.indices(s) for s in range(20)]
    resumed = IndexStream(37, 4, seed=5, rank=1, world_size=2)
    assert all(torch.equal(resumed.indices(s), continued[s]) for s in range(13, 20))
    continued[13][0] = -1  # returned batches are copies: the cache must not change
    assert run.indices(13)[0] != -1


def test_index_stream_rejects_too_small_dataset():
    with pytest.raises(UserError, match="fewer than one global batch"):
        IndexStream(10, 4, seed=0, world_size=3)


@pytest.mark.parametrize("layout", ["missing", "empty", "empty-class-folders"])
def test_missing_or_empty_data_path(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "empty-class-folders":
        (data / "cats").mkdir()
        (data / "dogs").mkdir()
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    expected = {"missing": "does not exist", "empty": "holds no class subfolders",
                "empty-class-folders": "no readable image"}[layout]
    assert expected in only_error_line(capsys)
    assert not list((tmp_path / "R").glob("*-DiT-*"))


def _image_folder(root: Path, bad: bool) -> Path:
    from PIL import Image

    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 36), (60 * i, 90 * c, 20)).save(root / name / f"{i}.png")
    if bad:
        (root / "a" / "notes.png").write_bytes(b"this is not an image")
        good = (root / "b" / "0.png").read_bytes()
        (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    return root


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    data = _image_folder(tmp_path / "images", bad=True)
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--num-steps", 1, "--global-batch-size", 2,
               "--ema-snapshots", 0, "--results-dir", tmp_path / "R") == 0
    run = tmp_path / "R" / RUN
    assert "skipped 2 unreadable image file(s)" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["data"]["skipped"] == 2
    assert json.loads((run / "config.json").read_text())["data"]["num_images"] == 6


def test_only_unreadable_images_is_one_line(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "x.jpg").write_bytes(b"\xff\xd8 broken")
    assert cli("train", "--data-path", tmp_path / "images", "--model", "DiT-XXS/4",
               "--results-dir", tmp_path / "R") == 2
    assert "no readable image" in only_error_line(capsys)


@needs_fmnist
def test_idx_label_outside_the_ten_classes_is_one_line_naming_file_and_index(tmp_path, capsys):
    data = tmp_path / "fm"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).symlink_to(INSTALLED_FMNIST / name)
    labels = bytearray(gzip.decompress((INSTALLED_FMNIST / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 1234] = 200  # header 8 bytes, then one byte per label
    (data / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    assert cli("train", "--data-path", data, "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    line = only_error_line(capsys)
    assert "train-labels-idx1-ubyte: label 200 at index 1234 is outside the 10 classes" in line
    assert not (tmp_path / "R").exists() or not list((tmp_path / "R").iterdir())


def test_image_folder_with_an_empty_class_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "c"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / name / f"{i}.png")
    (tmp_path / "img" / "b").mkdir()
    (tmp_path / "img" / "b" / "broken.png").write_bytes(b"not an image")
    assert cli("train", "--data-path", tmp_path / "img", "--model", "DiT-XXS/4", "--results-dir", tmp_path / "R") == 2
    line = only_error_line(capsys)
    assert f"class folder {tmp_path / 'img' / 'b'} has no readable image" in line
    assert not (tmp_path / "R").exists() or not list((tmp_path / "R").iterdir())
