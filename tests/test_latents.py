"""Tests for latent preparation (mapdit.data.prepare) and latent datasets (mapdit.data.latents).

A tiny random AutoencoderKL (2x downsampling) saved to disk stands in for the real VAE; the image
folder mixes modes, sizes and broken files. Resolution 16 -> latents 4 x 8 x 8.
"""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from mapdit.data import IndexStream, load_dataset, to_uint8_images  # noqa: E402
from mapdit.data import latents as latents_mod  # noqa: E402
from mapdit.data import prepare as prep  # noqa: E402
from mapdit.data.latents import LatentDataset, latent_decoder, load_vae  # noqa: E402
from mapdit.errors import UserError  # noqa: E402

RES = 16
SHARD = 4  # 13 files -> 4 shards


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "folder"
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    for c in ("a_cat", "b_dog", "c_fox"):
        (root / c).mkdir(parents=True)
    rgb(40, 48).save(root / "a_cat" / "0.png")
    rgb(48, 40).save(root / "a_cat" / "1.png")
    rgb(100, 70).save(root / "a_cat" / "big.png")  # two BOX halvings before the resize
    rgb(40, 40).convert("L").save(root / "a_cat" / "gray.png")
    rgb(40, 52).convert("CMYK").save(root / "b_dog" / "cmyk.jpg")
    rgb(44, 44).convert("P").save(root / "b_dog" / "palette.png")
    rgb(40, 40).convert("RGBA").save(root / "b_dog" / "rgba.png")
    rgb(12, 20).save(root / "b_dog" / "small.png")  # short side 12 < 16
    rgb(36, 36).save(root / "c_fox" / "2.png")
    (root / "c_fox" / "corrupt.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "c_fox" / "notes.txt").write_text("not an image")
    rgb(40, 40).save(root / "c_fox" / "x.png")
    full = (root / "c_fox" / "x.png").read_bytes()
    (root / "c_fox" / "truncated.png").write_bytes(full[: len(full) // 2])
    return root


SKIPPED = {"corrupt.png", "notes.txt", "truncated.png", "small.png"}


def run(images, vae_dir, out, **kw):
    kw.setdefault("shard_size", SHARD)
    kw.setdefault("batch_size", 3)
    return prep.prepare_latents(images, out, RES, str(vae_dir), progress=False, log=lambda *a: None, **kw)


@pytest.fixture(scope="module")
def reference(images, vae_dir, tmp_path_factory):
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "latents"
    report = run(images, vae_dir, out)
    return out, report


def shard_tensors(out):
    index = json.loads((out / "latents.json").read_text())
    return [load_file(str(out / s["name"])) for s in index["shards"]]


def assert_same_dataset(a, b):
    ia, ib = (json.loads((p / "latents.json").read_text()) for p in (a, b))
    assert ia == ib
    for ta, tb in zip(shard_tensors(a), shard_tensors(b)):
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


# ---------------------------------------------------------------- end to end


def test_prepare_load_batches_decode(reference, vae, images, monkeypatch):
    out, report = reference
    assert report["encoded"] == 9 and report["entries"] == 9 and report["num_items"] == 9
    assert len(report["shards_written"]) == 4 and report["shards_done"] == []
    ds = load_dataset(str(out), patch_size=2)
    assert isinstance(ds, LatentDataset) and ds.kind == "latents"
    assert len(ds) == 9 and ds.channels == 4 and ds.resolution == RES // 2 and ds.image_resolution == RES
    assert ds.class_names == ["a_cat", "b_dog", "c_fox"] and ds.num_classes == 3
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    meta = json.loads(json.dumps(ds.meta()))
    assert meta["kind"] == "latents" and meta["channels"] == 4 and meta["resolution"] == 8
    assert meta["image_resolution"] == RES and meta["vae"] == str(vae_dir_of(out))
    assert meta["stats"]["mean"] == json.loads((out / "latents.json").read_text())["stats"]["mean"]

    # training-like batches: z = mu + sigma * eps from the generator, normalised per channel
    stream = IndexStream(len(ds), batch_size=4, seed=0)
    mu, sd = ds.posterior(torch.arange(9))
    m, s = torch.tensor(meta["stats"]["mean"]).view(1, 4, 1, 1), torch.tensor(meta["stats"]["std"]).view(1, 4, 1, 1)
    for step in range(3):
        idx = stream.indices(step)
        x, y = ds.batch(idx, torch.Generator().manual_seed(step))
        assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 and y.tolist() == ds.labels[idx].tolist()
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        want = (mu[idx].float() + sd[idx].float() * eps - m) / s
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
        x2, _ = ds.batch(idx, torch.Generator().manual_seed(step + 100))
        assert not torch.equal(x, x2)  # fresh noise with another generator state
    x0, _ = ds.batch(torch.tensor([2, 0]))  # no generator: the posterior mean, deterministic
    torch.testing.assert_close(x0, (mu[[2, 0]].float() - m) / s)

    loads = []
    real_load = latents_mod.load_vae
    monkeypatch.setattr(latents_mod, "_VAE_CACHE", {})
    monkeypatch.setattr(latents_mod, "load_vae", lambda *a: loads.append(a) or real_load(*a))
    decode = latent_decoder(meta, "cpu")
    latent_decoder(meta, torch.device("cpu"))
    assert len(loads) == 1  # the VAE is loaded once per (VAE, device)
    imgs = decode(x)
    assert imgs.shape == (4, RES, RES, 3) and imgs.dtype == torch.uint8
    with torch.no_grad():
        manual = to_uint8_images(vae.decode(x * s + m).sample.clamp(-1, 1))
    assert torch.equal(imgs, manual)


def vae_dir_of(out):
    return json.loads((out / "latents.json").read_text())["vae"]


def test_skips_conversions_and_small_image_rule(reference, images, vae, vae_dir, tmp_path):
    out, report = reference
    index = json.loads((out / "latents.json").read_text())
    skipped = {os.path.basename(p): r for p, r in report["skipped"]}
    assert set(skipped) == SKIPPED and all(skipped.values())
    assert skipped["small.png"].startswith("too small: 12x20")
    assert {os.path.basename(s["path"]) for s in index["skipped"]} == SKIPPED
    assert index["num_images"] == 9 and index["num_files"] == 13 and index["upscaled"] == []
    # every stored entry is the encoding of its (converted, ADM-cropped) file
    files, _ = prep.list_files(images)
    ds = LatentDataset(out)
    stored = torch.cat([t["index"] for t in shard_tensors(out)])
    names = [files[k][0].name for k in stored.tolist()]
    assert set(names).isdisjoint(SKIPPED) and {"gray.png", "palette.png", "cmyk.jpg", "rgba.png"} <= set(names)
    gray, _ = prep.read_image(images / "a_cat" / "gray.png", RES)
    assert gray.shape == (RES, RES, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for name in ("palette.png", "cmyk.jpg", "big.png"):
        k = names.index(name)
        arr, up = prep.read_image(files[stored[k]][0], RES)
        assert arr.shape == (RES, RES, 3) and not up
        mu, sd = prep.encode_images(vae, arr[None], "cpu")
        got_mu, got_sd = ds.posterior(torch.tensor([k]))
        torch.testing.assert_close(got_mu.float(), mu.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got_sd.float(), sd.float(), atol=2e-3, rtol=2e-3)
    # the other rule: small images are upscaled, kept and listed
    rep = run(images, vae_dir, tmp_path / "up", small_images="upscale")
    assert rep["encoded"] == 10 and [os.path.basename(p) for p in rep["upscaled"]] == ["small.png"]
    assert {os.path.basename(p) for p, _ in rep["skipped"]} == SKIPPED - {"small.png"}


def test_adm_center_crop_halves_then_bicubic():
    img = Image.new("RGB", (100, 70))
    img.paste((255, 0, 0), (0, 0, 50, 70))  # left half red, right half blue
    img.paste((0, 0, 255), (50, 0, 100, 70))
    arr = prep.adm_center_crop(img, 16)
    assert arr.shape == (16, 16, 3)
    assert (arr[:, :6, 0] > 200).all() and (arr[:, -6:, 2] > 200).all()  # centered: the split stays in the middle


# ---------------------------------------------------------------- stats


def test_stats_are_the_mixture_moments_of_the_stored_values(reference):
    out, _ = reference
    index = json.loads((out / "latents.json").read_text())
    tensors = shard_tensors(out)
    mu = torch.cat([t["mean"] for t in tensors]).double()
    sd = torch.cat([t["std"] for t in tensors]).double()
    m = mu.mean((0, 2, 3))
    var = (sd**2).mean((0, 2, 3)) + ((mu - m.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    np.testing.assert_allclose(index["stats"]["mean"], m.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(index["stats"]["std"], var.sqrt().numpy(), rtol=1e-12)
    assert index["stats"]["count"] == 9 * 8 * 8
    assert index["latent_shape"] == [4, 8, 8] and index["vae_scaling_factor"] == pytest.approx(0.18215)


# ---------------------------------------------------------------- resume, torchrun split


def test_interrupted_run_resumes_to_the_same_dataset(reference, images, vae_dir, tmp_path, monkeypatch):
    ref, _ = reference
    out = tmp_path / "resume"
    real = prep.encode_images
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # shard 0 takes 2 batches of 3 entries max; fail inside shard 1
            raise RuntimeError("power cut")
        return real(*a, **kw)

    monkeypatch.setattr(prep, "encode_images", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        run(images, vae_dir, out)
    monkeypatch.setattr(prep, "encode_images", real)
    assert (out / "shard-00000.json").exists() and not (out / "shard-00001.json").exists()
    assert not (out / "latents.json").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # no half-written file left behind

    report = run(images, vae_dir, out)
    assert report["shards_done"] == ["shard-00000.safetensors"]
    assert report["shards_written"] == [f"shard-0000{i}.safetensors" for i in (1, 2, 3)]
    assert_same_dataset(out, ref)

    # a shard whose done-marker is missing (crash between file and marker) is redone, the rest skipped
    (out / "shard-00003.json").unlink()
    report = run(images, vae_dir, out)
    assert report["shards_written"] == ["shard-00003.safetensors"] and len(report["shards_done"]) == 3
    assert_same_dataset(out, ref)
    # a finished folder: nothing re-encoded, the index rewritten identically
    report = run(images, vae_dir, out)
    assert report["shards_written"] == [] and report["encoded"] == 0
    assert_same_dataset(out, ref)


def test_torchrun_split_equals_single_process(reference, images, vae_dir, tmp_path, monkeypatch):
    ref, _ = reference
    out = tmp_path / "ddp"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = run(images, vae_dir, out)  # rank and world size from the environment
    assert r1["index"] is None and r1["shards_written"] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    assert not (out / "latents.json").exists()
    r0 = run(images, vae_dir, out, rank=0, world_size=2)
    assert r0["shards_written"] == ["shard-00000.safetensors", "shard-00002.safetensors"]
    assert r0["index"] and r0["num_items"] == 9
    assert_same_dataset(out, ref)


def test_rank0_times_out_waiting_for_other_ranks(images, vae_dir, tmp_path):
    with pytest.raises(UserError, match=r"rank\(s\) 1.*rerun"):
        run(images, vae_dir, tmp_path / "wait", rank=0, world_size=2, wait_timeout=0.2, poll_interval=0.05)


# ---------------------------------------------------------------- flip


def test_flip_doubles_entries_with_encoded_flipped_images(images, vae, vae_dir, tmp_path):
    out = tmp_path / "flip"
    report = run(images, vae_dir, out, flip=True, batch_size=1)  # batch 1: same computation as below
    assert report["encoded"] == 9 and report["entries"] == 18
    ds = load_dataset(str(out))
    assert len(ds) == 18 and ds.meta()["flip"] is True
    tensors = shard_tensors(out)
    flags = torch.cat([t["flipped"] for t in tensors])
    index = torch.cat([t["index"] for t in tensors])
    assert flags.tolist() == [False, True] * 9 and torch.equal(index[0::2], index[1::2])
    files, _ = prep.list_files(images)
    for e in (0, 7, 13):
        arr, _ = prep.read_image(files[index[e]][0], RES)
        if flags[e]:
            arr = arr[:, ::-1]
        mu, sd = prep.encode_images(vae, arr[None], "cpu")
        got_mu, got_sd = ds.posterior(torch.tensor([e]))
        assert torch.equal(got_mu, mu) and torch.equal(got_sd, sd)
    assert not torch.equal(ds.posterior(torch.tensor([0]))[0], ds.posterior(torch.tensor([1]))[0])


# ---------------------------------------------------------------- user errors, CLI


def test_user_errors(reference, images, vae_dir, tmp_path, monkeypatch):
    out, _ = reference
    with pytest.raises(UserError, match=r"latent side 8 .*patch size 3"):
        load_dataset(str(out), patch_size=3)
    with pytest.raises(UserError, match=r"--image-size 20 .*8x8"):
        load_dataset(str(out), image_size=20)
    assert load_dataset(str(out), image_size=RES, patch_size=4).resolution == 8
    assert len(load_dataset(str(out / "latents.json"))) == 9
    with pytest.raises(UserError, match="channels=3 .*4 channels"):
        load_dataset(str(out), channels=3)
    with pytest.raises(UserError, match="--flip"):
        load_dataset(str(out), hflip=True)
    with pytest.raises(UserError, match="multiple of 8"):
        prep.prepare_latents(images, tmp_path / "bad", 12, str(vae_dir), progress=False)
    with pytest.raises(UserError, match="inside --image-folder"):
        run(images, vae_dir, images / "latents")
    with pytest.raises(UserError, match="no saved AutoencoderKL"):
        run(images, tmp_path, tmp_path / "novae")
    assert run(images, vae_dir, tmp_path / "novae")["num_items"] == 9  # fixing --vae needs no fresh folder
    # prepare into a folder made with other settings
    with pytest.raises(UserError, match=r"other settings \(shard_size: 4 -> 5\)"):
        run(images, vae_dir, out, shard_size=5)

    from diffusers import AutoencoderKL

    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(UserError, match="VAE weights for someone/vae not found offline: pass --vae DIR"):
        load_vae("someone/vae")


def test_truncated_shard_is_an_error_and_is_redone(reference, images, vae_dir, tmp_path):
    ref, _ = reference
    out = tmp_path / "trunc"
    run(images, vae_dir, out)
    data = (out / "shard-00002.safetensors").read_bytes()
    (out / "shard-00002.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match="shard-00002.*truncated"):
        load_dataset(str(out))
    report = run(images, vae_dir, out)  # the marker's size no longer matches: not finished
    assert report["shards_written"] == ["shard-00002.safetensors"]
    assert_same_dataset(out, ref)


def test_cli_prepare(images, vae_dir, tmp_path, monkeypatch, capsys):
    from mapdit.commands import prepare as prepare_command

    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--image-folder", str(images), "--out", str(tmp_path / "cli"),
                              "--resolution", "16", "--vae", str(vae_dir), "--shard-size", "100", "--flip",
                              "--no-progress"])
    assert args.batch_size == 32 and args.num_workers == 0 and args.small_images == "skip"

    import mapdit.cli as cli

    argv = ["prepare", "--image-folder", str(images), "--out", str(tmp_path / "cli"), "--resolution", "16",
            "--vae", str(vae_dir), "--shard-size", "100", "--num-workers", "1", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "encoded 9 images" in printed and "small.png: too small" in printed
    assert len(load_dataset(str(tmp_path / "cli"))) == 9
    assert cli.main([*argv[:6], "20", *argv[7:]]) == 2  # resolution 20: not a multiple of 8
    err = capsys.readouterr().err.strip()
    assert err.startswith("mapdit prepare: error: --resolution must be a positive multiple of 8") and "\n" not in err


# ---------------------------------------------------------------- inputs verified by content


def test_a_shard_changed_after_it_was_written_is_named_on_first_read(images, vae_dir, tmp_path):
    out = tmp_path / "nan"
    run(images, vae_dir, out)
    path = out / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header: header + 8] = np.full(4, np.nan, dtype=np.float16).tobytes()  # same size: only the sha256 differs
    path.write_bytes(bytes(data))
    ds = load_dataset(str(out))  # opening reads headers only
    ds.batch(torch.arange(0, 2))  # shard 0 is intact
    with pytest.raises(UserError, match=r"shard-00001\.safetensors does not match the sha256"):
        ds.batch(torch.arange(len(ds)))


def test_resume_with_other_vae_weights_is_refused(images, vae_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    vae_copy = tmp_path / "vae"
    AutoencoderKL.from_pretrained(vae_dir).save_pretrained(vae_copy)
    out = tmp_path / "two-vaes"
    real, calls = prep.encode_images, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(*a, **kw)

    monkeypatch.setattr(prep, "encode_images", failing)
    with pytest.raises(RuntimeError, match="power cut"):
        run(images, vae_copy, out)
    monkeypatch.setattr(prep, "encode_images", real)
    other = AutoencoderKL.from_pretrained(vae_copy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(vae_copy)  # new weights at the same path
    with pytest.raises(UserError, match="shard-00000.*other VAE weights"):
        run(images, vae_copy, out)
    assert not (out / "latents.json").exists()


def test_an_image_changed_under_the_same_name_gets_a_new_latent(images, vae_dir, tmp_path):
    import shutil

    folder = shutil.copytree(images, tmp_path / "imgs")
    out = tmp_path / "changed"
    run(images=folder, vae_dir=vae_dir, out=out)
    before = LatentDataset(out).posterior(torch.arange(1))[0]
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB").save(folder / "a_cat" / "0.png")
    report = run(folder, vae_dir, out)
    assert report["shards_written"] == ["shard-00000.safetensors"] and len(report["shards_done"]) == 3
    after = LatentDataset(out).posterior(torch.arange(1))[0]
    assert not torch.equal(before, after)
    report = run(folder, vae_dir, out)  # unchanged since: nothing redone
    assert report["shards_written"] == []
