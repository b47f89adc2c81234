"""Ready for the first GPU: every preset trains under bf16 autocast, and `mapdit train --compile` computes what
the eager loop computes.

Run on the CPU (CPU autocast to bfloat16, Inductor on the CPU), so that a GPU session starts from a loop whose
mixed-precision and compiled paths are already known to agree with fp32 eager. bf16 keeps 8 significant
bits (relative rounding 2^-9 ~ 2e-3 per operator). Measured on DiT-XXS/4, batch 4, weights moved off their
init (2026-12-05, after 735ce4f): bf16 against fp32 differs by <= 2.3e-4 in the loss and <= 5.1e-3 in the
gradient (relative norm), the fast paths against the plain formulas under autocast by <= 1.7e-5 and
<= 1.9e-3; the tolerances below (5e-3, 3e-2) leave a margin of 6 or more over that, and a wrong formula (a
dropped term, a gradient scaled by the wrong factor or cast the wrong way) moves losses and gradients by
far more.
"""
from __future__ import annotations

import pytest
import torch

from helpers import RUN, needs_fmnist, read_metrics, tiny_model, tiny_train
from mapdit.config import PRESETS
from mapdit.diffusion import make_diffusion
from mapdit.ema import PowerEMA
from mapdit.fused import reference_math
from mapdit.model import DiT
from mapdit.runio import list_checkpoints, load_tensors
from mapdit.step import Batch, train_step
from mapdit.train import train

# every preset of the ablation ladder, and Config E with the paper's scale+rotate modulation
CASES = [("A", "adaln"), ("B", "adaln"), ("C", "adaln"), ("D", "adaln"), ("E", "adaln"), ("E", "scale+rotate")]
IDS = [f"{p}-{m}" for p, m in CASES]
BATCH, STEPS = 4, 3

# bf16 against fp32 (relative): the loss of each of the 3 steps, and each gradient / the whole gradient
LOSS_RTOL = 5e-3
GRAD_RTOL = 3e-2
# --compile against eager (relative loss per step; parameters after 3 steps, absolute)
COMPILE_LOSS_RTOL = 1e-4
COMPILE_PARAM_ATOL = 1e-5  # measured: 2.4e-7 (Config E scale+rotate, 3 steps)


def _model(preset: str, modulation: str, perturb: bool = True) -> DiT:
    """DiT-XXS/4 on 28x28x1; `perturb`: every trainable tensor moved off its (often zero) init, so that the
    output depends on every layer from the first step on and bf16 rounding reaches the loss."""
    torch.manual_seed(0)
    model = DiT(tiny_model(preset, modulation=modulation)).train()
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(step: int) -> Batch:
    """A fixed batch of `step`: random 28x28x1 images, labels, timesteps and noise."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    return Batch(x, y, t, torch.randn(x.shape, generator=g))


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _loss_and_grads(model: DiT, autocast: bool) -> tuple[float, list[torch.Tensor]]:
    """The training loss (IDDPM: eps-MSE + variational bound) of one batch and the gradient of every
    trainable tensor, after the loop's weight projection."""
    diffusion = make_diffusion(model.config.num_train_steps, learn_sigma=model.config.learn_sigma)
    b = _batch(0)
    model.zero_grad(set_to_none=True)
    model.project_weights_()
    with _bf16() if autocast else torch.autocast("cpu", enabled=False):
        loss = diffusion.training_losses(model, b.x, b.t, b.y, noise=b.noise)["loss"].mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------
# bf16 autocast
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,modulation", CASES, ids=IDS)
def test_bf16_gradients_match_fp32(preset, modulation):
    """Loss and gradients of one step under bf16 autocast against fp32: the loss within LOSS_RTOL, the whole
    gradient within GRAD_RTOL (relative norm of the difference); every gradient finite and fp32, as the
    parameters are; and autocast really ran the matmuls in bf16."""
    model = _model(preset, modulation)
    loss32, grads32 = _loss_and_grads(model, autocast=False)

    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(getattr(out, "dtype", None)))
             for m in model.modules()]
    try:
        loss16, grads16 = _loss_and_grads(model, autocast=True)
    finally:
        for h in hooks:
            h.remove()
    assert torch.bfloat16 in seen, f"no layer gave a bf16 output under autocast: {seen}"
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads16)
    assert loss16 != loss32  # bf16 rounding reached the loss: the comparison below is not vacuous
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    flat16, flat32 = torch.cat([g.flatten() for g in grads16]), torch.cat([g.flatten() for g in grads32])
    assert _rel(flat16, flat32) <= GRAD_RTOL, _rel(flat16, flat32)


@pytest.mark.parametrize("preset,modulation", CASES, ids=IDS)
def test_fast_paths_under_autocast_match_plain_formulas(preset, modulation):
    """The custom autograd Functions of fused.py under bf16 autocast against the plain formulas of nn.py
    (`reference_math()`), also under autocast: mixed fp32/bf16 inputs give the same loss and the same
    gradients to bf16 rounding (GRAD_RTOL for the whole gradient and for each tensor carrying at least 1e-3
    of its norm), each in its parameter's dtype."""
    model = _model(preset, modulation)
    loss_fast, grads_fast = _loss_and_grads(model, autocast=True)
    with reference_math():
        loss_ref, grads_ref = _loss_and_grads(model, autocast=True)
    assert abs(loss_fast - loss_ref) <= LOSS_RTOL * abs(loss_ref), (loss_fast, loss_ref)
    total = torch.cat([g.flatten() for g in grads_ref]).norm()
    assert _rel(torch.cat([g.flatten() for g in grads_fast]), torch.cat([g.flatten() for g in grads_ref])) <= GRAD_RTOL
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads_fast, grads_ref):
        assert a.dtype == b.dtype == torch.float32, name
        if b.norm() >= 1e-3 * total:  # a scalar gain's gradient is one long sum, where bf16 cancels: 5x looser
            assert _rel(a, b) <= (GRAD_RTOL if b.numel() > 1 else 5 * GRAD_RTOL), (name, _rel(a, b))


@pytest.mark.parametrize("preset,modulation", CASES, ids=IDS)
def test_bf16_training_steps_track_fp32(preset, modulation):
    """Three of the loop's own training steps (`train_step`: projection, loss, backward, fused Adam, power
    EMA) from the real (zero-gated) init under bf16 autocast and in fp32: every step's loss within LOSS_RTOL
    and its gradient norm within GRAD_RTOL; the weights stay fp32 and finite."""
    stats = {}
    for precision in ("fp32", "bf16"):
        model = _model(preset, modulation, perturb=False)
        named = model.trainable_parameters()
        params = [p for _, p in named]
        wn = model.config.weight_normalization or model.config.forced_weight_normalization
        opt = torch.optim.Adam(params, lr=1e-2 if wn else 1e-4, betas=(0.9, 0.99), fused=True)
        ema = PowerEMA(dict(named), sigma_rels=(0.05, 0.10))
        diffusion = make_diffusion(model.config.num_train_steps, learn_sigma=model.config.learn_sigma)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        rows = []
        for step in range(1, STEPS + 1):
            result = train_step(model, model, diffusion, opt, ema, params, _batch(step), step,
                                autocast=autocast)
            assert bool(result.finite), (precision, step)
            rows.append(result.stats.tolist())
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
        stats[precision] = rows
    for step, (r32, r16) in enumerate(zip(stats["fp32"], stats["bf16"]), 1):
        assert abs(r16[0] - r32[0]) <= LOSS_RTOL * abs(r32[0]), (step, r16[0], r32[0])
        assert abs(r16[3] - r32[3]) <= GRAD_RTOL * abs(r32[3]), (step, r16[3], r32[3])


# ------------------------------------------------------------------------------------------------
# The training loop: --precision bf16 and --compile against fp32 eager
# ------------------------------------------------------------------------------------------------
def _run(tmp_path, name: str, preset: str, modulation: str, **kw):
    """`mapdit train` in-process: DiT-XXS/4, batch 4, 3 steps, a row of metrics.csv per step; returns the
    losses per step and the model weights of the last checkpoint."""
    tc = tiny_train(tmp_path / name, num_steps=STEPS, batch_size=BATCH, log_every=1, ckpt_every=STEPS,
                    ema_snapshots=0, **kw)
    run = train(tc, tiny_model(preset, modulation=modulation), progress=False)
    assert run.name == RUN
    losses = [float(r["loss"]) for r in read_metrics(run)]
    step, path = list_checkpoints(run)[-1]
    assert step == STEPS and len(losses) == STEPS
    return losses, {k: v for k, v in load_tensors(path).items() if k.startswith("model.")}


@needs_fmnist
@pytest.mark.parametrize("preset,modulation", [("A", "adaln"), ("E", "scale+rotate")], ids=["A", "E-scale+rotate"])
def test_train_precision_bf16_tracks_fp32(tmp_path, preset, modulation):
    """`mapdit train --precision bf16` against fp32 on the same data: losses within LOSS_RTOL per step, the
    checkpointed weights fp32 and finite."""
    losses32, _ = _run(tmp_path, "fp32", preset, modulation)
    losses16, weights = _run(tmp_path, "bf16", preset, modulation, precision="bf16")
    assert all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in zip(losses16, losses32)), (losses16, losses32)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
@needs_fmnist
def test_compiled_training_equals_eager(tmp_path):
    """`mapdit train --compile` (Inductor on the CPU, whatever the loop compiles) against the eager loop:
    every step's loss within COMPILE_LOSS_RTOL and the checkpointed weights after 3 Adam steps within
    COMPILE_PARAM_ATOL (Adam's first steps move each weight by ~lr = 1e-2 whatever its gradient's size, so
    a wrong gradient shows at this tolerance, while Inductor's fp32 reordering stays ~40x below it). Config E with
    scale+rotate, the preset with the most fast paths; the compile takes ~25-50 s on two CPU cores."""
    preset, modulation = "E", "scale+rotate"
    torch._dynamo.reset()
    try:
        losses_c, weights_c = _run(tmp_path, "compiled", preset, modulation, compile=True)
    finally:
        torch._dynamo.reset()
    losses_e, weights_e = _run(tmp_path, "eager", preset, modulation)
    assert all(abs(a - b) <= COMPILE_LOSS_RTOL * abs(b) for a, b in zip(losses_c, losses_e)), (losses_c, losses_e)
    assert weights_c.keys() == weights_e.keys()
    worst = max((weights_c[k] - weights_e[k]).abs().max().item() for k in weights_e)
    assert worst <= COMPILE_PARAM_ATOL, worst


def test_case_list_covers_every_preset():
    assert {p for p, _ in CASES} == set(PRESETS)
