"""The fast paths (mapdit.fused) compute exactly what the plain formulas compute.

Batched forced normalisation equals the per-layer projection; the custom autograd Functions (weight
normalisation, q/k normalisation, fused scale-rotation) have the gradients of the plain formulas; the
eval-mode weight cache is reused and invalidated when weights change; the block (the formula, with the MP
activations folded into the next MP linear) equals the plain formulas; a training step equals the same
step inside `reference_math()`; every preset and modulation compiles with torch.compile without graph breaks.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mapdit import config as config_module
from mapdit.config import PRESETS, make_config
from mapdit.fused import (
    FAST_PATHS,
    FusedMPLinear,
    _CosineQKV,
    _NormalizedWeight,
    _row_rms,
    modulate,
    normalize_qk,
    project_mp_weights_,
    reference_enabled,
    reference_math,
)
from mapdit.model import DiT
from mapdit.nn import (
    EPS,
    MPEmbedding,
    MPLinear,
    cosine_attention,
    mp_gelu,
    mp_silu,
    mp_sum,
    normalize,
)
from mapdit.nn import modulate as nn_modulate

MODULATIONS = ["adaln", "scale", "shift", "rotate", "scale+rotate"]
CASES = [(p, "adaln") for p in PRESETS] + [("E", m) for m in MODULATIONS if m != "adaln"]  # presets, modulations


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_size(monkeypatch):
    """DiT-TINY: 1 block, width 32, 2 heads (registered for the test only; one block keeps compiles short)."""
    monkeypatch.setitem(config_module.SIZES, "TINY", (1, 32, 2))
    return "DiT-TINY/4"


def tiny_model(model, preset, modulation="adaln", dtype=torch.float32, **kw):
    cfg = make_config(model, preset=preset, modulation=modulation, input_size=8, in_channels=4, num_classes=10,
                      **kw)
    m = DiT(cfg).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero init, so that every path carries signal
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def inputs(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, 4, 8, 8, generator=g).to(dtype), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


# ------------------------------------------------------------------------------------------------
# Forced weight normalisation, batched
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("concat", [False, True])  # per-weight norms (CPU) / one norm per group (GPU path)
def test_batched_projection_of_a_model_equals_per_layer_projection(tiny_size, monkeypatch, concat):
    import mapdit.fused

    monkeypatch.setattr(mapdit.fused, "_concat_row_norms", lambda device: concat)
    model = tiny_model(tiny_size, "E")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2:
                p.mul_(torch.rand(p.shape[0], 1) * 4 + 0.1)
    other = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, (MPLinear, MPEmbedding))]
    rms_before = [_row_rms(m.weight) for m in layers]
    assert model.project_weights_() == len(layers) > 10
    for m in other.modules():
        if isinstance(m, (MPLinear, MPEmbedding)):
            m.project_()
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    for m, r0 in zip(layers, rms_before):
        assert m._projected_version == m.weight._version  # the forward will not project again
        # rows now have RMS r0 / (r0 + eps): 1 up to normalize's eps
        assert torch.allclose(_row_rms(m.weight), r0 / (r0 + EPS), rtol=1e-6)


def test_projection_records_row_statistics_used_by_the_next_forward():
    layer = FusedMPLinear(24, 16, gain=0.7).train()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    project_mp_weights_(layer)
    rms, inv = layer._row_stats()
    measured = _row_rms(layer.weight)
    assert torch.allclose(rms, measured, rtol=1e-6)  # computed from the projection, equals a fresh measure
    assert torch.allclose(inv, 1 / (measured + EPS), rtol=1e-6)
    with torch.no_grad():  # an optimizer step: the recorded statistics no longer apply
        layer.weight.add_(0.5)
    rms2, _ = layer._row_stats()
    assert torch.allclose(rms2, _row_rms(layer.weight))


# ------------------------------------------------------------------------------------------------
# Custom autograd Functions: gradients of the plain formulas
# ------------------------------------------------------------------------------------------------
def test_custom_functions_pass_gradcheck():
    d = torch.float64
    w = torch.randn(5, 7, dtype=d, requires_grad=True)
    gain = torch.tensor(0.7, dtype=d, requires_grad=True)

    def weight_fn(w, gain):
        rms = _row_rms(w)
        return _NormalizedWeight.apply(w, rms, 1 / (rms + EPS), gain, 0.3)

    assert torch.autograd.gradcheck(weight_fn, (w, gain))
    qkv = torch.randn(2, 5, 3 * 8, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: _CosineQKV.apply(q, 2, False), (qkv,))
    assert torch.autograd.gradcheck(lambda q: _CosineQKV.apply(q * 1.0, 2, True), (qkv,))  # in place
    for pairing in ("half", "interleaved"):  # the fused scale-rotation (_PairMix)
        x = torch.randn(2, 3, 8, dtype=d, requires_grad=True)
        theta = torch.randn(2, 1, 4, dtype=d, requires_grad=True)
        k = torch.randn(2, 1, 8, dtype=d, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, th, k: modulate(x, None, k, th, pairing), (x, theta, k))
        assert torch.autograd.gradcheck(lambda x, th, k: modulate(x, k, k, th, pairing), (x, theta, k))
        assert torch.autograd.gradcheck(lambda x, th: modulate(x, None, None, th, pairing), (x, theta))


@pytest.mark.parametrize("rows", [30, 6])  # per token and few rows (per-sample conditioning)
@pytest.mark.parametrize("forced,on_use,gain", [(True, True, None), (True, True, 0.5), (False, True, 1.3),
                                                (True, False, None), (True, True, 0.0)])
def test_mp_linear_fast_training_path_matches_plain_normalize(forced, on_use, gain, rows):
    """Custom-autograd weight normalisation (forward one multiply, backward the tangent projection)
    against the plain differentiable normalize: outputs and gradients agree to float rounding."""
    fast = FusedMPLinear(48, 20, normalize_on_use=on_use, forced=forced, gain=gain, input_scale=1.7).train()
    with torch.no_grad():
        fast.weight.mul_(torch.rand(20, 1) * 3 + 0.2)
    plain = copy.deepcopy(fast)
    x = torch.randn(rows // 5 if rows > 6 else rows, 5 if rows > 6 else 1, 48).squeeze(1)
    g_out = torch.randn(*x.shape[:-1], 20)
    if forced:
        project_mp_weights_(fast)  # as the training loop; the plain copy projects in place itself
        plain.project_()
    y_fast = fast(x)
    y_plain = MPLinear.forward(plain, x)  # the plain layer's forward: F.linear with the effective weight
    assert torch.allclose(y_fast, y_plain, rtol=1e-5, atol=1e-6)
    (y_fast * g_out).sum().backward()
    (y_plain * g_out).sum().backward()
    assert torch.allclose(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-6)
    if gain is not None:
        assert torch.allclose(fast.gain.grad, plain.gain.grad, rtol=1e-4, atol=1e-6)
    if forced and on_use:  # the gradient is tangent to the sphere: no radial component per row
        radial = (fast.weight.grad * fast.weight).sum(dim=1)
        assert radial.abs().max() <= 1e-4 * fast.weight.grad.norm(dim=1).max() * math.sqrt(48)


def test_cosine_attention_fast_paths_match_plain_formula():
    n, t, h, dh = 2, 9, 3, 8
    leaf = (torch.randn(n, t, 3 * h * dh) * 4).requires_grad_()
    plain = leaf.detach().clone().requires_grad_()
    with reference_math("qk"):
        ref = normalize_qk(plain, h)
    q, k, v = ref.view(n, t, 3, h, dh).permute(2, 0, 3, 1, 4)  # the plain path is cosine attention's q, k, v
    q_raw, k_raw, v_raw = plain.detach().view(n, t, 3, h, dh).permute(2, 0, 3, 1, 4)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v), cosine_attention(q_raw, k_raw, v_raw), atol=1e-6)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    for source in ("leaf", "fresh"):  # a leaf is copied; a fresh non-leaf (a layer's output) is written in place
        leaf.grad = None
        qkv = leaf if source == "leaf" else leaf * 1.0
        out = normalize_qk(qkv, h)
        assert (out.data_ptr() == qkv.data_ptr()) == (source == "fresh")
        assert torch.allclose(out, ref, atol=1e-6)
        (out * g).sum().backward()
        assert torch.allclose(leaf.grad, plain.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # sampling: normalised in place, same values
        fresh = leaf.detach().clone()
        assert torch.allclose(normalize_qk(fresh, h), ref, atol=1e-6)
    # the standalone function (separate q, k, v) against softmax of the explicit cosine logits
    q, k, v = (torch.randn(n, h, t, dh) * 9 for _ in range(3))
    logits = normalize(q) @ normalize(k).transpose(-1, -2) / math.sqrt(dh)
    assert torch.allclose(cosine_attention(q, k, v), torch.softmax(logits, -1) @ v, atol=1e-5)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("parts", ["rotate", "scale+rotate", "shift+scale+rotate", "shift+rotate", "scale"])
def test_fused_modulate_equals_the_formula(pairing, parts):
    """fused.modulate (scale and rotation in one pair-mix Function) against nn.modulate: values and gradients."""
    x = torch.randn(3, 7, 16, requires_grad=True)
    mods = {"shift": torch.randn(3, 1, 16), "scale": torch.randn(3, 1, 16), "rotate": torch.randn(3, 1, 8)}
    mods = {k: v.requires_grad_() for k, v in mods.items() if k in parts.split("+")}
    args = [mods.get(k) for k in ("shift", "scale", "rotate")]
    plain = [x.detach().clone().requires_grad_()] + [None if a is None else a.detach().clone().requires_grad_()
                                                     for a in args]
    out, ref = modulate(x, *args, pairing), nn_modulate(*plain, pairing)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in zip([x] + args, plain):
        if a is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The switch, and the block against its reference
# ------------------------------------------------------------------------------------------------
def _graph(out: torch.Tensor) -> set[str]:
    """Names of all autograd nodes behind `out` (custom Functions appear as `_NameBackward`)."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_reference_math_switches_named_paths_and_restores_them(tiny_size):
    assert not any(reference_enabled(p) for p in FAST_PATHS)
    with reference_math("qk"):
        assert reference_enabled("qk") and not reference_enabled("linear")
        with reference_math():
            assert all(reference_enabled(p) for p in FAST_PATHS)
        assert reference_enabled("qk") and not reference_enabled("linear")
    assert not any(reference_enabled(p) for p in FAST_PATHS)
    with pytest.raises(ValueError, match="unknown fast path"):
        with reference_math("mlp"):
            pass

    # every path switched on really leaves its custom Function for the plain formula
    x, k = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 1, 16, requires_grad=True)
    theta = torch.randn(2, 1, 8, requires_grad=True)
    layer = FusedMPLinear(16, 8).train()
    cases = {  # path: (computation, the custom Function it uses)
        "qk": (lambda: normalize_qk(x.reshape(2, 4, 12) * 1.0, 2), "_CosineQKVBackward"),
        "linear": (lambda: layer(x), "_NormalizedWeightBackward"),
        "rotation": (lambda: modulate(x, None, k, theta), "_PairMixBackward"),
    }
    assert set(cases) == set(FAST_PATHS)
    for path, (compute, fast) in cases.items():
        assert fast in _graph(compute()), path
        with reference_math(path):
            assert fast not in _graph(compute()), path

    # the model: with every path switched, no custom Function at all
    model = tiny_model(tiny_size, "E", "scale+rotate").train()
    model.project_weights_()
    args = inputs()
    assert "_CosineQKVBackward" in _graph(model(*args))
    with reference_math():
        assert not any(n.startswith("_") for n in _graph(model(*args)))


@pytest.mark.parametrize("modulation,activation,gains", [
    ("adaln", "gelu", "shared"), ("scale+rotate", "gelu", "shared"), ("shift", "gelu", "shared"),
    ("rotate", "gelu", "shared"), ("adaln", "silu", "shared"), ("scale+rotate", "gelu", "per-modulator")])
def test_config_e_block_equals_the_plain_formulas(tiny_size, modulation, activation, gains):
    """MP activation folded into the next MP linear: the block equals
    x = mp_sum(x, gate * branch(modulate(norm(x))), 0.3) in the plain formulas of mapdit.nn (float64), in
    training and in the cached eval path."""
    model = tiny_model(tiny_size, "E", modulation, dtype=torch.float64, gate_init="identity",
                       mlp_activation=activation, modulation_gains=gains).train()
    if gains == "per-modulator":  # zero gains at init would hide a wrong chunk order
        with torch.no_grad():
            for block in model.blocks:
                block.adaLN_modulation[2].gain.copy_(torch.linspace(0.3, 1.7, block.adaLN_modulation[2].gain.numel()))
    model.project_weights_()  # the training path then uses the projection's row statistics
    block = model.blocks[0]
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    c = torch.randn(3, 32, dtype=torch.float64)
    parts = model.config.modulation_parts
    widths = [{"rotate": 16}.get(p, 32) for p in parts]

    with torch.no_grad():
        # what the reference builds on: the site's chunks in config order, gate 1 + g (identity init) ...
        params = torch.randn(3, 1, sum(widths), dtype=torch.float64)
        chunks = dict(zip(parts, params.split(widths, dim=-1)))
        shift, scale, angle, gate = block.site.unpack(params)
        for got, name in ((shift, "shift"), (scale, "scale"), (angle, "rotate")):
            assert got is None if name not in chunks else torch.equal(got, chunks[name])
        assert torch.equal(gate, 1 + chunks["gate"])
        # ... one gain per modulator chunk, [site 1 chunks, site 2 chunks] ...
        if gains == "per-modulator":
            g = block.adaLN_modulation[2].gain
            m = torch.randn(3, 2 * sum(widths), dtype=torch.float64)
            expanded = torch.cat([g[i].expand(w) for i, w in enumerate(widths * 2)])
            assert torch.equal(block.adaLN_modulation[2](m), m * expanded)
        # ... and the folded MP activations: plain activation + input_scale = MP activation + MP linear
        h = torch.randn(3, 4, 128, dtype=torch.float64)
        fc2 = block.mlp.fc2
        unfolded = MPLinear(fc2.in_features, fc2.out_features).to(torch.float64)
        unfolded.weight.copy_(fc2.weight)
        mp_act = mp_gelu if activation == "gelu" else mp_silu
        with reference_math():
            assert torch.allclose(fc2(block.mlp.act(h)), unfolded.eval()(mp_act(h)), rtol=1e-10, atol=1e-12)
            mod = block.adaLN_modulation
            unfolded = MPLinear(32, mod[1].out_features, gain=1.0).to(torch.float64).eval()
            unfolded.weight.copy_(mod[1].weight)
            if mod[1].gain is not None:
                unfolded.gain.copy_(mod[1].gain)
            assert torch.allclose(mod[1](mod[0](c)), unfolded(mp_silu(c)), rtol=1e-10, atol=1e-12)

        with reference_math():
            expected = block(x, c)
        with reference_math():  # EDM2's block residual, written out: mp_sum with t = 0.3
            h = x
            for p, norm, branch in zip(block.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1),
                                       (block.norm1, block.norm2), (block.attn, block.mlp)):
                shift, scale, angle, gate = block.site.unpack(p)
                h = mp_sum(h, gate * branch(nn_modulate(norm(h), shift, scale, angle, block.site.pairing)), 0.3)
        assert torch.allclose(h, expected, rtol=1e-10, atol=1e-12)
        assert torch.allclose(block(x, c), expected, rtol=1e-10, atol=1e-12)  # training path
        model.eval()
        assert torch.allclose(block(x, c), expected, rtol=1e-10, atol=1e-12)  # cached eval path


@pytest.mark.parametrize("preset,modulation", CASES)
def test_model_forward_equals_reference_for_every_preset(tiny_size, preset, modulation):
    """Every preset and modulation: the whole model against `reference_math()`."""
    dtype = torch.float64 if preset == "E" else torch.float32  # DiT's sinusoid features are float32
    model = tiny_model(tiny_size, preset, modulation, dtype=dtype).train()
    x, t, y = inputs(dtype=dtype)
    model.project_weights_()
    out = model(x, t, y)
    with reference_math():
        expected = model(x, t, y)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(out, expected, **tol)


def test_training_gradients_match_plain_formulas_end_to_end(tiny_size):
    """A training step of Config E with every fast path against the same model inside `reference_math()`
    (every layer its plain formula): equal loss gradients (float64)."""
    model = tiny_model(tiny_size, "E", "scale+rotate", dtype=torch.float64).train()
    plain = copy.deepcopy(model)
    x, t, y = inputs(dtype=torch.float64)
    model.project_weights_()
    plain.project_weights_()
    (model(x, t, y) ** 2).mean().backward()
    with reference_math():
        (plain(x, t, y) ** 2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), name


# ------------------------------------------------------------------------------------------------
# Eval-mode cache
# ------------------------------------------------------------------------------------------------
def test_eval_weights_are_computed_once_and_invalidated_by_any_change(tiny_size, monkeypatch):
    model = tiny_model(tiny_size, "E").eval()
    x, t, y = inputs()
    calls = []
    original = MPLinear.effective_weight
    monkeypatch.setattr(MPLinear, "effective_weight", lambda self: calls.append(self) or original(self))
    n_layers = sum(isinstance(m, MPLinear) for m in model.modules())
    with torch.no_grad():
        first = model(x, t, y)
        for _ in range(3):  # sampling steps reuse the normalised weights
            assert torch.equal(model(x, t, y), first)
    assert len(calls) == n_layers

    # an optimizer step changes the weights in place: every layer recomputes
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x, t, y) ** 2).mean().backward()
    opt.step()
    model.eval()
    calls.clear()
    with torch.no_grad():
        second = model(x, t, y)
    assert len(calls) == n_layers and not torch.allclose(second, first)

    # loading a state dict (copy_ into the parameters) invalidates too, back to the first output
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        model(x, t, y)
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), second, atol=1e-6)

    # a gain changed alone invalidates its layer
    layer = model.final_layer.linear
    with torch.no_grad():
        before = layer(torch.ones(1, 32))
        layer.gain.mul_(2.0)
        assert torch.allclose(layer(torch.ones(1, 32)), 2 * before, atol=1e-6)
        # and a different input dtype gets its own cast copy
        assert layer(torch.ones(1, 32, dtype=torch.float64)).dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def _graph_breaks(model, args) -> tuple[int, list]:
    import torch._dynamo

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(*args)
    finally:
        torch._dynamo.reset()
    return explanation.graph_break_count, [r.reason.splitlines()[0] for r in explanation.break_reasons]


@pytest.mark.parametrize("preset,modulation", CASES)
def test_compiles_without_graph_breaks(tiny_size, preset, modulation):
    """Training forward (after the loop's batched projection) and no-grad eval forward: one graph each."""
    model = tiny_model(tiny_size, preset, modulation).train()
    args = inputs()
    model.project_weights_()
    assert _graph_breaks(model, args) == (0, [])
    model.eval()
    with torch.no_grad():
        assert _graph_breaks(model, args) == (0, [])


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("modulation", MODULATIONS)
def test_every_combination_compiles_without_graph_breaks(tiny_size, preset, modulation):
    model = tiny_model(tiny_size, preset, modulation).train()
    model.project_weights_()
    assert _graph_breaks(model, inputs()) == (0, [])


@pytest.mark.parametrize("preset,modulation", [("A", "adaln"), ("E", "scale+rotate")])
def test_fullgraph_compile_forward_backward_matches_eager(tiny_size, preset, modulation):
    """fullgraph=True (any graph break would raise) through AOT autograd, forward and backward."""
    import torch._dynamo

    model = tiny_model(tiny_size, preset, modulation).train()
    args = inputs()
    model.project_weights_()
    ref = model(*args)
    (ref ** 2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch._dynamo.reset()
    try:
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(*args)
        (out ** 2).mean().backward()
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, ref, atol=1e-5)
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, expected))
