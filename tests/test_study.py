"""`mapdit study` (mapdit.experiments.study, .results): the resumable runner over the five studies and the RESULTS.md writer.

The end-to-end test trains tiny variants (DiT-XXS/4, 2 steps, batch 8, 16 samples of 3 DDIM steps, one
seed); the other tests work on stored (made-up) results or a stubbed `run_ablation`, so they train nothing.
"""
import csv
import json
from pathlib import Path

import pytest
import torch

import mapdit.cli
from mapdit.data import fashion_mnist
from mapdit.errors import UserError
from mapdit.experiments import results, study
from mapdit.experiments.budgets import ScoreBudget, TrainBudget
from mapdit.runio import write_json

needs_fmnist = pytest.mark.skipif(not fashion_mnist.has_idx_files(fashion_mnist.default_dir()),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    yield
    torch.set_num_threads(old)


def run_cli(argv) -> int:
    return mapdit.cli.main([str(a) for a in argv])


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ end to end
@needs_fmnist
def test_study_runs_every_study_then_skips_finished_variants(tmp_path, capsys):
    out, md, docs = tmp_path / "study", tmp_path / "RESULTS.md", tmp_path / "docs" / "results"
    args = ["study", "--configs", "A,E", "--modulations", "adaln,scale+rotate", "--lrs", "1e-2",
            "--model", "DiT-XXS/4", "--num-steps", 2, "--batch-size", 8, "--seeds", 0, "--fid-samples", 16,
            "--sampling-steps", 3, "--num-ref", 200, "--sample-batch-size", 8, "--magnitude-batch-size", 8,
            "--ema-snapshots", 2, "--log-every", 1, "--ema-sweep", "0.05,0.08", "--cache-dir", tmp_path / "cache",
            "--out", out, "--results-md", md, "--docs-dir", docs]
    assert run_cli(args) == 0
    first = capsys.readouterr()
    assert first.out.strip().splitlines()[-1] == str(md)
    # one table row per variant, in every study folder
    assert [r["variant"] for r in _csv(out / "configs" / "ablation.csv")] == ["A-adaln", "E-adaln"]
    assert [r["variant"] for r in _csv(out / "modulation" / "ablation.csv")] == ["E-adaln", "E-scale+rotate+gate"]
    assert sorted(p.name for p in (out / "lr" / "lr1e-02" / "results").glob("*.json")) == \
        ["A-adaln-seed0.json", "E-adaln-seed0.json"]
    # shared variants are trained once (E-adaln: configs -> modulation; E at its default 1e-2 -> lr)
    assert first.err.count("training DiT-XXS/4") == 4
    assert "reused from the configs study" in first.err
    ema = json.loads((out / "ema" / "ema.json").read_text())
    assert sorted(ema["points"]) == ["0.050", "0.080"] and all(p["value"] > 0 for p in ema["points"].values())
    assert "post-hoc" in ema["points"]["0.080"]["weights"] and "tracked" in ema["points"]["0.050"]["weights"]
    for png in ("residual_A_vs_E.png", "fd_vs_ema_width.png", "A_vs_E.png"):
        assert (docs / png).is_file() and (docs / png).read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert "| A | default | 0 |" in text and "| scale+rotate | 0 |" in text and "| A | 0.01 | 0 | no |" in text
    assert "](docs/results/A_vs_E.png)" in text and "--num-steps 2" in text
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/*")}
    first_elapsed = json.loads((out / "study.json").read_text())["elapsed_s"]
    runs = sorted(out.glob("**/runs/*/*"))
    assert len(runs) == 4

    # rerun: every variant skipped, nothing trained or sampled again, the same tables
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert "training DiT-XXS/4" not in err and "resuming" not in err and "sampling" not in err
    assert err.count("skipped, already finished") == 6  # configs 2, modulation 2, lr 2
    assert "grid: skipped" in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/*")} == stamps
    assert sorted(out.glob("**/runs/*/*")) == runs
    import re

    def budget_less_total(t):  # the study's total time grows by the rerun's few seconds
        return re.sub(r"Whole study \(.*?\): \d+ min", "", t.split("## Budget")[1])

    assert "Whole study (training, scoring, plots" in text
    assert budget_less_total(md.read_text()) == budget_less_total(text)
    elapsed = json.loads((out / "study.json").read_text())["elapsed_s"]
    assert elapsed > first_elapsed > 0  # summed over both invocations

    # another budget in the same folder is refused
    assert run_cli([*args[:-6], "--num-steps", 3, "--out", out, "--results-md", md]) == 2
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ lr divergence
def test_divergence_is_recorded_not_raised(tmp_path, monkeypatch):
    calls = []

    def fake_ablation(budget, score, *, configs, seeds, out, **kw):
        lr = budget.lr
        calls.append((configs[0], lr))
        if configs[0] == "A" and lr == 1e-2:
            raise UserError("non-finite loss or gradient at step 17: training stopped; no checkpoint yet")
        if lr == 1e-3:
            raise UserError("some other problem")
        return {"trained": [f"{configs[0]}-adaln-seed{seeds[0]}"], "skipped": []}

    monkeypatch.setattr("mapdit.experiments.ablate.run_ablation", fake_ablation)
    common = (TrainBudget(model="DiT-XXS/4", num_steps=1), ScoreBudget())
    summary = study._lr_study(tmp_path, common, [0], [1e-2], lambda m: None)
    assert summary["diverged"] == ["lr1e-02/A-adaln-seed0"] and summary["trained"] == ["lr1e-02/E-adaln-seed0"]
    record = json.loads((tmp_path / "lr" / "lr1e-02" / "diverged" / "A-adaln-seed0.json").read_text())
    assert record["diverged_at_step"] == 17 and record["lr"] == 1e-2
    # a rerun does not retry the diverged variant
    calls.clear()
    assert study._lr_study(tmp_path, common, [0], [1e-2], lambda m: None)["diverged"] == ["lr1e-02/A-adaln-seed0"]
    assert calls == [("E", 1e-2)]
    # other errors are not divergence: they stop the study
    with pytest.raises(UserError, match="some other problem"):
        study._lr_study(tmp_path, common, [0], [1e-3], lambda m: None)
    table, summary = results._lr_section(tmp_path)
    assert "| A | 0.01 | - | seed 0: diverged at step 17 |" in table and summary[("A", 1e-2)]["diverged"] == 1


# ------------------------------------------------------------------------------------------------ RESULTS.md
def _fake_result(folder: Path, config: str, modulation: str, seed: int, value: float, params: int,
                 mags: list[float], lr=None) -> None:
    run = folder / "runs" / f"{config}-{modulation}-seed{seed}" / "000-DiT-XXS-4"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,images_per_s,elapsed_s\n10,100,1.5\n20,110,3.0\n")
    write_json(folder / "results" / f"{config}-{modulation}-seed{seed}.json", {
        "name": f"{config}-{modulation}-seed{seed}", "variant": f"{config}-{modulation}", "config": config,
        "modulation": modulation, "seed": seed, "run_dir": str(run), "settings": {"lr": lr},
        "parameters": params, "images_per_s": 100.0, "step_time_ms": 80.0, "metric": "fd_fmnist", "value": value,
        "conditioning_accuracy": 0.5 + seed / 10, "max_block_magnitude": max(mags),
        "final_residual_magnitudes": mags, "final_step": 20})


def test_results_md_contains_every_study_table(tmp_path):
    out = tmp_path / "results" / "study"
    write_json(out / "study.json", {"quick": True, "command": "mapdit study --quick --out results/study",
                                    "settings": {"model": "DiT-XXS/4", "num_steps": 300, "batch_size": 32,
                                                 "seeds": [0, 1], "fid_samples": 500, "sampler": "ddim",
                                                 "sampling_steps": 20}})
    for seed in (0, 1):
        _fake_result(out / "configs", "A", "adaln", seed, 100.0 + seed, 1000, [1.0, 2.0, 4.0 + seed])
        _fake_result(out / "configs", "E", "adaln", seed, 80.0 + 2 * seed, 900, [1.0, 1.0, 1.1])
        _fake_result(out / "modulation", "E", "adaln", seed, 80.0 + 2 * seed, 900, [1.0, 1.0, 1.1])
        _fake_result(out / "modulation", "E", "scale+rotate+gate", seed, 85.0, 850, [1.0, 1.0, 1.0])
        _fake_result(out / "lr" / "lr1e-04", "A", "adaln", seed, 100.0, 1000, [1.0, 2.0, 4.0], lr=1e-4)
        _fake_result(out / "lr" / "lr1e-02", "E", "adaln", seed, 70.0, 900, [1.0, 1.0, 1.0], lr=1e-2)
    write_json(out / "lr" / "lr1e-02" / "diverged" / "A-adaln-seed0.json",
               {"config": "A", "seed": 0, "lr": 1e-2, "diverged_at_step": 7})
    write_json(out / "ema" / "ema.json", {"run_dir": "r", "variant": "E-adaln", "seed": 0, "points": {
        "0.050": {"sigma_rel": 0.05, "value": 81.0, "conditioning_accuracy": 0.6, "weights": "tracked EMA"},
        "0.100": {"sigma_rel": 0.1, "value": 79.0, "conditioning_accuracy": 0.6, "weights": "post-hoc EMA"}}})
    doc = results.write_results_md(out, tmp_path / "RESULTS.md", tmp_path / "docs" / "results")
    text = doc.read_text()
    # the configs table: mean ± sample std over the two seeds, parameters, magnitudes per block
    # (held-out ε-MSE: "-", the fake runs have no model to score)
    assert ("| A | default | 0 1 | 1,000 | 80.0 ± 0.0 | 3.0 ± 0.0 | - | 100.50 ± 0.71 | 55.0% ± 7.1% | 4.500 ± 0.707 |"
            in text)
    assert "| E | default | 0 1 | 900 |" in text and "1, 1, 1.1 |" in text
    assert "| scale+rotate | 0 1 | 850 | -5.6% |" in text and "| adaln | 0 1 | 900 | +0.0% |" in text
    assert "| A | 0.01 | - | seed 0: diverged at step 7 |" in text and "| E | 0.01 | 0 1 | no | - | 70.00 ± 0.00 |" in text
    assert "| A | 0.0001 | 0 1 | no | - | 100.00 ± 0.00 |" in text
    assert "| 0.100 | post-hoc EMA | - | 79.00 | 60.0% |" in text
    assert "mapdit study --quick --out results/study" in text and "not evidence" in text
    assert "DiT-XXS/4" in text and "300 training steps of batch\n32" in text
    assert "19.4% lower than Config A" in text  # (100.5 - 81) / 100.5
    # plots copied next to the document and linked relatively; the grid is not made yet
    assert "![residual magnitude per block, Config A vs E](docs/results/residual_A_vs_E.png)" in text
    assert "(docs/results/fd_vs_ema_width.png)" in text and "not made yet" in text
    assert (tmp_path / "docs" / "results" / "residual_A_vs_E.png").is_file()
    for section in ("## 1. Configs", "## 2. Modulation", "## 3. Learning rate", "## 4. Post-hoc EMA",
                    "## 5. Samples", "## Against the paper"):
        assert section in text


def test_comparison_puts_each_config_at_its_own_best_rate():
    def entry(fd, heldout):
        return {"fd": results._stats([fd]), "diverged": 0, "finished": 1, "heldout": results._stats([heldout])}

    lr = {("A", 1e-4): entry(100.0, 0.10), ("A", 1e-2): entry(90.0, 0.06), ("E", 1e-2): entry(95.0, 0.08),
          ("E", 1e-4): entry(300.0, 0.99)}
    text = results._comparison({}, {}, lr, {}, quick=False)
    assert "A at 0.01 0.0600, E at 0.01 0.0800" in text and "the baseline is ahead" in text
    lr[("E", 1e-2)] = entry(95.0, 0.05)
    assert "full MP is ahead even against a tuned baseline" in results._comparison({}, {}, lr, {}, quick=False)
