"""Training end to end: loss goes down, exact resume (also after kill -9 at random moments), torchrun equivalence
and a failing rank ending the job, the seed commands."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import (
    ENV,
    RUN,
    TINY_ARGS,
    assert_same_tensors,
    free_port,
    needs_fmnist,
    read_metrics,
    snapshot_files,
    steps_in_metrics,
    tiny_model,
    train_cmd,
    wait_for,
)
from mapdit.errors import UserError
from mapdit.runio import list_checkpoints, load_tensors, split_prefix
from mapdit.train import TrainConfig, long_run_line, lr_multiplier, train

REPO = Path(__file__).resolve().parents[1]


def tiny_train(tmp_path, **kw) -> TrainConfig:
    """helpers.tiny_train at six steps: checkpoints at 3 and 6, EMA snapshots at 2, 4, 6."""
    return helpers.tiny_train(tmp_path, **{"num_steps": 6, "ema_snapshots": 3, "ckpt_every": 3, **kw})


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    step, path = list_checkpoints(run_dir)[-1]
    return load_tensors(path)


def test_lr_schedule_warmup_then_inverse_sqrt():
    assert lr_multiplier(0, warmup=4, decay_start=10) == pytest.approx(0.25)
    assert lr_multiplier(3, warmup=4, decay_start=10) == 1.0
    assert lr_multiplier(9, warmup=4, decay_start=10) == 1.0
    assert lr_multiplier(40, warmup=4, decay_start=10) == pytest.approx(0.5)


@needs_fmnist
def test_run_folder_contents(tmp_path):
    run = train(tiny_train(tmp_path), tiny_model())
    assert run.name == "000-DiT-XXS-4"
    assert {p.name for p in run.iterdir()} >= {"config.json", "log.txt", "metrics.csv", "checkpoints", "ema"}
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) > 0 for r in rows)
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]
    tensors = final_params(run)
    assert any(k.startswith("ema.0.050/") for k in tensors) and any(k.startswith("opt.") for k in tensors)
    snaps = sorted(p.name for p in (run / "ema" / "sigma-0.100").iterdir())
    assert snaps == ["step-0000002.safetensors", "step-0000004.safetensors", "step-0000006.safetensors"]
    # a second run never reuses the folder
    assert train(tiny_train(tmp_path, num_steps=1), tiny_model()).name == "001-DiT-XXS-4"


@needs_fmnist
def test_resume_continues_exactly(tmp_path):
    full = train(tiny_train(tmp_path / "a"), tiny_model())
    part = train(tiny_train(tmp_path / "b", num_steps=3), tiny_model())
    resumed = train(tiny_train(tmp_path / "b", num_steps=6), None, resume=str(part))
    assert resumed == part
    assert_same_tensors(final_params(full), final_params(resumed))
    assert [int(r["step"]) for r in read_metrics(resumed)] == [2, 3, 4, 6]  # stop at 3 logs a row


@needs_fmnist
def test_resume_rejects_mismatched_data(tmp_path):
    from PIL import Image

    run = train(tiny_train(tmp_path, num_steps=2), tiny_model())
    folder = tmp_path / "images"
    for c in range(3):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (40 * i, 80 * c, 30)).save(folder / f"class{c}" / f"{i}.png")
    with pytest.raises(UserError, match="does not match"):
        train(tiny_train(tmp_path, num_steps=4, data_path=str(folder)), None, resume=str(run))


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["A", "E"])
def test_loss_decreases_on_fashion_mnist(tmp_path, preset):
    run = train(tiny_train(tmp_path, num_steps=200, batch_size=32, log_every=20, ckpt_every=200, ema_snapshots=0,
                           lr=1e-3 if preset == "A" else None), tiny_model(preset))
    losses = [float(r["mse"]) for r in read_metrics(run)]
    print(preset, [f"{v:.3f}" for v in losses])
    assert losses[-1] < 0.6 * losses[0]


@needs_fmnist
@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    args = ["--data-path", "fashion-mnist", "--model", "DiT-XXS/4", "--config", "E", "--num-steps", "4",
            "--global-batch-size", "8", "--log-every", "2", "--ema-snapshots", "0", "--ckpt-every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mapdit.cli", "train", "--results-dir", str(tmp_path / "one"), *args],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}", "-m", "mapdit.cli", "train", "--results-dir",
                    str(tmp_path / "two"), *args], check=True, env=env, capture_output=True)
    one = final_params(tmp_path / "one" / "000-DiT-XXS-4")
    two = final_params(tmp_path / "two" / "000-DiT-XXS-4")
    for key in split_prefix(one, "model."):
        torch.testing.assert_close(one[f"model.{key}"], two[f"model.{key}"], rtol=1e-4, atol=1e-5)


@needs_fmnist
@pytest.mark.slow
def test_seed_commands_run_end_to_end(tmp_path):
    results = tmp_path / "R"
    subprocess.run([sys.executable, "train.py", "--data-path", "fashion-mnist", "--results-dir", str(results),
                    "--model", "DiT-XXS/4", "--num-steps", "4", "--global-batch-size", "8", "--use-all-mp",
                    "--ema-snapshots", "2"], check=True, cwd=REPO, capture_output=True)
    run = results / "000-DiT-XXS-4"
    out = subprocess.run([sys.executable, "sample.py", "--result-dir", str(run), "--class-label", "3",
                          "--steps", "5", "--num-samples", "4"], check=True, cwd=REPO, capture_output=True, text=True)
    png = Path(out.stdout.strip().splitlines()[-1])
    assert png.exists() and png.suffix == ".png"
    out = subprocess.run([sys.executable, "sample.py", "--result-dir", str(run), "--num-samples", "10", "--out",
                          str(tmp_path / "s.npz"), "--steps", "3"], check=True, cwd=REPO, capture_output=True,
                         text=True)
    import numpy as np

    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (10, 28, 28, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].shape == (10,) and data["arr_1"].max() < 10


@needs_fmnist
def test_min_snr_gamma_reaches_the_training_step(tmp_path):
    """Same data, noise and seed: the min-SNR-weighted run logs the same first unweighted mse but a smaller
    loss (low-noise samples are down-weighted), and its weights move differently."""
    plain = train(tiny_train(tmp_path / "plain", num_steps=2, log_every=1, ema_snapshots=0), tiny_model())
    snr = train(tiny_train(tmp_path / "snr", num_steps=2, log_every=1, ema_snapshots=0, min_snr_gamma=1.0),
                tiny_model())
    first_plain, first_snr = read_metrics(plain)[0], read_metrics(snr)[0]
    assert float(first_snr["mse"]) == pytest.approx(float(first_plain["mse"]), rel=1e-5)
    assert float(first_snr["loss"]) < float(first_plain["loss"])
    a, b = final_params(plain), final_params(snr)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_long_cpu_runs_are_told_the_cpu_recipe():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    line = long_run_line(157.0, 400_000, cpu)  # plain `mapdit train` on a 2-core CPU, as measured in issue 30
    assert "17,444 hours" in line and "400,000 steps" in line and "mapdit train --recipe fmnist-cpu" in line
    assert long_run_line(0.2, 4000, cpu) is None  # the recipe itself: 13 minutes
    assert long_run_line(157.0, 400_000, cuda) is None


@needs_fmnist
def test_the_estimate_is_one_line_after_the_first_timed_steps(tmp_path, monkeypatch, capsys):
    import mapdit.train

    monkeypatch.setattr(mapdit.train, "LONG_CPU_RUN_S", -1.0)  # any run is "long"
    train(tiny_train(tmp_path, num_steps=4), tiny_model(), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "--recipe fmnist-cpu" in line]
    assert len(lines) == 1 and "1 steps at" in lines[0], lines


def test_time_spent_aside_is_not_training_time(monkeypatch):
    import mapdit.step

    clock = iter([0.0, 1.0, 11.0, 12.0])  # reset, enter aside, leave aside, read: 2 s trained, 10 s aside
    monkeypatch.setattr(mapdit.step.time, "perf_counter", lambda: next(clock))
    window = mapdit.step.ReportWindow(torch.device("cpu"))
    with window.aside():
        pass
    assert window.seconds() == 2.0


@needs_fmnist
@pytest.mark.slow
def test_an_unwritable_statistics_cache_is_said_once_and_training_scores_without_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "not-a-folder").write_text("a file where the cache folder should be")
    monkeypatch.setenv("MAPDIT_CACHE", str(tmp_path / "not-a-folder"))
    run = train(tiny_train(tmp_path, num_steps=4, fid_every=2, fid_samples=2), tiny_model(), progress=False)
    assert [r["fd"] != "" for r in read_metrics(run)] == [True, True]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "statistics cache" in err, err
    assert "warning: the statistics cache" in (run / "log.txt").read_text()  # the run's record says it too


# ------------------------------------------------------------------------------------------------
# crash safety: kill -9 anywhere, resume, same result; one failing rank ends the job
# ------------------------------------------------------------------------------------------------
@needs_fmnist
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    steps = 30
    args = [*TINY_ARGS, "--num-steps", steps, "--log-every", "2", "--ckpt-every", "3", "--ema-snapshots", "10"]
    subprocess.run(train_cmd(*args, "--results-dir", tmp_path / "ref"), check=True, env=ENV,
                   capture_output=True, timeout=300)
    ref = tmp_path / "ref" / RUN
    run = tmp_path / "kill" / RUN

    def reached() -> int:  # the newest step in metrics.csv (a row may be half written)
        try:
            return max([0] + [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]
                              if line.split(",")[0].isdigit()])
        except FileNotFoundError:
            return 0

    def checkpoints_done() -> int:
        return len(list((run / "checkpoints").glob("*.json")))

    kills = []  # (what, checkpoints on disk when killed)
    cmd = train_cmd(*args, "--results-dir", tmp_path / "kill")
    for attempt in range(3):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if attempt == 0:  # soon after the run folder is set up: the first steps, before any checkpoint
                wait_for(lambda: (run / "config.json").exists(), proc=proc, what="config.json")
                time.sleep(rng.uniform(0.0, 0.3))
            elif attempt == 1:  # right as a new checkpoint lands
                have = checkpoints_done()
                wait_for(lambda: checkpoints_done() > have, proc=proc, what="a new checkpoint")
            else:  # a random step of the resumed run, then a random moment within about a step
                target = rng.randint(reached() + 1, steps - 8)
                wait_for(lambda: reached() >= target, proc=proc, what=f"step {target}")
                time.sleep(rng.uniform(0.0, 0.1))
            assert proc.poll() is None, f"the run ended before kill {attempt} (seed {seed})"
            proc.send_signal(signal.SIGKILL)
            kills.append((attempt, [s for s, _ in list_checkpoints(run)]))
        finally:
            proc.kill()
            proc.wait(timeout=60)
        cmd = train_cmd("--resume", run)
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=300)

    why = f"seed {seed}, checkpoints at each kill {kills}"
    ref_ckpt, ckpt = list_checkpoints(ref)[-1], list_checkpoints(run)[-1]
    assert ckpt[0] == ref_ckpt[0] == steps, why
    assert_same_tensors(load_tensors(ref_ckpt[1]), load_tensors(ckpt[1]))
    ref_snaps, snaps = snapshot_files(ref), snapshot_files(run)
    assert [p.relative_to(ref) for p in ref_snaps] == [p.relative_to(run) for p in snaps], why
    for a, b in zip(ref_snaps, snaps):
        assert_same_tensors(load_tensors(a), load_tensors(b))
    assert steps_in_metrics(run) == steps_in_metrics(ref) == list(range(2, steps + 1, 2)), why
    assert not list(run.rglob(".*.tmp*")), why


@needs_fmnist
@pytest.mark.slow
def test_a_failing_rank_ends_the_torchrun_job(tmp_path):
    env = {**ENV, "MAPDIT_DIST_TIMEOUT_S": "60"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                          str(Path(__file__).with_name("failing_rank.py")), "1", "2", "train",
                          *TINY_ARGS, "--num-steps", "50", "--ema-snapshots", "0", "--results-dir", tmp_path],
                         env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert "mapdit train: error: rank 1 failed at step 2 on purpose" in out.stdout + out.stderr
    assert elapsed < 120
    assert not list_checkpoints(tmp_path / RUN)
