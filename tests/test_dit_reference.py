"""Config A reproduces the original DiT exactly: outputs of facebookresearch/DiT stored as a fixture.

The fixture (tests/fixtures/README.md) holds two tiny DiTs built by the original code, every parameter
perturbed away from the zero init, with inputs and outputs. No DiT code is in this repository.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mapdit import config as config_module
from mapdit.config import make_config
from mapdit.model import DiT, convert_dit_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "dit_reference.safetensors"


def load_case(prefix):
    with safe_open(str(FIXTURE), "pt") as f:
        args = json.loads(f.metadata()["cases"])[prefix]
        state = {k[len(prefix) + 7:]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{prefix}.state.")}
        io = {k: f.get_tensor(f"{prefix}.{k}") for k in ("x", "t", "y", "out")}
    return args, state, io


@pytest.mark.parametrize("prefix", ["a", "b"])
def test_config_a_matches_original_dit_outputs(prefix, monkeypatch):
    args, state, io = load_case(prefix)
    # the fixture's width/depth is not a named size: register it for this test
    monkeypatch.setitem(config_module.SIZES, "REF", (args["depth"], args["hidden_size"], args["num_heads"]))
    cfg = make_config(f"DiT-REF/{args['patch_size']}", input_size=args["input_size"],
                      in_channels=args["in_channels"], num_classes=args["num_classes"],
                      learn_sigma=args["learn_sigma"], class_dropout_prob=args["class_dropout_prob"])
    model = DiT(cfg).eval()
    # same parameter names and counts as the original
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())
    model.load_state_dict(convert_dit_state_dict(state), strict=True)
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    # 1e-6 absolute: float32 noise is ~1e-7; a tanh-vs-exact GELU slip would show as ~3e-6
    assert (out - io["out"]).abs().max().item() < 1e-6


def test_original_checkpoint_file_loads_through_the_api(tmp_path, monkeypatch):
    """The fixture's DiT weights saved as DiT's train.py saves a checkpoint (model / ema / opt / args with an
    argparse Namespace) load weights-only through mapdit.load_dit_checkpoint and give DiT's own outputs."""
    import argparse

    import mapdit

    args, state, io = load_case("a")
    monkeypatch.setitem(config_module.SIZES, "REF", (args["depth"], args["hidden_size"], args["num_heads"]))
    path = tmp_path / "0000100.pt"
    torch.save({"model": {}, "ema": state, "opt": {}, "args": argparse.Namespace(**args)}, path)
    pipe = mapdit.load_dit_checkpoint(path, model=f"DiT-REF/{args['patch_size']}",
                                      image_size=8 * args["input_size"], num_classes=args["num_classes"], vae=None)
    with torch.no_grad():
        out = pipe.model(io["x"], io["t"], io["y"])
    assert (out - io["out"]).abs().max().item() < 1e-6
