"""Magnitude properties of the MP building blocks (mapdit.nn)."""
import math

import pytest
import torch

from mapdit.fused import FusedMPLinear, project_mp_weights_
from mapdit.nn import (
    MPEmbedding,
    MPLinear,
    cosine_attention,
    magnitude,
    modulate,
    mp_silu,
    mp_sincos_pos_embed_2d,
    mp_sum,
    normalize,
    rotate_pairs,
    sincos_pos_embed_2d,
)

# Sample sizes below give a standard error of the RMS well under 1 %; 3 % tolerances leave room for it.
TOL = 0.03
# The plain layers of mapdit.nn and their fast twins in mapdit.fused (what DiT builds) keep the same properties.
LINEARS = pytest.mark.parametrize("linear", [MPLinear, FusedMPLinear], ids=["plain", "fused"])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_normalize_gives_unit_rms_rows():
    x = torch.randn(64, 300) * 7.0
    rms = normalize(x).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones(64), atol=1e-4)


def test_mp_sum_keeps_magnitude_of_independent_unit_inputs():
    a, b = torch.randn(4096, 256), torch.randn(4096, 256)
    for t in (0.1, 0.3, 0.5, 0.9):
        assert magnitude(mp_sum(a, b, t)).item() == pytest.approx(1.0, abs=TOL)
    # a plain sum would not: sqrt(2)
    assert magnitude(a + b).item() == pytest.approx(math.sqrt(2), abs=TOL)


def test_mp_sum_and_modulate_compute_the_papers_formulas():
    """mp_sum is EDM2's lerp(a, b, t) / sqrt((1-t)^2 + t^2) (written alpha*a + beta*b), modulate is DiT's
    x * (1 + scale) + shift (written as one addcmul); mixed dtypes promote as a + b."""
    a, b = torch.randn(4, 9, 16, dtype=torch.float64), torch.randn(4, 9, 16, dtype=torch.float64)
    for t in (0.1, 0.3, 0.5, 0.9, 1.0):
        expected = torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t**2)
        assert torch.allclose(mp_sum(a, b, t), expected, rtol=1e-13, atol=1e-14)
    assert mp_sum(a.float(), b.bfloat16(), 0.3).dtype == torch.float32
    assert mp_sum(a.bfloat16(), b.float(), 0.3).dtype == torch.float32
    shift, scale = torch.randn(4, 1, 16, dtype=torch.float64), torch.randn(4, 1, 16, dtype=torch.float64)
    assert torch.allclose(modulate(a, shift, scale), a * (1 + scale) + shift, rtol=1e-13, atol=1e-14)
    assert torch.equal(modulate(a, None, scale), a * (1 + scale))
    assert torch.equal(modulate(a, shift, None), a + shift)


def test_mp_silu_has_unit_magnitude_on_standard_normal():
    z = torch.randn(1_000_000)
    assert mp_silu(z).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=TOL)


@LINEARS
@pytest.mark.parametrize("normalize_on_use,forced", [(True, False), (True, True), (False, True)])
def test_mp_linear_keeps_magnitude(normalize_on_use, forced, linear):
    layer = linear(512, 384, normalize_on_use=normalize_on_use, forced=forced).train()
    x = torch.randn(2048, 512)
    assert magnitude(layer(x)).item() == pytest.approx(1.0, abs=TOL)
    # effective rows have unit norm whatever the stored scale
    with torch.no_grad():
        layer.weight.mul_(5.0)
    layer._projected_version = layer.weight._version  # pretend it was projected: only on-use WN acts
    if normalize_on_use:
        rows = layer.effective_weight().norm(dim=1)
        assert torch.allclose(rows, torch.ones(384), atol=1e-3)


@LINEARS
def test_mp_linear_gain_zero_gives_zero_output(linear):
    layer = linear(32, 16, gain=0.0)
    assert torch.count_nonzero(layer(torch.randn(4, 32))) == 0


def test_mp_embedding_rows_have_unit_magnitude():
    table = MPEmbedding(11, 128)
    with torch.no_grad():
        table.weight.mul_(torch.rand(11, 1) * 10)
    out = table(torch.arange(11))
    assert torch.allclose(out.pow(2).mean(dim=1).sqrt(), torch.ones(11), atol=1e-4)


def test_cosine_attention_logits_bounded_by_sqrt_head_dim():
    n, h, t, d = 2, 3, 17, 32
    q, k = torch.randn(n, h, t, d) * 50, torch.randn(n, h, t, d) * 50
    qn, kn = normalize(q), normalize(k)
    logits = qn @ kn.transpose(-1, -2) / math.sqrt(d)
    assert logits.abs().max().item() <= math.sqrt(d) + 1e-4
    # cosine_attention is SDPA over exactly these logits
    v = torch.randn(n, h, t, d)
    expected = torch.softmax(logits, dim=-1) @ v
    assert torch.allclose(cosine_attention(q, k, v), expected, atol=1e-5)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotation_keeps_every_token_norm(pairing):
    x = torch.randn(5, 9, 64, dtype=torch.float64)
    theta = torch.randn(5, 1, 32, dtype=torch.float64) * 3
    y = rotate_pairs(x, theta, pairing)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)
    assert not torch.allclose(y, x)
    assert torch.equal(rotate_pairs(x, torch.zeros_like(theta), pairing), x)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_scaled_rotation_matches_chunk_and_concatenate(pairing):
    """modulate's scale-then-rotate against the textbook formula (chunk or stride, rotate, concatenate):
    values and gradients (this held the deleted fused scale-rotation to the same formula)."""
    x = torch.randn(3, 7, 16, requires_grad=True)
    theta = torch.randn(3, 1, 8, requires_grad=True)
    scale = torch.randn(3, 1, 16, requires_grad=True)
    x2, theta2, scale2 = (v.detach().clone().requires_grad_() for v in (x, theta, scale))

    def reference(x, theta, scale):  # the textbook formula
        h = x * scale
        if pairing == "half":
            a, b = h.chunk(2, dim=-1)
        else:
            a, b = h[..., 0::2], h[..., 1::2]
        c, s = torch.cos(theta), torch.sin(theta)
        ra, rb = a * c - b * s, a * s + b * c
        return torch.cat((ra, rb), -1) if pairing == "half" else torch.stack((ra, rb), -1).flatten(-2)

    out, ref = modulate(x, scale=scale - 1, angle=theta, pairing=pairing), reference(x2, theta2, scale2)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((x, x2), (theta, theta2), (scale, scale2)):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(rotate_pairs(x, theta, pairing), reference(x, theta, torch.ones(16)), atol=1e-6)
    d = torch.float64
    args = (torch.randn(2, 3, 8, dtype=d, requires_grad=True), torch.randn(2, 1, 4, dtype=d, requires_grad=True),
            torch.randn(2, 1, 8, dtype=d, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, th, k: modulate(x, k, k, th, pairing), args)


def test_rotation_pairings_differ_by_a_channel_permutation():
    x = torch.randn(4, 8)
    theta = torch.randn(4, 4)
    half = rotate_pairs(x, theta, "half")
    # interleave the halves: channel i <-> position 2i, channel i+D/2 <-> 2i+1
    perm = torch.stack((torch.arange(4), torch.arange(4) + 4), dim=1).flatten()
    inter = rotate_pairs(x[:, perm], theta, "interleaved")
    assert torch.allclose(inter, half[:, perm], atol=1e-6)


def test_mp_positional_encoding_has_unit_rms_tokens():
    raw = sincos_pos_embed_2d(64, 6, 6)
    half = torch.full((36,), 1 / math.sqrt(2), dtype=torch.float64)
    assert torch.allclose(raw.pow(2).mean(dim=1).sqrt(), half, atol=1e-9)
    mp = mp_sincos_pos_embed_2d(64, 6, 6)
    assert torch.allclose(mp, raw * math.sqrt(2), atol=1e-3)


def _train_rows(linear, forced: bool, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    layer = linear(64, 32, normalize_on_use=True, forced=forced).train()
    layer.project_()  # both runs start on the sphere (rows of norm sqrt(64), up to normalize's eps)
    start = layer.weight.detach().norm(dim=1).clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):  # noisy gradients, as in real training
        x, target = torch.randn(16, 64), torch.randn(16, 32)
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer(x)  # the next training forward projects (forced WN happens before use)
    return start, layer.weight.detach().norm(dim=1)


@LINEARS
def test_forced_weight_normalisation_keeps_rows_on_the_sphere(linear):
    start, rows = _train_rows(linear, forced=True)
    # normalize() divides by (rms + 1e-4), so rows sit at sqrt(64) / (1 + 1e-4)
    assert torch.allclose(rows, torch.full_like(rows, math.sqrt(64)), rtol=2e-4)
    assert rows.max() <= start.max() * (1 + 1e-6)


@LINEARS
def test_without_forced_normalisation_weights_grow(linear):
    start, rows = _train_rows(linear, forced=False)
    # on-use WN makes the gradient (nearly) tangent to the sphere, so steps push ||W|| outward on average
    assert rows.mean() > start.mean() * 1.01  # measured: +1.5 % after 300 steps


@LINEARS
def test_batched_projection_equals_per_layer_projection(linear):
    torch.manual_seed(3)
    layers = torch.nn.ModuleList([linear(48, 24), linear(24, 96, gain=0.5), MPEmbedding(7, 24),
                                  linear(8, 8, forced=False)])
    for layer in layers:
        with torch.no_grad():
            layer.weight.mul_(torch.rand(layer.weight.shape[0], 1) * 4)
    clone = [layer.weight.detach().clone() for layer in layers]
    assert project_mp_weights_(layers) == 3
    for layer, before in zip(layers, clone):
        expected = normalize(before) if layer.forced else before
        assert torch.allclose(layer.weight, expected, atol=1e-6)
        if layer.forced:
            assert layer._projected_version == layer.weight._version  # forward will not project again


def test_eval_cache_is_invalidated_when_weights_change():
    layer = FusedMPLinear(16, 8, gain=1.0).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # served from the cache
        layer.weight.add_(torch.randn_like(layer.weight))
        second = layer(x)
        assert not torch.allclose(second, first)
        layer.gain.fill_(2.0)
        assert torch.allclose(layer(x), 2 * second, atol=1e-5)
        assert torch.allclose(layer(x), x @ layer.effective_weight().T, atol=1e-6)
