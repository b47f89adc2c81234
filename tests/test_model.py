"""The DiT model: presets, options, modulation, parameter counts, DiT compatibility."""
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import Evil, plant_pickle
from mapdit import config as config_module
from mapdit.cli import main as cli_main
from mapdit.config import MP_OPTIONS, PRESETS, ModelConfig, make_config, parse_modulation
from mapdit.errors import UserError
from mapdit.model import DiT, SiteModulation, convert_dit_state_dict, parameter_breakdown, patchify, unpatchify
from mapdit.nn import magnitude, modulate

MODULATIONS = ["adaln", "scale", "shift", "rotate", "scale+rotate"]


def tiny(preset=None, **kw):
    base = dict(model="DiT-XS/2", input_size=8, in_channels=4, num_classes=10)
    base.update(kw)
    return make_config(base.pop("model"), preset=preset, **base)


def inputs(cfg, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y


def perturb_(model, scale=0.05, seed=1):
    """Break the zero init so every part of the model influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------
def test_dit_xl2_parameter_count_matches_original_dit():
    with torch.device("meta"):
        model = DiT(make_config("DiT-XL/2"))
    counts = parameter_breakdown(model)
    assert counts["total"] == 675_129_632
    assert counts["trainable"] == 674_834_720


def test_model_info_cli_reports_counts(capsys):
    assert cli_main(["model-info", "--model", "DiT-XL/2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 675_129_632
    assert info["forward_gmacs"] == pytest.approx(118.6, abs=0.1)  # DiT paper: 118.6 Gflops (MACs)
    assert cli_main(["model-info", "--model", "DiT-S/2", "--config", "E", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert set(e["mp_options"]) == set(MP_OPTIONS)
    assert cli_main(["model-info", "--model", "DiT-S/2", "--modulation", "scale+rotate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["modulation"] == "scale+rotate+gate"


def test_model_info_cli_bad_model_is_one_line_exit_2(capsys):
    assert cli_main(["model-info", "--model", "DiT-Q/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'DiT-Q/2'" in err and "\n" not in err


def test_scale_rotate_has_fewer_parameters_than_adaln():
    counts = {}
    for mod in ("adaln", "scale+rotate"):
        with torch.device("meta"):
            model = DiT(make_config("DiT-S/2", preset="E", modulation=mod, input_size=16))
        counts[mod] = parameter_breakdown(model)["trainable"]
    saving = 1 - counts["scale+rotate"] / counts["adaln"]
    print(f"DiT-S/2 Config E: adaln {counts['adaln']:,}, scale+rotate {counts['scale+rotate']:,} "
          f"({100 * saving:.2f} % fewer; the paper says about 5.4 %)")
    assert 0.04 < saving < 0.07


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("modulation", MODULATIONS)
@pytest.mark.parametrize("shape", [(4, 32), (1, 28)])
def test_forward_backward_every_variant(preset, modulation, shape):
    channels, size = shape
    cfg = make_config("DiT-XS/2", preset=preset, modulation=modulation, input_size=size, in_channels=channels,
                      num_classes=10)
    model = DiT(cfg).train()
    x, t, y = inputs(cfg, n=2)
    out = model(x, t, y)
    assert out.shape == (2, 2 * channels, size, size)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_patchify_roundtrip_and_learn_sigma_off():
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)
    cfg = tiny(learn_sigma=False)
    out = DiT(cfg)(*inputs(cfg))
    assert out.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("preset", list("ABCD"))
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_zero_init_conditioning_makes_every_block_an_identity(preset, modulation):
    cfg = tiny(preset, modulation=modulation)
    model = DiT(cfg).train()
    x, t, y = inputs(cfg)
    h = torch.randn(3, 16, cfg.hidden_size)
    c = model.condition(model.t_embedder(t), model.y_embedder(y))
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    # and the final layer predicts exactly zero
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_rotation_site_with_zero_angles_is_identity():
    site = SiteModulation(("rotate",), 16, "identity", "half")
    h = torch.randn(2, 5, 16)
    shift, scale, angle, gate = site.unpack(torch.zeros(2, 1, 8))  # the block's view of the site
    assert shift is None and scale is None and gate == 1.0  # no gate: the branch output is used as it is
    assert angle.shape == (2, 1, 8)
    assert torch.equal(modulate(h, shift, scale, angle) * gate, h)


def test_mp_residual_with_zero_gates_scales_by_a_known_constant():
    """AdaLN-Zero with MP sums: a zero-gated block maps x to x*(1-t)/sqrt((1-t)^2+t^2) (EDM2 eq. 88, zero branch)."""
    cfg = tiny("E")
    model = DiT(cfg).train()
    h = torch.randn(3, 16, cfg.hidden_size)
    c = torch.randn(3, cfg.hidden_size)
    per_branch = 0.7 / math.sqrt(0.7**2 + 0.3**2)
    assert torch.allclose(model.blocks[0](h, c), h * per_branch**2, atol=1e-6)


def test_config_e_keeps_residual_stream_magnitude_at_init():
    """With identity gates (so branches contribute), MP keeps the stream at magnitude ~1; the baseline grows.

    Tolerance: each MP branch outputs roughly unit magnitude and the MP sum keeps magnitude only for
    uncorrelated inputs; attention averages over tokens and shrinks its output, so the stream may drift
    below 1. We accept [0.5, 1.5] after every block; Config A's magnitudes are recorded for comparison.
    """
    torch.manual_seed(0)
    mags = {}
    for preset in ("A", "E"):
        cfg = make_config("DiT-XS/2", preset=preset, gate_init="identity", input_size=16, num_classes=10)
        model = DiT(cfg).eval()
        x, t, y = inputs(cfg, n=8)
        with torch.no_grad():
            h = model.combine(model.x_embedder(x), model.pos_embed)
            h = h / magnitude(h)  # unit-magnitude input to the first block
            c = model.condition(model.t_embedder(t), model.y_embedder(y))
            mags[preset] = []
            for block in model.blocks:
                h = block(h, c)
                mags[preset].append(magnitude(h).item())
    print("residual magnitude per block  A:", [f"{m:.2f}" for m in mags["A"]],
          " E:", [f"{m:.2f}" for m in mags["E"]])
    assert all(0.5 < m < 1.5 for m in mags["E"])
    assert mags["A"][-1] > 1.5 * mags["E"][-1]  # plain sums accumulate the branches


OPTION_PARTS = {
    # option -> parameter names it may change (prefixes); everything else must be untouched
    "cosine_attention": [],
    "weight_normalization": None,  # touches every linear: checked separately
    "forced_weight_normalization": None,
    "mp_residual": [],
    "mp_silu": [],
    "no_layernorm": [],
    "mp_pos_enc": ["pos_embed"],
    "mp_embedding": ["y_embedder.", "t_embedder.table"],
}


@pytest.mark.parametrize("option", [o for o, parts in OPTION_PARTS.items() if parts is not None])
def test_every_option_changes_what_it_names_and_nothing_else(option):
    base_cfg = tiny("A")
    opt_cfg = tiny("A", **{option: True})
    torch.manual_seed(0)
    base = DiT(base_cfg)
    torch.manual_seed(0)
    other = DiT(opt_cfg)
    allowed = OPTION_PARTS[option]
    base_sd, other_sd = base.state_dict(), other.state_dict()
    touched = {k for k in base_sd.keys() ^ other_sd.keys()}
    touched |= {k for k in base_sd.keys() & other_sd.keys() if base_sd[k].shape != other_sd[k].shape}
    assert all(any(k.startswith(a) for a in allowed) for k in touched), touched
    # same weights where shapes agree, then the outputs must differ (the option does something)
    shared = {k: v for k, v in base_sd.items() if k in other_sd and other_sd[k].shape == v.shape
              and not any(k.startswith(a) for a in allowed)}
    other.load_state_dict(shared, strict=False)
    perturb_(base)
    perturb_(other)  # same seed, same shapes -> same perturbation on shared parameters
    x, t, y = inputs(base_cfg)
    with torch.no_grad():
        assert not torch.allclose(base.eval()(x, t, y), other.eval()(x, t, y), atol=1e-5)
    # the embedders' outputs are unchanged by options that act inside blocks
    if option in ("cosine_attention", "mp_silu", "no_layernorm"):
        with torch.no_grad():
            assert torch.equal(base.x_embedder(x), other.x_embedder(x))


def test_weight_normalisation_swaps_linears_for_bias_free_mp_linears():
    a = DiT(tiny("A"))
    c = DiT(tiny("C"))
    a_keys, c_keys = set(a.state_dict()), set(c.state_dict())
    assert {k for k in a_keys - c_keys} == {k for k in a_keys if k.endswith(".bias")}
    assert {k for k in c_keys - a_keys} == {k for k in c_keys if k.endswith(".gain")}
    # the patch embedding gets the constant-1 input channel
    assert c.x_embedder.proj.weight.shape[1] == a.x_embedder.proj.weight.shape[1] + 1


def test_presets_are_cumulative_and_e_is_all_mp():
    flags = [set(make_config("DiT-S/2", preset=p).enabled_mp_options()) for p in "ABCDE"]
    assert all(a < b for a, b in zip(flags, flags[1:]))
    assert flags[-1] == set(make_config("DiT-S/2", use_all_mp=True).enabled_mp_options())


def test_config_json_roundtrip_builds_the_same_model():
    cfg = tiny("E", modulation="scale+rotate", gate_init="identity", rotation_pairing="interleaved")
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    torch.manual_seed(0)
    m1 = DiT(cfg)
    torch.manual_seed(0)
    m2 = DiT(again)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_bad_configs_raise_user_errors():
    with pytest.raises(UserError, match="does not divide"):
        make_config("DiT-S/8", input_size=28)
    with pytest.raises(UserError, match="unknown modulation"):
        parse_modulation("scale+wobble")
    with pytest.raises(UserError, match="preset"):
        make_config("DiT-S/2", preset="F")


def test_modulation_parsing():
    assert parse_modulation("adaln") == ("shift", "scale", "gate")
    assert parse_modulation("scale+rotate") == ("scale", "rotate", "gate")
    assert parse_modulation("rotate+nogate") == ("rotate",)


def test_dit_conv_patch_embedding_maps_onto_our_linear():
    """A DiT-style state dict built here (conv kernel) loads into Config A and gives the conv's output."""
    cfg = tiny("A")
    model = DiT(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    conv = torch.nn.Conv2d(c, d, p, stride=p)
    sd["x_embedder.proj.weight"] = conv.weight.detach().clone()
    sd["x_embedder.proj.bias"] = conv.bias.detach().clone()
    model.load_state_dict(convert_dit_state_dict(sd))
    x = torch.randn(2, c, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2)  # DiT's PatchEmbed: (N, T, D)
        assert torch.allclose(model.x_embedder(x), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Choices beside the eight options: timestep features, MLP activation, modulation gains
# ------------------------------------------------------------------------------------------------
def _time_features(kind):
    model = DiT(tiny("E", time_embedding=kind))
    with torch.no_grad():
        return model.t_embedder.table(torch.arange(1000))  # (1000, 256)


@pytest.mark.parametrize("kind", ["fourier", "mp-sinusoid"])
def test_smooth_time_features_have_unit_rms_and_similar_neighbours(kind):
    f = _time_features(kind)
    rms = f.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones(1000), atol=1e-3)
    neighbours = torch.nn.functional.cosine_similarity(f[1:], f[:-1], dim=1)
    assert neighbours.min() > 0.9


def test_upstream_table_gives_neighbouring_steps_unrelated_codes():
    neighbours = torch.nn.functional.cosine_similarity(*(lambda f: (f[1:], f[:-1]))(_time_features("table")), dim=1)
    assert neighbours.abs().mean() < 0.1  # the flaw the smooth features fix


def test_fourier_features_follow_the_noise_level_between_steps():
    table = DiT(tiny("E")).t_embedder.table
    assert tiny("E").time_embedding_kind == "fourier"
    with torch.no_grad():
        mid = table(torch.tensor([10.5]))
        ends = table(torch.tensor([10, 11]))
    assert torch.allclose(mid, table.forward(torch.tensor([10.5])))
    assert torch.nn.functional.cosine_similarity(mid, ends).min() > 0.99


def test_old_run_configs_load_as_they_were_built():
    """A config.json written before the choices existed keeps upstream's table and SiLU for MP runs."""
    data = tiny("E").to_dict()
    del data["mlp_activation"], data["time_embedding"], data["modulation_gains"]
    old = ModelConfig.from_dict(data)
    assert (old.mlp_activation, old.time_embedding_kind) == ("silu", "table")
    assert "t_embedder.table.weight" in DiT(old).state_dict()
    plain = {k: v for k, v in tiny("A").to_dict().items() if k not in ("mlp_activation", "time_embedding")}
    assert (ModelConfig.from_dict(plain).mlp_activation, ModelConfig.from_dict(plain).time_embedding_kind) == (
        "gelu", "sinusoid")


def test_presets_keep_dits_gelu_and_the_activation_option_changes_only_the_mlp():
    for preset in PRESETS:
        assert tiny(preset).mlp_activation == "gelu"
    gelu, silu = DiT(tiny("A")), DiT(tiny("A", mlp_activation="silu"))
    assert isinstance(gelu.blocks[0].mlp.act, torch.nn.GELU) and isinstance(silu.blocks[0].mlp.act, torch.nn.SiLU)
    assert isinstance(silu.t_embedder.mlp[1], torch.nn.SiLU) and isinstance(gelu.t_embedder.mlp[1], torch.nn.SiLU)
    e = DiT(tiny("E"))  # MP: plain GELU, and the next MP linear divides by GELU's RMS
    assert e.blocks[0].mlp.fc2.input_scale == pytest.approx(1 / 0.652)
    assert DiT(tiny("E", mlp_activation="silu")).blocks[0].mlp.fc2.input_scale == pytest.approx(1 / 0.596)


def test_mp_gelu_has_unit_magnitude_on_gaussian_input():
    from mapdit.nn import mp_gelu

    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mp_gelu(z).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=5e-3)


def test_per_modulator_gains_grow_independently():
    cfg = tiny("E", modulation="scale+rotate", modulation_gains="per-modulator")
    model = DiT(cfg)
    shared = DiT(tiny("E", modulation="scale+rotate"))
    chunks = 3  # scale, rotate, gate
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in shared.parameters())
    assert extra == cfg.depth * (2 * chunks - 1) + (chunks - 1 - 1)  # blocks: 2 sites; final layer: no gate
    gains = model.blocks[0].adaLN_modulation[2].gain
    assert gains.shape == (2 * chunks,) and not gains.any()  # zero at init
    perturb_(model)
    x, t, y = inputs(cfg)
    model(x, t, y).square().mean().backward()
    grad = model.blocks[0].adaLN_modulation[2].gain.grad
    assert (grad != 0).all() and len(set(grad.tolist())) == 2 * chunks


def test_choice_values_are_checked():
    for key, bad in (("mlp_activation", "relu"), ("time_embedding", "random"), ("modulation_gains", "each")):
        with pytest.raises(UserError, match=f"(?i){key.split('_')[0]}"):
            tiny("E", **{key: bad})  # the message names the choice


def test_balanced_conditioning_weighs_label_and_timestep_alike():
    """With MP linears the timestep path's magnitude is fixed by unit rows (and grows by alignment) while a
    label table starts at DiT's 0.02: balanced conditioning normalises both before their MP sum."""
    assert (tiny("A").conditioning_kind, tiny("D").conditioning_kind, tiny("E").conditioning_kind) == (
        "sum", "balanced", "balanced")
    for preset in ("D", "E"):
        model = DiT(tiny(preset))
        t, y = torch.arange(0, 1000, 100), torch.arange(10)
        with torch.no_grad():
            c = model.condition(model.t_embedder(t), model.y_embedder(y))
        assert torch.allclose(c.pow(2).mean(dim=1), torch.ones(10), atol=0.25)  # uncorrelated halves: RMS ~1
        with torch.no_grad():
            yc = model.condition(model.t_embedder(t), model.y_embedder(y.flip(0)))
        label_part = (c - yc).pow(2).mean() / 2  # both halves have RMS 1/sqrt(2) each
        assert 0.3 < label_part < 0.7


@pytest.mark.parametrize("preset", ["A", "E"])
def test_attention_entropy_matches_the_attention_the_model_computes(preset, monkeypatch):
    """attention_entropy recomputes q and k itself; here the model's own forward (fast paths included) is
    intercepted at scaled_dot_product_attention, whose probabilities come out exactly as sdpa(q, k, I)."""
    import torch.nn.functional as F

    import mapdit.model as model_module
    from mapdit.evaluate.magnitudes import attention_entropy

    torch.manual_seed(0)
    model = DiT(make_config("DiT-XXS/4", preset=preset, input_size=28, in_channels=1, num_classes=10)).eval()
    with torch.no_grad():  # away from the zero init, so attention is not trivially uniform
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10, 500, 900]), torch.tensor([0, 4, 9])
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        eye = torch.eye(q.shape[-2]).expand(*q.shape[:-2], -1, -1)  # values = one-hot: output = probabilities
        p = sdpa(q, k, eye)
        seen.append(float((-(p * p.clamp_min(1e-30).log()).sum(-1)).mean() / math.log(q.shape[-2])))
        return sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(x, t, y)
    monkeypatch.undo()
    measured = attention_entropy(model, x, t, y)
    assert len(measured) == len(model.blocks) and all(0 < e <= 1 for e in measured)
    assert measured == pytest.approx(seen, abs=1e-5)
    assert min(measured) < 0.99  # not the uniform case the test could not tell from a wrong scale

    with torch.no_grad():  # q = k = 0 in every block: every query attends uniformly
        for b in model.blocks:
            b.attn.qkv.weight.zero_()
            if getattr(b.attn.qkv, "bias", None) is not None:
                b.attn.qkv.bias.zero_()
    assert attention_entropy(model, x, t, y) == pytest.approx([1.0] * len(model.blocks), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The block as the formula: today's outputs and gradients equal those of the folded forward it replaced
# ------------------------------------------------------------------------------------------------
def _fixture_cases():
    from safetensors import safe_open

    path = Path(__file__).parent / "fixtures" / "model_outputs.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["cases"])
        return {name: (*meta[name], f.get_tensor(f"{name}.out"), f.get_tensor(f"{name}.grad")) for name in meta}


@pytest.mark.parametrize("name", ["A", "B", "C", "D", "E", "E_scale_rotate", "E_rotate_identity_interleaved",
                                  "E_shift_silu_per_modulator", "E_table"])
def test_outputs_and_gradients_equal_those_of_the_folded_forward(name, monkeypatch):
    """tests/fixtures/make_model_outputs.py ran the model code of e95bf9f (MP constants folded into
    coefficients, fused gates): the formula gives the same outputs and gradients within float rounding."""
    from fixtures.make_model_outputs import build, grad_summary

    preset, kw, fp64, out_before, grad_before = _fixture_cases()[name]
    monkeypatch.setitem(config_module.SIZES, "REF", (2, 32, 2))
    model, args, w = build(preset, kw, fp64)
    out = model(*args)
    (out * w).sum().backward()
    def close(a, b, rel):  # relative to the largest value: float rounding, far below any real change
        return (a - b).abs().max() <= rel * b.abs().max()

    assert out.dtype == out_before.dtype and close(out.detach(), out_before, 1e-12 if fp64 else 1e-5)
    grads, rel = grad_summary(model), 1e-11 if fp64 else 1e-4  # float32 sums of many terms: 3.5e-5 seen on A
    assert close(grads[:, 0], grad_before[:, 0], rel) and close(grads[:, 1], grad_before[:, 1], rel)


def test_load_dit_checkpoint_refuses_code_in_pickles(tmp_path):
    from mapdit.model import load_dit_checkpoint

    marker = tmp_path / "MARKER"
    torch.save({"model": Evil(marker)}, tmp_path / "evil.pt")  # torch's zip format
    plant_pickle(tmp_path / "evil.pkl", marker)  # a bare pickle
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(Exception):
            load_dit_checkpoint(str(tmp_path / name))
        assert not marker.exists()
