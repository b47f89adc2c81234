"""`mapdit study` (mapdit.experiments.study, .results, .budgets): the resumable runner over its six parts and
the RESULTS.md writer.

The end-to-end test trains tiny runs (DiT-XXS/4, 2 steps, batch 8, 16 samples of 3 dpm++2m steps, seeds 0
and 1); the other tests work on stored (made-up) results or a stubbed `run_ablation`, so they train nothing.
"""
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import cli, needs_installed_fmnist, only_error_line
from mapdit.config import MP_OPTIONS
from mapdit.errors import Diverged, UserError
from mapdit.evaluate.fid import default_cache_dir
from mapdit.evaluate.scoring import DEFAULT_CACHE
from mapdit.experiments import budgets, results, study
from mapdit.experiments.ablate import _parameters, finished_result
from mapdit.runio import write_json

pytestmark = pytest.mark.usefixtures("no_fmnist_override")


def _fake_run(out: Path, arm: str, lr: float, seed: int, value: float | None = None, acc: float = 0.5,
              params: int = 1000, mags: dict | None = None, diverged_at: int | None = None) -> None:
    """A stored run of `arm` (by name) at `lr`, as `train_arm` leaves it: a result JSON (FD `value`, accuracy
    `acc`) or, with `diverged_at`, a divergence record. No model: its held-out error is "-"."""
    a = budgets.arm_by_name(arm)
    folder = results.run_folder(out, a.name, lr)
    if diverged_at is not None:
        write_json(folder / "diverged" / f"{a.name}-seed{seed}.json",
                   {"arm": a.name, "config": a.config, "seed": seed, "lr": lr, "diverged_at_step": diverged_at})
        return
    run = folder / "runs" / f"{a.config}-{a.modulation}-seed{seed}" / "000-DiT-XXS-4"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,images_per_s,elapsed_s\n10,100,1.5\n20,110,3.0\n")
    mags_csv = None
    if mags:
        mags_csv = run / "eval" / "magnitudes.csv"
        mags_csv.parent.mkdir()
        mags_csv.write_text("step,quantity,block,value\n" + "".join(
            f"{step},{q},{b},{v}\n" for step, values in mags.items() for q in ("residual", "weight_qkv")
            for b, v in enumerate(values)))
    write_json(folder / "results" / f"{a.config}-{a.modulation}-seed{seed}.json", {
        "name": f"{a.config}-{a.modulation}-seed{seed}", "variant": f"{a.config}-{a.modulation}",
        "config": a.config, "modulation": a.modulation, "seed": seed, "run_dir": str(run),
        "settings": {"lr": lr, "num_steps": 2000}, "final_step": 2000, "parameters": params, "metric": "fd_fmnist",
        "value": value,
        "conditioning_accuracy": acc, "magnitudes_csv": None if mags_csv is None else str(mags_csv)})


def _settings(**kw) -> budgets.StudyBudget:
    return dataclasses.replace(budgets.FULL, **kw)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@needs_installed_fmnist
def test_study_runs_every_part_then_skips_finished_runs(tmp_path, capsys):
    out, md, docs = tmp_path / "study", tmp_path / "RESULTS.md", tmp_path / "docs" / "results"
    args = ["study", "--configs", "A,E", "--rates", "A=1e-4/1e-2,E=1e-2", "--components", "E-table",
            "--modulations", "adaln,scale+rotate", "--model", "DiT-XXS/4", "--num-steps", 2, "--checkpoints", "1,2",
            "--heldout-images", 100,
            "--batch-size", 8, "--seeds", "0,1", "--fid-samples", 16, "--sampling-steps", 3, "--num-ref", 200,
            "--sample-batch-size", 8, "--magnitude-batch-size", 8, "--ema-snapshots", 2, "--log-every", 1,
            "--cache-dir", tmp_path / "cache", "--out", out, "--results-md", md, "--docs-dir", docs]
    assert cli(*args) == 0
    first = capsys.readouterr()
    assert first.out.strip().splitlines()[-1] == str(md)
    # runs shared between parts are trained once: 3 rates, E-table, the two per-modulator arms (adaln,
    # scale+rotate), seed 1 of the five arms of the headline comparisons
    assert "11 runs, 0 already finished, 11 to train" in first.err
    assert first.err.count("training DiT-XXS/4") == 11
    assert first.err.count("skipped, already finished") == 5  # seed 0 of the five seed arms
    settings = budgets.StudyBudget.from_dict(json.loads((out / "study.json").read_text())["settings"])
    best = results.best_rates(out, settings, ["A", "E"])
    rates_a = {r["lr"]: r for r in results.rate_records(out, settings, "A", heldout=False)}
    assert best["E"] == 1e-2
    assert best["A"] == min(rates_a, key=lambda lr: (rates_a[lr]["value"], -rates_a[lr]["accuracy"]))
    assert f"best rates: A {best['A']:g}, E 0.01" in first.err
    records = [results.run_record(out, budgets.arm_by_name(n), best[budgets.arm_by_name(n).config], s, settings)
               for n in ("A", "E", "E-pm-adaln", "E-pm-scale+rotate", "E-table") for s in (0, 1)]
    assert all(r["status"] == "finished" and r["heldout"] > 0 for r in records)
    # every scored run keeps its samples; the variant trained what its arm says (one field off E)
    for r in records:
        npz = Path(r["result"]["samples_npz"])
        assert npz.is_file() and npz.parent == Path(r["run_dir"]) / "eval" and npz.name.startswith("samples-")
    table = json.loads((Path(records[-1]["run_dir"]) / "config.json").read_text())["model"]
    expected = budgets.arm_config("DiT-XXS/4", budgets.arm_by_name("E-table")).to_dict()
    sizes = ("input_size", "in_channels", "num_classes")
    assert {k: v for k, v in table.items() if k not in sizes} == {k: v for k, v in expected.items() if k not in sizes}
    assert table["time_embedding"] == "table" and table["mp_residual"] is True
    pm = json.loads((Path(records[4]["run_dir"]) / "config.json").read_text())["model"]  # E-pm-adaln, seed 0
    assert pm["modulation_gains"] == "per-modulator" and pm["modulation"] == "adaln"
    for png in ("residual_per_block.png", "A_vs_E.png"):
        assert (docs / png).is_file() and (docs / png).read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    for section in ("## 1. Headline verdicts", "## 2. Learning rates", "## 3. Which MP components",
                    "## 4. Modulation", "## 5. Samples", "## 6. Residual stream", "## Against the paper"):
        assert section in text
    assert "| E-table | upstream's learned timestep table |" in text
    e_table_row = next(line for line in text.splitlines() if line.startswith("| E-table |"))
    assert 0 < float(e_table_row.split("|")[-2]) <= 1  # its attention entropy, measured on the run
    assert "| scale+rotate |" in text and "](docs/results/A_vs_E.png)" in text and "--num-steps 2" in text
    assert "| full MP vs the baseline (each at its best rate): E (lr 0.01) vs A" in text
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/*")}
    for r in records:  # every kept checkpoint (Figure 5 reads them)
        assert {p.name for p in (Path(r["run_dir"]) / "checkpoints").glob("*.safetensors")} >= \
            {"step-0000001.safetensors", "step-0000002.safetensors"}
    first_elapsed = json.loads((out / "study.json").read_text())["elapsed_s"]

    # rerun: every run skipped, nothing trained or sampled again, the same document
    assert cli(*args) == 0
    err = capsys.readouterr().err
    assert "11 runs, 11 already finished, 0 to train" in err
    assert "training DiT-XXS/4" not in err and "resuming" not in err and "sampling" not in err
    assert err.count("skipped, already finished") == 16  # rates 3, E-table, modulation 2, seeds 10
    assert "grid -> " in err  # drawn again from the scored samples: no sampling
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/checkpoints/*")} == stamps

    def timeless(t):  # the study's total time grows by the rerun's few seconds
        return re.sub(r"Whole study \(.*?\): \d+ min", "", t)

    assert "Whole study (training, scoring, plots" in text
    assert timeless(md.read_text()) == timeless(text)
    assert json.loads((out / "study.json").read_text())["elapsed_s"] > first_elapsed > 0

    # the report can be regenerated from a moved copy of the study folder (stored run paths are relocated)
    moved = tmp_path / "elsewhere" / "study"
    shutil.copytree(out, moved)
    shutil.rmtree(out / "runs" / "E-table")  # the original is not read
    for ckpt in moved.glob("**/checkpoints/*.safetensors"):  # kept without checkpoints (as in git)
        ckpt.unlink()
    assert cli("study", "--report-only", "--out", moved, "--results-md", tmp_path / "R2.md", "--docs-dir",
               tmp_path / "d2", "--components", "E-table", "--modulations", "adaln,scale+rotate") == 0
    moved_text = (tmp_path / "R2.md").read_text()
    assert moved_text.split("## 1.")[1].split("## 5.")[0] == text.split("## 1.")[1].split("## 5.")[0]
    assert "not run yet" not in moved_text.split("## 1.")[1].split("## 2.")[0]
    assert "](d2/residual_per_block.png)" in moved_text and (tmp_path / "d2" / "A_vs_E.png").is_file()
    shutil.rmtree(moved)

    # another budget in the same folder is refused
    assert cli(*args[:-6], "--num-steps", 3, "--checkpoints", "3", "--out", out, "--results-md", md) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
@needs_installed_fmnist
def test_workers_train_every_run_once_and_shared_runs_are_queued_once(tmp_path, capfd):
    out = tmp_path / "study"
    args = ["study", "--workers", 2, "--studies", "rates,components,seeds", "--configs", "A,E", "--rates",
            "A=1e-2,E=1e-2", "--components", "E-table", "--model", "DiT-XXS/4", "--num-steps", 2, "--checkpoints", 2,
            "--heldout-images", 100, "--batch-size", 8, "--seeds", 0, "--fid-samples", 16, "--sampling-steps", 2,
            "--num-ref", 200, "--sample-batch-size", 8, "--magnitude-batch-size", 8, "--ema-snapshots", 2,
            "--cache-dir", tmp_path / "cache", "--out", out, "--results-md", tmp_path / "R.md", "--docs-dir",
            tmp_path / "docs", "--min-snr-gamma", 3]
    assert cli(*args) == 0
    err = capfd.readouterr().err
    # A, E (rates); E-table (components); E-pm-adaln, E-pm-scale+rotate (seeds part, seed 0 only)
    assert "5 runs, 0 already finished, 5 to train" in err and "2 runs at a time" in err
    assert err.count("training DiT-XXS/4") == 5  # from the workers' stderr: each run once
    # the seeds part wants E-table seed 0 while components may still have it queued: never trained twice
    assert "E-table at 0.01: seed 0 skipped, already queued by part components" in err
    settings = budgets.StudyBudget.from_dict(json.loads((out / "study.json").read_text())["settings"])
    for name in ("A", "E", "E-table", "E-pm-adaln", "E-pm-scale+rotate"):
        record = results.run_record(out, budgets.arm_by_name(name), 1e-2, 0, settings)
        assert record["status"] == "finished" and record["heldout"] > 0, name
        assert json.loads((Path(record["run_dir"]) / "config.json").read_text())["train"]["min_snr_gamma"] == 3
    assert "loss weighted by Min-SNR-3" in (tmp_path / "R.md").read_text()
    assert cli(*args) == 0  # resumed: nothing left
    assert "5 runs, 5 already finished, 0 to train" in capfd.readouterr().err
    assert cli(*args[:1], "--workers", 0, *args[3:]) == 2
    assert cli(*args[:-1], "-1") == 2 and "--min-snr-gamma -1" in capfd.readouterr().err


@needs_installed_fmnist
def test_a_study_run_checkpoints_exactly_at_the_kept_steps(tmp_path, monkeypatch):
    # --checkpoints 7,20 checkpointed every step (at their gcd, 1): 489 MB for a 20-step run, ~50 GB at full budget
    monkeypatch.chdir(tmp_path)  # at e95bf9f the report went to ./RESULTS.md and ./docs/results
    out = tmp_path / "study"
    assert cli("study", "--studies", "rates", "--configs", "A", "--rates", "A=1e-2", "--model", "DiT-XXS/4",
               "--num-steps", 20, "--checkpoints", "7,20", "--batch-size", 8, "--fid-samples", 16, "--sampling-steps",
               2, "--num-ref", 200, "--heldout-images", 50, "--sample-batch-size", 8, "--magnitude-batch-size", 8,
               "--ema-snapshots", 0, "--cache-dir", tmp_path / "cache", "--out", out) == 0
    run = next(out.glob("runs/A/lr1e-02/runs/*/*"))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == \
        ["step-0000007.safetensors", "step-0000020.safetensors"]
    assert json.loads((run / "config.json").read_text())["train"]["ckpt_steps"] == [7, 20]


def test_workers_receive_a_real_cache_folder_not_the_default_sentinel(tmp_path):
    # the DEFAULT_CACHE sentinel is an object(): pickled into a worker it would be another object, and the
    # worker's scoring would take it for a path (every run failed at its FD this way)
    pool = study._Workers(1, tmp_path, budgets.QUICK, study.RunOptions(cache_dir=DEFAULT_CACHE), lambda m: None)
    try:
        sent = pickle.loads(pickle.dumps(pool.opts))
        assert sent.cache_dir == default_cache_dir() and sent.log is None and sent.progress is False
    finally:
        pool.close()


_PARENT = """
import concurrent.futures, multiprocessing, os, time
from mapdit.experiments.study import _worker_init

if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_init, initargs=(1, os.getpid()))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 300)  # a run under way
    time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"  # a zombie is gone too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_worker_stops_when_the_study_process_is_killed(tmp_path):
    # `kill` of the study (not its process group) used to leave its workers training on, orphaned
    (tmp_path / "parent.py").write_text(textwrap.dedent(_PARENT))
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert not _gone(worker)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _gone(worker):
        os.kill(worker, 9)
        pytest.fail("the worker outlived the study process")


# ------------------------------------------------------------------------------------------------ best rates
def test_runner_picks_each_configs_best_rate_from_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    settings = _settings(rates={"A": [1e-4, 3e-3, 1e-2, 3e-2], "E": [1e-2, 3e-2, 1e-1]})
    _fake_run(out, "A", 1e-4, 0, 100.0)
    _fake_run(out, "A", 3e-3, 0, 50.0, acc=0.6)
    _fake_run(out, "A", 1e-2, 0, diverged_at=12)
    _fake_run(out, "A", 3e-2, 0, 50.0, acc=0.7)  # ties 3e-3 on FD, higher accuracy
    _fake_run(out, "E", 1e-2, 0, 80.0)
    _fake_run(out, "E", 3e-2, 0, 60.0)
    _fake_run(out, "E", 1e-1, 0, diverged_at=3)
    _fake_run(out, "E-table", 1e-1, 0, 1.0)  # another arm: not a rate of E
    _fake_run(out, "E", 3e-2, 1, 1.0)  # another seed: not a rate run
    records = results.rate_records(out, settings, "A")
    assert [r["status"] for r in records] == ["finished", "finished", "diverged", "finished"]
    assert results.best_rate("A", records) == 3e-2 and results.best_rate("E", records) is None
    assert results.best_rates(out, settings, ["A", "E"]) == {"A": 3e-2, "E": 3e-2}
    assert results.best_rate("E", [{"arm": "E", "lr": 1e-2, "status": "finished", "value": float("nan")},
                                 {"arm": "E", "lr": 3e-2, "status": "diverged", "value": None}]) is None

    # later parts train at the best rate of their config
    calls, stored_time = [], []

    def fake_ablation(budget, score, *, configs, modulations, seeds, out, overrides, **kw):
        calls.append((configs[0], modulations[0], seeds[0], budget.lr, overrides))
        stored_time.append(json.loads((out.parent.parent.parent / "study.json").read_text())["elapsed_s"])
        time.sleep(0.002)
        return {"trained": ["x"], "skipped": [], "results": []}

    monkeypatch.setattr("mapdit.experiments.ablate.run_ablation", fake_ablation)
    common = {"out": out, "rates": settings.rates, "results_md": None, "progress": False}
    study.run_study(studies=["components", "modulation", "seeds"], **common)
    assert calls and all(c[3] == 3e-2 for c in calls)
    # the study's time is stored after every run (a killed invocation loses at most one run's time)
    assert all(later > earlier for earlier, later in zip(stored_time, stored_time[1:]))
    assert ("E", "adaln", 0, 3e-2, {"cosine_attention": False}) in calls
    assert ("E", "adaln", 0, 3e-2, {"time_embedding": "table"}) in calls
    per_modulator = {"modulation_gains": "per-modulator"}
    assert ("E", "scale+rotate", 0, 3e-2, per_modulator) in calls
    assert ("E", "adaln", 0, 3e-2, per_modulator) in calls  # the modulation part's adaln is a run of its own
    # seed 0 of A and E (the rates part's runs) and E's stored seed 1 are reused, not retrained
    assert {(c[0], c[2]) for c in calls if c[4] == {} and c[1] == "adaln"} == {("A", 1), ("A", 2), ("E", 2)}

    # a part that needs a best rate refuses, in one line, until `rates` has finished for its config
    for p in out.glob("runs/E/lr1e-01/diverged/*.json"):
        p.unlink()
    capsys.readouterr()
    assert cli("study", "--studies", "seeds", "--out", out, "--rates", "A=1e-4/3e-3/1e-2/3e-2,E=1e-2/3e-2/1e-1",
               "--results-md", tmp_path / "R.md") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].count("\n") == 0 and "needs Config E's best rate" in err[-1] and "0.1" in err[-1]


def test_an_emptied_or_cut_short_result_is_not_a_finished_run(tmp_path):
    # a result JSON emptied to {} counted as finished: RESULTS.md said "every rate diverged" and the rerun
    # skipped the run
    out = tmp_path / "study"
    settings = _settings(rates={"A": [1e-2, 3e-2]})
    _fake_run(out, "A", 1e-2, 0, 50.0)
    _fake_run(out, "A", 3e-2, 0, 40.0)
    assert results.best_rates(out, settings, ["A"]) == {"A": 3e-2}
    stored = results.run_folder(out, "A", 3e-2) / "results" / "A-adaln-seed0.json"
    whole = json.loads(stored.read_text())
    for broken in ({}, {**whole, "final_step": 1000}, {k: v for k, v in whole.items() if k != "value"}):
        write_json(stored, broken)
        assert results.run_record(out, budgets.BASE_ARMS["A"], 3e-2, 0)["status"] == "missing"
        assert results.best_rates(out, settings, ["A"]) == {"A": None}  # not every rate is known yet
        assert "every rate diverged" not in results.rates_section(out, settings)[0]
    stored.write_text('{"name": "A-adaln-seed0", "val')  # cut short by a full disk: no error, not finished
    assert results.run_record(out, budgets.BASE_ARMS["A"], 3e-2, 0)["status"] == "missing"


def test_a_result_of_another_budget_or_a_forged_final_step_is_not_a_finished_run(tmp_path, monkeypatch):
    # study.json edited by hand to 4 steps: the rerun skipped the 2000-step run as "already finished" and
    # reported it as the 4-step study's; a final_step edited to the budget's counted a run whose newest
    # checkpoint is at step 100
    out = tmp_path / "study"
    _fake_run(out, "A", 1e-2, 0, 50.0)  # settings num_steps 2000, final_step 2000
    arm = budgets.BASE_ARMS["A"]
    assert results.run_record(out, arm, 1e-2, 0, num_steps=2000)["status"] == "finished"
    assert results.run_record(out, arm, 1e-2, 0, num_steps=4)["status"] == "missing"
    assert results.rate_records(out, _settings(num_steps=4, rates={"A": [1e-2]}), "A", heldout=False)[0][
        "status"] == "missing"
    calls = []
    monkeypatch.setattr("mapdit.experiments.ablate.run_ablation",
                        lambda *a, **kw: calls.append(kw["seeds"]) or {"trained": [], "skipped": []})
    study.train_arm(out, arm, 1e-2, [0], _settings(model="DiT-XXS/4", num_steps=4), lambda m: None)
    assert calls == [[0]]  # handed to run_ablation, which refuses a result of other settings
    run = Path(results.run_record(out, arm, 1e-2, 0, num_steps=2000)["run_dir"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000100.safetensors").write_bytes(b"")
    assert results.run_record(out, arm, 1e-2, 0, num_steps=2000)["status"] == "missing"
    stored = results.run_folder(out, "A", 1e-2) / "results" / "A-adaln-seed0.json"
    assert finished_result(stored) is None  # `mapdit ablate` continues and rescores it
    (run / "checkpoints" / "step-0002000.safetensors").write_bytes(b"")
    assert results.run_record(out, arm, 1e-2, 0, num_steps=2000)["status"] == "finished"


@pytest.mark.parametrize("meta", ['[1]', '{"settings": 5}', '{"settings": {}, "elapsed_s": "x"}'])
def test_a_study_json_edited_into_another_shape_is_one_line(tmp_path, monkeypatch, capsys, meta):
    # was an AttributeError traceback ('list' object has no attribute 'get') on every rerun and report
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(meta)
    monkeypatch.setattr(study, "train_arm", lambda *a, **kw: pytest.fail("trained"))
    for args in (["--studies", "rates", "--configs", "A", "--rates", "A=1e-2", "--model", "DiT-XXS/4"],
                 ["--report-only"]):
        assert cli("study", "--out", out, *args) == 2
        assert "is not a study record" in only_error_line(capsys, "study")


@pytest.mark.parametrize("bad", [("--heldout-images", 0), ("--fd-samples", 0), ("--fd-samples", 1), ("--num-ref", 1),
                                 ("--num-ref", 10_001), ("--batch-size", 0), ("--num-steps", 0),
                                 ("--sample-batch-size", 0), ("--model", "DiT-Q/9"), ("--results-md", "file/R.md"),
                                 ("--docs-dir", "file/docs"), ("--out", "file/study")])
def test_a_bad_setting_or_place_fails_before_any_run_trains_or_is_stored(tmp_path, monkeypatch, capsys, bad):
    # these failed only after a run had trained, with study.json already storing them (the corrected rerun
    # was then refused as "other settings"), or after the whole study (an unwritable report)
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("a file, not a folder")
    calls = []
    monkeypatch.setattr("mapdit.experiments.ablate.run_ablation", lambda *a, **kw: calls.append(a))
    assert cli("study", "--studies", "rates", "--configs", "A", "--rates", "A=1e-2", "--out", "study", *bad) == 2
    line = only_error_line(capsys, "study")
    assert bad[0] in line and calls == [] and not Path("study", "study.json").exists()


# ------------------------------------------------------------------------------------------------ components
def test_every_component_variant_differs_from_E_in_exactly_one_field():
    e = budgets.arm_config("DiT-XXS/4", budgets.BASE_ARMS["E"]).to_dict()
    # validate() resolves the defaults that depend on other options (806cb5e): E builds the Fourier embedding;
    # an arm is compared with E in the fields it sets (a default that follows them changes along)
    assert all(e[o] for o in MP_OPTIONS) and e["time_embedding"] == "fourier" and e["mlp_activation"] == "gelu"
    assert e["modulation_gains"] == "shared"
    # the modulation part's reference: E with per-modulator gains (one field off E); each other modulation
    # differs from that reference in the modulation only
    pm = budgets.arm_config("DiT-XXS/4", budgets.modulation_arms()["adaln"]).to_dict()
    assert {k: pm[k] for k in e if pm[k] != e[k]} == {"modulation_gains": "per-modulator"}
    turned_off, others = [], {}
    arms = {**budgets.component_arms(), **{a.name: a for m, a in budgets.modulation_arms().items() if m != "adaln"}}
    for name, arm in arms.items():
        cfg = budgets.arm_config("DiT-XXS/4", arm).to_dict()
        ref = pm if name.startswith("E-pm-") else e
        changed = {k for k in ref if cfg[k] != ref[k] and (k not in budgets.DEPENDENT or k in arm.overrides)}
        assert len(changed) == 1, (name, changed)
        field = changed.pop()
        if field in MP_OPTIONS:
            assert cfg[field] is False and name == f"E-{field}"
            turned_off.append(field)
        else:
            others[name] = (field, cfg[field])
        assert _parameters(cfg) > 0  # each variant builds
    assert _parameters(pm) > _parameters(e)  # a learned gain per modulator
    # E without mp_embedding builds DiT's sinusoid, as at e95bf9f (not E's Fourier features, resolved first)
    assert budgets.arm_config("DiT-XXS/4", budgets.arm_by_name("E-mp_embedding")).time_embedding == "sinusoid"
    assert sorted(turned_off) == sorted(MP_OPTIONS)  # each option left out exactly once
    assert others == {"E-table": ("time_embedding", "table"), "E-mp-sinusoid": ("time_embedding", "mp-sinusoid"),
                      "E-silu": ("mlp_activation", "silu"), "E-pm-scale": ("modulation", "scale+gate"),
                      "E-pm-shift": ("modulation", "shift+gate"), "E-pm-rotate": ("modulation", "rotate+gate"),
                      "E-pm-scale+rotate": ("modulation", "scale+rotate+gate")}


# ------------------------------------------------------------------------------------------------ verdicts
def test_verdict_needs_agreeing_seeds_and_a_difference_beyond_their_spread():
    v = results.verdict
    assert v([-5.0, -6.0, -4.0], "lower", "E", "A") == "E better"
    assert v([5.0, 6.0, 4.0], "lower", "E", "A") == "A better"
    assert v([0.10, 0.12, 0.11], "higher", "E", "A") == "E better"
    assert v([-0.10, -0.12, -0.11], "higher", "E", "A") == "A better"
    assert v([-5.0, 1.0, -4.0], "lower", "E", "A") == "within noise"  # the seeds disagree in sign
    assert v([-1.0, -10.0, -0.5], "lower", "E", "A") == "within noise"  # |mean| 3.8 < std 5.3
    assert v([-5.0], "lower", "E", "A") == "within noise"  # one seed: no spread, no verdict
    assert v([0.0, 0.0, 0.0], "lower", "E", "A") == "within noise"
    assert results.paired_differences({0: 3.0, 1: 5.0, 2: 1.0}, {0: 1.0, 1: 1.0, 3: 9.0}) == [2.0, 4.0]
    with pytest.raises(ValueError):
        v([1.0, 2.0], "smaller")


def test_comparison_pairs_seeds_of_each_arm_at_its_best_rate(tmp_path):
    out = tmp_path / "study"
    settings = _settings(rates={"A": [1e-4, 1e-2], "E": [1e-2, 3e-2]})
    for lr, fd in ((1e-4, 300.0), (1e-2, 40.0)):
        _fake_run(out, "A", lr, 0, fd, acc=0.8)
    for lr, fd in ((1e-2, 90.0), (3e-2, 50.0)):
        _fake_run(out, "E", lr, 0, fd, acc=0.7)
    _fake_run(out, "A", 1e-2, 1, 44.0, acc=0.82)
    _fake_run(out, "A", 1e-2, 2, 38.0, acc=0.79)
    _fake_run(out, "E", 3e-2, 1, 52.0, acc=0.7)
    _fake_run(out, "E", 3e-2, 2, 57.0, acc=0.71)
    _fake_run(out, "E", 1e-2, 1, 10.0)  # not the best rate: not paired
    best = results.best_rates(out, settings, ["A", "E"])
    c = results.comparison(out, settings, best, "E", "A")
    assert (c["lr_x"], c["lr_y"], c["seeds"]) == (3e-2, 1e-2, [0, 1, 2])
    assert c["metrics"]["value"]["diffs"] == [10.0, 8.0, 19.0] and c["metrics"]["value"]["verdict"] == "A better"
    assert c["metrics"]["accuracy"]["verdict"] == "A better"
    assert c["metrics"]["heldout"]["verdict"] == "not run yet"  # no models in the fake runs


# ------------------------------------------------------------------------------------------------ divergence
def test_divergence_is_recorded_not_raised(tmp_path, monkeypatch):
    calls = []

    def fake_ablation(budget, score, *, configs, seeds, out, **kw):
        lr = budget.lr
        calls.append((configs[0], lr))
        if configs[0] == "A" and lr == 1e-2:
            raise Diverged("non-finite loss or gradient at step 17: training stopped; no checkpoint yet", step=17)
        if lr == 1e-3:
            raise UserError("some other problem")
        return {"trained": [f"{configs[0]}-adaln-seed{seeds[0]}"], "skipped": []}

    monkeypatch.setattr("mapdit.experiments.ablate.run_ablation", fake_ablation)
    common = _settings(model="DiT-XXS/4")
    say = lambda m: None  # noqa: E731
    summary = study.train_arm(tmp_path, budgets.BASE_ARMS["A"], 1e-2, [0], common, say)
    assert summary["diverged"] == ["lr1e-02/A-seed0"] and summary["trained"] == []
    assert study.train_arm(tmp_path, budgets.BASE_ARMS["E"], 1e-2, [0], common, say)["trained"] == \
        ["E/lr1e-02/E-adaln-seed0"]
    record = json.loads((tmp_path / "runs" / "A" / "lr1e-02" / "diverged" / "A-seed0.json").read_text())
    assert record["diverged_at_step"] == 17 and record["lr"] == 1e-2
    # a rerun does not retry the diverged run
    calls.clear()
    assert study.train_arm(tmp_path, budgets.BASE_ARMS["A"], 1e-2, [0], common, say)["diverged"] == \
        ["lr1e-02/A-seed0"]
    assert calls == []
    # other errors are not divergence: they stop the study
    with pytest.raises(UserError, match="some other problem"):
        study.train_arm(tmp_path, budgets.BASE_ARMS["E"], 1e-3, [0], common, say)
    table, detail, summary = results.rates_section(tmp_path, _settings(rates={"A": [1e-2]}))
    assert "| A | 0.01 | diverged at step 17 |" in detail
    assert summary["A"]["best"] is None and "every rate diverged" in table


# ------------------------------------------------------------------------------------------------ RESULTS.md
def test_results_md_contains_every_table(tmp_path):
    out = tmp_path / "results" / "study"
    settings = _settings(seeds=[0, 1], rates={"A": [1e-4, 1e-2, 3e-2], "B": [1e-2], "E": [1e-2, 3e-2]})
    write_json(out / "study.json", {"quick": True, "command": "mapdit study --quick --out results/study",
                                    "settings": settings.to_dict(), "elapsed_s": 600.0, "machine": "2 CPUs",
                                    "started": "2026-12-01", "updated": "2026-12-01"})
    mags_a = {500: [1.0, 2.0, 3.0], 1000: [1.0, 3.0, 6.0], 2000: [1.0, 4.0, 8.0]}
    mags_e = {500: [1.0, 1.0, 1.0], 1000: [1.0, 1.1, 1.0], 2000: [1.0, 1.0, 1.1]}
    _fake_run(out, "A", 1e-4, 0, 120.0, acc=0.3, mags=mags_a)
    _fake_run(out, "A", 1e-2, 0, 100.0, acc=0.8, mags=mags_a)
    _fake_run(out, "A", 1e-2, 1, 104.0, acc=0.8)
    _fake_run(out, "A", 3e-2, 0, 150.0, acc=0.1)
    _fake_run(out, "B", 1e-2, 0, diverged_at=5)
    _fake_run(out, "E", 1e-2, 0, 90.0, acc=0.6, params=900)
    _fake_run(out, "E", 3e-2, 0, 80.0, acc=0.85, params=900, mags=mags_e)
    _fake_run(out, "E", 3e-2, 1, 82.0, acc=0.86, params=900)
    _fake_run(out, "E-cosine_attention", 3e-2, 0, 70.0, acc=0.9)
    _fake_run(out, "E-mp_embedding", 3e-2, 0, 82.5, acc=0.85)
    _fake_run(out, "E-mp_residual", 3e-2, 0, diverged_at=9)
    _fake_run(out, "E-pm-adaln", 3e-2, 0, 84.0, params=900)
    _fake_run(out, "E-pm-scale+rotate", 3e-2, 0, 85.0, params=850)
    doc = results.write_results_md(out, tmp_path / "RESULTS.md", tmp_path / "docs" / "results")
    text = doc.read_text()
    # rates: best rate beside the paper default (E's at the edge of its bracket); B: every rate diverged
    assert "| A | 0.01 | 100.00 | 80.0% | - | 0.0001 | 120.00 | 30.0% | - |" in text
    assert "| E | 0.03 (edge of its bracket: widen it) | 80.00 | 85.0% | - | 0.01 | 90.00 | 60.0% | - |" in text
    assert "| B | every rate diverged | - | - | - | 0.0001 | not in the bracket | - | - |" in text
    assert "| B | 0.01 | diverged at step 5 |" in text
    # components at E's best rate, difference from E
    # one seed each, judged against twice the headline's paired FD spread (std of -20, -22: 1.41)
    assert "moves by ±1.41 by chance" in text
    assert ("| E-cosine_attention | without cosine_attention | 70.00 | 90.0% | - | -10.00 | better | +5.0% | - | - |"
            in text)
    assert ("| E-mp_embedding | without mp_embedding | 82.50 | 85.0% | - | +2.50 | within noise | +0.0% | - | - |"
            in text)
    assert "| E-mp_residual | without mp_residual | diverged at step 9 |" in text
    assert "| E-table | upstream's learned timestep table | not run yet |" in text
    # modulation: parameters against adaln
    assert "| scale+rotate | 850 | -5.6% | 85.00 |" in text and "| shift | not run yet |" in text
    # headline: paired over seeds 0 1, E - A = -20, -22: beyond the spread
    assert ("| full MP vs the baseline (each at its best rate): E (lr 0.03) vs A (lr 0.01) | FD_fmnist | 0 1 | "
            "81.00 ± 1.41 | 102.00 ± 2.83 | -21.00 ± 1.41 | E better |") in text
    assert "| smooth noise-level embedding vs upstream's table | - | - | - | - | - | not run yet |" in text
    # the paper section, written from the numbers
    assert "20.6% lower than the baseline" in text and "agrees in direction" in text  # (102 - 81) / 102
    assert "5.6% fewer parameters than adaln" in text
    assert "growing without MP, bounded with it: agrees" in text
    assert "mapdit study --quick --out results/study" in text and "not evidence" in text
    assert "Machine: 2 CPUs. Date: 2026-12-01." in text and "10 min" in text
    # plots copied next to the document and linked relatively; the grid is not made yet
    assert "](docs/results/residual_per_block.png)" in text and "not run yet" in text.split("## 5.")[1].split("## 6")[0]
    assert (tmp_path / "docs" / "results" / "residual_per_block.png").is_file()


def test_the_report_never_replaces_a_file_the_study_did_not_write(tmp_path, monkeypatch, capsys):
    # `mapdit study --report-only`, run from the repository root as the README said, rewrote the shipped
    # RESULTS.md (133 -> 67 lines: "No results stored yet in results/study") and exited 0
    monkeypatch.chdir(tmp_path)
    shipped, figure = Path("RESULTS.md"), Path("docs", "results", "A_vs_E.png")
    shipped.write_text("# Results\n\nwritten by hand\n")
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"a figure of someone else")
    assert cli("study", "--report-only") == 2
    assert "--out results/study holds no study" in only_error_line(capsys, "study")
    assert shipped.read_text() == "# Results\n\nwritten by hand\n"

    out = Path("results", "study")
    write_json(out / "study.json", {"settings": _settings(rates={"A": [1e-2]}).to_dict(), "command": "mapdit study"})
    _fake_run(out, "A", 1e-2, 0, 50.0)
    (out / "grid").mkdir()
    (out / "grid" / "A_vs_E.png").write_bytes(b"the study's figure")
    assert cli("study", "--report-only") == 0  # the report goes inside --out by default
    assert capsys.readouterr().out.strip() == str(out / "RESULTS.md")
    own = (out / "RESULTS.md").read_text()
    assert own.startswith("<!-- written by mapdit study --out .: ") and "| A | 0.01 | 50.00 |" in own
    assert shipped.read_text() == "# Results\n\nwritten by hand\n"

    # the repository's RESULTS.md is an explicit choice, and refused while that study did not write it
    for explicit in (["--results-md", "RESULTS.md"], ["--results-md", "R2.md", "--docs-dir", "docs/results"]):
        assert cli("study", "--report-only", "--out", out, *explicit) == 2
        line = only_error_line(capsys, "study")
        assert "exists and was not" in line and f"by the study in {out}" in line and "delete that file" in line
    assert shipped.read_text() == "# Results\n\nwritten by hand\n" and not Path("R2.md").exists()
    assert figure.read_bytes() == b"a figure of someone else"
    shipped.unlink()
    figure.unlink()
    args = ["study", "--report-only", "--out", out, "--results-md", "RESULTS.md", "--docs-dir", "docs/results"]
    assert cli(*args) == 0
    assert shipped.read_text().startswith("<!-- written by mapdit study --out results/study: ")
    assert "](docs/results/A_vs_E.png)" in shipped.read_text() and figure.read_bytes() == b"the study's figure"
    (out / "grid" / "A_vs_E.png").write_bytes(b"a newer figure")
    assert cli(*args) == 0  # written by this study: regenerated, figures included
    assert figure.read_bytes() == b"a newer figure"
    # another study does not replace it; a RESULTS.md of the format before the mark counts as its study's
    other = Path("other")
    shutil.copytree(out, other)
    assert cli("study", "--report-only", "--out", other, "--results-md", "RESULTS.md") == 2
    assert "was not written by the study in other" in only_error_line(capsys, "study")
    legacy = shipped.read_text().split("\n", 1)[1].replace("results/study", "other")
    shipped.write_text(legacy)
    assert cli("study", "--report-only", "--out", other, "--results-md", "RESULTS.md") == 0
    assert shipped.read_text().startswith("<!-- written by mapdit study --out other: ")


def test_results_md_without_runs_says_not_run_yet(tmp_path):
    doc = results.write_results_md(tmp_path / "empty", tmp_path / "RESULTS.md", tmp_path / "docs")
    text = doc.read_text()
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        body = text.split(section)[1].split("\n## ")[0]
        assert "not run yet" in body, section
    assert "No results stored yet" in text and "nothing to compare yet" in text


def test_a_bracket_may_only_be_widened_in_a_finished_study():
    stored = {"A": [1e-4, 1e-2], "E": [1e-2, 0.1]}
    assert study._extends(stored, {"A": (1e-4, 1e-2), "E": (1e-2, 0.1, 0.3)})  # E widened
    assert study._extends(stored, {"A": (1e-2, 1e-4), "E": (0.1, 1e-2)})  # same rates, other order
    assert not study._extends(stored, {"A": (1e-4, 1e-2), "E": (1e-2, 0.3)})  # 0.1 dropped
    assert not study._extends(stored, {"A": (1e-4, 1e-2)})  # a config dropped
    assert not study._extends(None, {"A": (1e-4,)})


def test_plan_counts_shared_runs_once(tmp_path):
    settings = _settings()
    full = study.plan(tmp_path, settings, budgets.PARTS)
    # rates 21; components 11; modulation 5 (adaln with per-modulator gains is not E); seeds: seeds 1, 2 of
    # 5 arms (seed 0 reused)
    assert (full["runs"], full["finished"], full["to_train"]) == (47, 0, 47)
    assert full["minutes"] == pytest.approx(47 * study.run_seconds(settings) / 60)
    # one run at a time the full study misses the 4 hours on 2 cores; two at a time it fits
    assert full["minutes"] > 4 * 60 > full["minutes"] / study.TWO_WORKER_SPEEDUP
    _fake_run(tmp_path, "A", 1e-4, 0, 1.0)
    assert study.plan(tmp_path, settings, ["rates"])["to_train"] == 20
    assert study.plan(tmp_path / "q", budgets.QUICK, budgets.PARTS)["minutes"] < 15


def test_paper_section_is_written_from_the_numbers():
    def comp(fd_x, fd_y, x="E", y="A"):
        diffs = [a - b for a, b in zip(fd_x, fd_y)]
        fd = {"label": "FD_fmnist", "x": results._stats(fd_x), "y": results._stats(fd_y),
              "diff": results._stats(diffs), "verdict": results.verdict(diffs, "lower", x, y)}
        none = {"label": "-", "x": None, "y": None, "diff": None, "verdict": "not run yet"}
        return {"x": x, "y": y, "lr_x": 3e-2, "lr_y": 1e-2, "seeds": [0, 1, 2],
                "metrics": {"value": fd, "accuracy": none, "heldout": none}}

    text = results._paper_section({"E vs A": comp([60.0, 62.0, 61.0], [40.0, 41.0, 43.0])}, {}, {}, quick=False)
    assert "47.6% higher than the baseline" in text and "disagrees: the baseline is better" in text
    text = results._paper_section({"E vs A": comp([40.0, 45.0, 38.0], [41.0, 41.0, 43.0])}, {}, {}, quick=False)
    assert "not confirmed: the difference is within the seed noise" in text
    text = results._paper_section({"E vs A": comp([35.0, 36.0, 37.5], [40.0, 41.0, 43.0])}, {}, {}, quick=False)
    assert "agrees in direction and roughly in size" in text  # 12.5% lower
    text = results._paper_section({}, {}, {}, quick=False, effects={"E-table": 5.0, "E-cosine_attention": -3.0})
    assert "hurts E most is E-table (FD +5.00)" in text and "helps most is E-cosine_attention (FD -3.00)" in text
    assert "costs at this scale" in text
    effects = {"E-table": 5.0, "E-cosine_attention": -3.0, "E-mp_silu": 0.5}
    text = results._paper_section({}, {}, {}, quick=False, effects=effects, noise=2.0)  # beyond: |Δ| > 4
    assert "1 of 3 changes make E worse (E-table), 0 make it better (none)" in text
    assert "no single change improves E" in text


# ------------------------------------------------------------------------------------------------ command lines
def _parser(command: str):
    import argparse

    from mapdit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command, classes", [("ablate", (budgets.TrainBudget, budgets.ScoreBudget)),
                                              ("study", (budgets.StudyBudget, study.RunOptions))])
def test_ablate_and_study_options_come_from_the_budgets_and_are_all_helped(command, classes):
    from mapdit.options import options

    actions = {a.dest: a for a in _parser(command)._actions if a.option_strings and a.dest != "help"}
    for cls in classes:  # every command-line field of the dataclasses is an option, with its declared help
        for o in options(cls, cli_only=True):
            assert o.flag in actions[o.name].option_strings and o.help in actions[o.name].help, (cls, o.name)
    for action in actions.values():  # every option helped, and its default shown
        assert action.help, (command, action.option_strings)
        if action.nargs != 0 and not action.required:
            assert "default" in action.help, (command, action.option_strings)
    if command == "ablate":  # the learning-rate rule is stated once, by mapdit.config.default_lr
        assert "default_lr" in actions["lr"].help and not re.search(r"\d", actions["lr"].help)


def test_study_options_show_the_full_and_the_quick_budget():
    actions = {a.dest: a for a in _parser("study")._actions}
    assert "(default: 2000) (--quick: 80)" in actions["num_steps"].help
    assert "(default: 0,1,2) (--quick: 0)" in actions["seeds"].help  # as typed: comma-separated
    assert "--quick" not in actions["model"].help  # the same in both
    assert budgets.FULL == budgets.StudyBudget()  # the full study is the dataclass's defaults


def test_study_list_options_are_one_comma_separated_word(capsys):
    from mapdit.commands.options import given

    args = _parser("study").parse_args(["--seeds", "0,1", "--checkpoints", "5,10", "--rates", "a=1e-2/3e-2"])
    assert given(args, budgets.StudyBudget) == {"seeds": (0, 1), "checkpoints": (5, 10),
                                                "rates": {"A": (1e-2, 3e-2)}}
    for bad in (["--seeds", "0,x"], ["--checkpoints", "1,1"], ["--rates", "Q=1"]):
        assert cli("study", *bad) == 2
        assert bad[0] in only_error_line(capsys, "study")
