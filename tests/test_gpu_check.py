"""benchmarks/gpu_check.sh, the first-GPU check: its refusal without CUDA, its FLOP count and peak table, and
(slow) its whole plumbing as a CPU dry run, so that the script still runs when the first GPU is lent."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ENV
from mapdit.config import make_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_refuses_without_cuda_in_one_line(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(["bash", str(SCRIPT), "--benchmarks", str(bench), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**ENV, "PY": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "gpu_check: error: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine "
        "(or --cpu-dry-run to try the plumbing)"]
    assert not bench.exists() and not (tmp_path / "out").exists()  # nothing written


def test_training_flops_follow_dits_table(gpu_check):
    """3 x the forward's FLOPs; the forward of DiT-S/2 and DiT-XL/2 at 32x32x4 is DiT's 6.06 and 118.64 GMACs."""
    for model, gmacs in (("DiT-S/2", 6.06), ("DiT-XL/2", 118.64)):
        cfg = make_config(model, preset="A", input_size=32, in_channels=4, num_classes=1000)
        flops = gpu_check.train_flops_per_image(cfg)
        assert abs(flops / 3 / 2e9 - gmacs) <= 0.01 * gmacs, (model, flops)


def test_peak_by_device_name(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 3090") is None
    assert gpu_check.mfu(989.4e12, 2.0, 989.4) == pytest.approx(0.5)
    assert gpu_check.mfu(1e12, 1.0, None) is None


@pytest.mark.slow
def test_cpu_dry_run_writes_the_section(tmp_path):
    """The whole script on the CPU with tiny models ('eager' compile backend): every part measured, the
    training run's loss logged, the section appended to the file named, nothing else touched."""
    bench = tmp_path / "B.md"
    bench.write_text("# Benchmarks\n")
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                           "--out", str(tmp_path / "out"), "--benchmarks", str(bench)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\n## First-GPU check (benchmarks/gpu_check.sh), ")
    assert "--cpu-dry-run" in text and "| DiT-XXS/4 | E | compiled | 4 |" in text
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {(m["config"], m["mode"]) for m in results["models"]} == {("A", "eager"), ("E", "eager"),
                                                                     ("A", "compiled"), ("E", "compiled")}
    assert [r["mode"] for r in results["ratios"]] == ["eager", "compiled"]
    run = results["training_run"]
    assert run["exit"] == 0 and [s for s, _ in run["losses"]] == [2, 4] and run["checkpoint_mb"] > 0
    assert results["skipped"] == []
    assert (tmp_path / "out" / "gpu_check.md").read_text() in text
    assert ((ROOT / "BENCHMARKS.md").read_text() if before is not None else None) == before
