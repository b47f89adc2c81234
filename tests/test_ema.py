"""Power-function EMA: closed forms, tracking, snapshots, post-hoc reconstruction."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.integrate import quad

import mapdit.ema as ema_mod
from helpers import cli, error_line, needs_fmnist, only_error_line
from mapdit.ema import (
    DEFAULT_SNAPSHOT_DTYPE,
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    parse_sweep,
    profile_inner,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
    solve_posthoc,
)
from mapdit.errors import UserError

FP16_HALF_ULP = 2.0**-11  # relative rounding of a normal float16
FP16_SUB_HALF_ULP = 2.0**-25  # absolute rounding of a subnormal float16


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors on a shared 2-core box: intra-op threads only spin against each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_fsync(monkeypatch):
    # Durability is not under test here and fsync on a shared disk costs ~10 ms a file.
    monkeypatch.setattr(ema_mod.os, "fsync", lambda fd: None)


def _walk(n_steps, shapes, drift, seed=0):
    """Random-walk 'model' parameters of realistic O(1) scale: yields (t, {name: tensor}) for t = 1..n."""
    gen = torch.Generator().manual_seed(seed)
    theta = {f"p{i}": torch.randn(s, generator=gen, dtype=torch.float64) for i, s in enumerate(shapes)}
    for t in range(1, n_steps + 1):
        for v in theta.values():
            v.add_(torch.randn(v.shape, generator=gen, dtype=torch.float64), alpha=drift)
        yield t, theta


# ---------------------------------------------------------------------------------------------
# closed forms


def test_sigma_gamma_conversions():
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    assert sigma_rel_to_gamma(0.0075) == pytest.approx(130.33, abs=0.01)
    assert sigma_rel_to_gamma(0.15) == pytest.approx(3.558, abs=0.001)
    for s in [0.001, 0.01, 0.05, 0.07, 0.1, 0.2, 0.28, 0.3]:
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    for g in [-0.3, 0.0, 1.0, 6.94, 100.0, 1e4]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-8)
    # the inverse picks the larger of the two γ with the same width
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(-0.9)) > -0.382
    for bad in [0.0, -0.05, 0.31]:
        with pytest.raises(UserError):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize(
    "t_a,g_a,t_b,g_b", [(100, 16.97, 100, 6.94), (60, 6.94, 100, 16.97), (100, 16.97, 37, 3.5), (5, 0.0, 9, -0.3)]
)
def test_profile_inner_matches_quadrature(t_a, g_a, t_b, g_b):
    def p(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1)

    m = min(t_a, t_b)
    # split at 0.9m: the integrand is sharp near the end for large γ
    num = sum(quad(lambda s: p(s, t_a, g_a) * p(s, t_b, g_b), lo, hi, epsabs=0, epsrel=1e-12)[0]
              for lo, hi in [(0, 0.9 * m), (0.9 * m, m)])
    got = profile_inner(t_a, g_a, t_b, g_b)
    assert got.dtype == np.float64
    assert float(got) == pytest.approx(num, rel=1e-8)
    assert float(profile_inner(t_b, g_b, t_a, g_a)) == pytest.approx(num, rel=1e-12)  # symmetric
    assert profile_inner(np.array([[t_a], [t_b]]), g_a, np.array([t_a, t_b, 3.0]), g_b).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# tracking


def test_tracked_ema_is_the_power_profile_average():
    """Unrolled, step k's weight is ∫_{k-1}^k p_t, so ema_t = Σ θ(k)∫_{k-1}^k p_t exactly and
    |ema_t - ∫ p_t θ| ≤ Σ∫_{k-1}^k p_t |θ(k) - θ(τ)| ≤ sup|θ'| (one step of drift) — O(1/t) relative."""
    T = 2000

    def theta(tau):
        return math.sin(tau / 150.0) + tau / T

    lipschitz = 1 / 150.0 + 1 / T
    e = PowerEMA([torch.zeros(1, dtype=torch.float64)], sigma_rels=(0.05, 0.10), dtype=torch.float64)
    seen = {}
    for t in range(1, T + 1):
        e.update([torch.tensor([theta(t)], dtype=torch.float64)], t)
        if t in (20, 300, T):
            seen[t] = {s: float(e.averaged(s)["0"]) for s in (0.05, 0.10)}
    thetas = np.array([theta(k) for k in range(1, T + 1)])
    for t, by_width in seen.items():
        for s, got in by_width.items():
            g = sigma_rel_to_gamma(s)
            k = np.arange(1, t + 1, dtype=np.float64)
            w = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
            assert got == pytest.approx(float(w @ thetas[:t]), abs=1e-12)  # the exact identity
            integral = quad(lambda u: (g + 1) * u**g / t ** (g + 1) * theta(u), 0, t, limit=400)[0]
            assert abs(got - integral) <= lipschitz
    # the tolerance is far below what separates the two widths, so a wrong β cannot sneak through
    assert abs(seen[T][0.05] - seen[T][0.10]) > 20 * lipschitz


def test_update_rule_by_hand():
    # γ = 1 (σ_rel = sqrt(1/18)): β_2 = (1/2)² = 1/4, β_3 = (2/3)² = 4/9.
    # θ = 1, 3, -2  ->  ema = 1;  1/4·1 + 3/4·3 = 2.5;  4/9·2.5 + 5/9·(-2) = 0.
    s = gamma_to_sigma_rel(1.0)
    e = PowerEMA({"w": torch.full((2,), 7.0, dtype=torch.float64)}, sigma_rels=(s, 0.10), dtype=torch.float64)
    got = []
    for t, v in enumerate([1.0, 3.0, -2.0], start=1):
        e.update({"w": torch.full((2,), v, dtype=torch.float64)}, t)
        got.append(e.averaged(s)["w"][0].item())
    assert got[0] == 1.0  # β_1 = 0: the first update copies θ, whatever the EMA held before
    assert got[1] == pytest.approx(2.5, abs=1e-14)
    assert got[2] == pytest.approx(0.0, abs=1e-14)
    # σ_rel = 0.10, γ = 6.9372: β_2 = 0.5^7.9372 = 0.0040876, β_3 = (2/3)^7.9372 = 0.040026
    b2, b3 = 0.0040876, 0.040026
    want = b3 * (b2 * 1 + (1 - b2) * 3) + (1 - b3) * -2
    assert e.averaged(0.10)["w"][0].item() == pytest.approx(want, rel=1e-4)


def test_constant_params_and_bookkeeping():
    p = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    e = PowerEMA(p, sigma_rels=(0.05, 0.10))
    for t in range(1, 50):
        e.update(p, t)
    for s in (0.05, 0.10):
        for n in p:
            assert torch.equal(e.averaged(s)[n], p[n])
    with pytest.raises(ValueError):
        e.update(p, 49)  # time must move forward
    with pytest.raises(UserError):
        e.averaged(0.07)  # not tracked
    with pytest.raises(UserError):
        PowerEMA(p, sigma_rels=(0.05, 0.0501))  # same key "0.050"


def test_named_parameters_and_state_dict_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    e = PowerEMA(model.named_parameters())
    assert e.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for t in range(1, 6):
        with torch.no_grad():
            for q in model.parameters():
                q.add_(0.1)
        e.update(model.named_parameters(), t)
    sd = e.state_dict()
    assert "0.050/0.weight" in sd and "0.100/1.bias" in sd
    save_file(sd, tmp_path / "ema.safetensors")  # flat and safetensors-compatible

    e2 = PowerEMA(model.named_parameters())
    e2.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    assert e2.step == 5
    # a dict in another order is matched by name
    e.update(dict(reversed(list(model.named_parameters()))), 6)
    e2.update(model.parameters(), 6)
    for n in e.names:
        assert torch.equal(e.averaged(0.05)[n], e2.averaged(0.05)[n])
    with pytest.raises(UserError):
        PowerEMA(model.named_parameters(), sigma_rels=(0.05, 0.07)).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# snapshots and reconstruction


def test_save_snapshot_layout_metadata_and_atomicity(tmp_path, monkeypatch):
    t = {"w": torch.randn(3, 4), "steps": torch.arange(3)}
    path = save_snapshot(tmp_path, 0.05, 1234, t)
    assert path == tmp_path / "sigma-0.050" / "step-0001234.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("w").dtype == DEFAULT_SNAPSHOT_DTYPE
        assert torch.equal(f.get_tensor("steps"), t["steps"])  # integers are left alone
    assert meta["step"] == "1234" and float(meta["sigma_rel"]) == 0.05
    assert float(meta["gamma"]) == pytest.approx(16.972, abs=1e-3)
    assert meta["dtype"] == str(DEFAULT_SNAPSHOT_DTYPE).removeprefix("torch.")
    [info] = list_snapshots(tmp_path)
    assert (info.path, info.sigma_rel, info.step) == (path, 0.05, 1234)

    # a crash mid-write leaves the previous file intact and no temp file behind
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ema_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(tmp_path, 0.05, 1234, {"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    with pytest.raises(ValueError):  # would round to inf in float16
        save_snapshot(tmp_path, 0.05, 1, {"w": torch.tensor([1e5])}, dtype=torch.float16)


def _run_and_snapshot(directory, sigma_rels, snap_every, n_steps, shapes, drift, dtype=DEFAULT_SNAPSHOT_DTYPE):
    """Track float64 EMAs of a random walk; snapshot 0.05 and 0.10 every snap_every steps."""
    trajectory = []
    e = None
    for t, theta in _walk(n_steps, shapes, drift):
        if e is None:
            e = PowerEMA(theta, sigma_rels=sigma_rels, dtype=torch.float64)
        e.update(theta, t)
        trajectory.append(torch.cat([v.reshape(-1) for v in theta.values()]).clone())
        if t % snap_every == 0:
            for s in (0.05, 0.10):
                save_snapshot(directory, s, t, e.averaged(s), dtype=dtype)
    return e, torch.stack(trajectory)


def _flat(d):
    return torch.cat([d[k].reshape(-1).double() for k in sorted(d)])


def test_reconstruct_tracked_width(tmp_path, no_fsync):
    e, traj = _run_and_snapshot(tmp_path, (0.05, 0.10), 50, 1000, [(40, 50), (300,)], drift=0.01)
    rec, sol = reconstruct(tmp_path, 0.05, progress=True)
    assert rec["p0"].dtype == torch.float32 and rec["p0"].shape == (40, 50)
    want = _flat(e.averaged(0.05))
    # coefficients are one-hot on the last 0.05 snapshot, so the only error is float16 rounding
    one_hot = np.zeros(40)
    one_hot[[s.step == 1000 and s.sigma_rel == 0.05 for s in list_snapshots(tmp_path)].index(True)] = 1
    np.testing.assert_allclose(sol.coeffs, one_hot, atol=1e-8)
    assert sol.profile_rel_error < 1e-6
    tol = FP16_HALF_ULP * want.abs() + FP16_SUB_HALF_ULP + 1e-6
    assert torch.all((_flat(rec) - want).abs() <= tol)
    rec_last, _ = reconstruct(tmp_path, 0.05, step=1000)
    assert torch.equal(_flat(rec_last), _flat(rec))


def test_reconstruct_untracked_width(tmp_path, no_fsync):
    """0.07 from 0.05/0.10 snapshots vs an EMA tracked directly with 0.07.

    The tracked EMA is exactly ∫ p_r θ̃ for the piecewise-constant θ̃, and the reconstruction is
    ∫ p̂ θ̃ with p̂ = Σ x_i p_i, so for any constant c (per parameter), by Cauchy–Schwarz:
        |rec - ema| ≤ ||p̂ - p_r||·||θ̃ - c|| + |c|·|Σx - 1| + Σ|x_i|·(fp16 rounding of snapshot i).
    With c = the time-mean of θ, ||θ̃ - c|| is the spread of the trajectory itself.
    """
    T = 1000
    e, traj = _run_and_snapshot(tmp_path, (0.05, 0.07, 0.10), 50, T, [(60, 50)], drift=0.01)
    rec, sol = reconstruct(tmp_path, 0.07)
    want = _flat(e.averaged(0.07))
    g = sigma_rel_to_gamma(0.07)
    c = traj.mean(0)
    spread_l2 = (traj - c).pow(2).sum(0).sqrt()  # ||θ̃ - c||_L2[0,T], unit-length steps
    fit = sol.profile_rel_error * math.sqrt(float(profile_inner(T, g, T, g))) * spread_l2
    mass = c.abs() * abs(sol.coeffs.sum() - 1)
    quant = np.abs(sol.coeffs).sum() * (FP16_HALF_ULP * traj.abs().amax(0) + FP16_SUB_HALF_ULP)
    err = (_flat(rec) - want).abs()
    assert torch.all(err <= fit + mass + quant + 1e-6)
    # and in the aggregate the error is a small fraction of what distinguishes neighbouring widths
    width_gap = (_flat(e.averaged(0.05)) - _flat(e.averaged(0.10))).pow(2).mean().sqrt()
    assert err.pow(2).mean().sqrt() < 0.02 * width_gap
    assert 1 < sol.condition_number < 1e6


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from mapdit.ema import reconstruct
    def kb(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
    directory, step = sys.argv[1], int(sys.argv[2])
    reconstruct(directory, 0.05, step=10)  # warm up imports and lazy initialisation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    base = kb("VmRSS")
    out, _ = reconstruct(directory, 0.05, step=step)
    print(kb("VmHWM") - base)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_reconstruct_memory_is_flat_in_snapshot_count(tmp_path, no_fsync):
    # 2 MB of float32 parameters; float16 snapshots of 0.05/0.10 every 10 steps up to 1000 = 200 files.
    gen = torch.Generator().manual_seed(0)
    tensors = {f"l{i}.w": torch.randn(256, 512, generator=gen) for i in range(4)}
    for t in range(10, 1001, 10):
        for s in (0.05, 0.10):
            save_snapshot(tmp_path, s, t, tensors, dtype=torch.float16)
    # Fresh process per count, fixed mmap threshold: freed buffers go back to the OS at once, so
    # VmHWM measures live bytes (tracemalloc does not see torch's allocator).
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")

    def peak_kb(step):
        r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(step)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    p20, p200 = peak_kb(100), peak_kb(1000)
    # holding every snapshot would add 200 x 1 MB; streaming holds float64 accumulators (4 MB)
    assert p200 < 1.5 * p20, (p20, p200)
    assert p200 < 32 * 1024


def test_refusals_and_snapshot_selection(tmp_path, no_fsync):
    with pytest.raises(UserError, match="no EMA snapshots"):
        reconstruct(tmp_path, 0.05)
    with pytest.raises(UserError, match="no EMA snapshots"):
        reconstruct(tmp_path / "missing", 0.05)
    with pytest.raises(UserError):
        solve_posthoc([], [], 10, 5.0)

    _run_and_snapshot(tmp_path, (0.05, 0.10), 50, 1000, [(10,)], drift=0.01)
    with pytest.raises(UserError, match="outside"):
        reconstruct(tmp_path, 0.05, step=40)  # before the first snapshot
    with pytest.raises(UserError, match="outside"):
        reconstruct(tmp_path, 0.05, step=1001)  # after the last
    for too_wide_or_narrow in (0.3, 0.001):
        with pytest.raises(UserError, match=r"expressible: about 0\.0\d\d\.\.0\.2\d\d"):
            reconstruct(tmp_path, too_wide_or_narrow)
    rec, sol = reconstruct(tmp_path, 0.2)  # inside the range the message advertises
    assert sol.profile_rel_error < 0.05

    # snapshots after the target step are never read: poison them
    for s in (0.05, 0.10):
        save_snapshot(tmp_path, s, 1050, {"p0": torch.full((10,), float("nan"))})
    rec, sol = reconstruct(tmp_path, 0.07, step=1000)
    assert len(sol.coeffs) == 40 and torch.isfinite(rec["p0"]).all()


def test_parse_sweep():
    assert parse_sweep("0.03:0.15:0.01") == [round(0.03 + 0.01 * i, 2) for i in range(13)]
    assert parse_sweep("0.05") == [0.05]
    assert parse_sweep("0.05, 0.1") == [0.05, 0.1]
    assert parse_sweep("0.01:0.02:0.003") == [0.01, 0.013, 0.016, 0.019]
    assert parse_sweep("0.02,0.05:0.07:0.01") == [0.02, 0.05, 0.06, 0.07]
    for bad in ["", "abc", "0.1:0.05:0.01", "0.05:0.1:0", "0.5", "0.05:0.1"]:
        with pytest.raises(UserError):
            parse_sweep(bad)


def test_non_finite_and_foreign_snapshots_are_named(tmp_path, no_fsync):
    from mapdit.ema import RUN_ID_FILE, snapshot_run_id

    _run_and_snapshot(tmp_path, (0.05, 0.10), 50, 200, [(10,)], drift=0.01)
    own = snapshot_run_id(tmp_path)
    assert own and {s.run_id for s in list_snapshots(tmp_path)} == {own}
    # one NaN in one snapshot: named, not averaged into every width
    bad = save_snapshot(tmp_path, 0.10, 150, {"p0": torch.full((10,), float("nan"))})
    with pytest.raises(UserError, match=f"{bad}.*non-finite"):
        reconstruct(tmp_path, 0.07)
    # a snapshot of another run (its own run-id) under this folder's names: named, not mixed in
    other = tmp_path / "other"
    save_snapshot(other, 0.10, 150, {"p0": torch.zeros(10)})
    os.replace(other / "sigma-0.100" / "step-0000150.safetensors", bad)
    assert snapshot_run_id(other) != own
    with pytest.raises(UserError, match=f"{bad}.*another run"):
        reconstruct(tmp_path, 0.07)
    # without identities (snapshots written before they carried one) nothing is refused
    (tmp_path / RUN_ID_FILE).unlink()
    for info in list_snapshots(tmp_path):
        with safe_open(info.path, framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != "run_id"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        ema_mod.save_file(tensors, str(info.path), metadata=meta)
    rec, _ = reconstruct(tmp_path, 0.07)
    assert torch.isfinite(rec["p0"]).all()


@needs_fmnist
def test_ema_width_the_snapshots_cannot_express(tiny_run, capsys):
    assert cli("ema", "--result-dir", tiny_run, "--std", 0.25) == 2
    assert "is not expressible from the snapshots" in only_error_line(capsys, "ema")
    assert cli("sample", "--result-dir", tiny_run, "--ema-std", 0.25, "--steps", 2) == 2
    assert "is not expressible from the snapshots" in error_line(capsys, "sample")


@needs_fmnist
def test_posthoc_width_is_at_the_checkpoints_step_when_snapshots_go_further(run_copy):
    # a run killed after its step-4 snapshots but before checkpoint 4: sampling at 0.07 without --ckpt used the
    # step-4 reconstruction while the grid, the fid settings and their tag said step 2 (the newest checkpoint)
    from mapdit.weights import load_model
    for f in run_copy.glob("checkpoints/step-0000004.*"):
        f.unlink()
    info: dict = {}
    model, _, desc = load_model(run_copy, ema_std=0.07, log=lambda m: None, info=info)
    named, _, _ = load_model(run_copy, ema_std=0.07, ckpt="2", log=lambda m: None)
    assert info["step"] == 2 and desc == "post-hoc EMA sigma_rel=0.07 at step 2"
    for a, b in zip(model.state_dict().values(), named.state_dict().values()):
        assert torch.equal(a, b)  # the same weights as --ckpt 2 names
