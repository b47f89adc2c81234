"""`mapdit study`: the paper's claims judged on samples, on Fashion-MNIST, in one resumable command; RESULTS.md.

Every run gets the same budget (`StudyBudget` FULL in mapdit.experiments.budgets: the demo's DiT-XXS/4, batch
32 and Min-SNR-5 loss weighting, for 2000 steps) and is scored the same way: FD_fmnist and conditioning
accuracy of 1000 samples from the EMA of width 0.10 (the default sampler, DPM-Solver++(2M) at 20 steps,
guidance 4 on every channel), and the held-out eps-MSE (`mapdit.evaluate.heldout`, same EMA). Each config is
judged at its own best learning rate.

Parts (`--studies`, all by default, run in this order):

    rates       each config A-E at every rate of its bracket (budgets.RATES), seed 0; a non-finite loss is
                recorded as "diverged at step N". best_rate(): the lowest FD of the finished runs (ties:
                higher accuracy)
    components  Config E at E's best rate with one thing changed: each of the eight MP options off
                (E-<option>), upstream's learned timestep table (E-table), the unit-RMS sinusoid
                (E-mp-sinusoid), upstream's SiLU (E-silu); each differs from E in exactly one ModelConfig field
    modulation  Config E at its best rate with per-modulator gains and adaln, scale, shift, rotate,
                scale+rotate (paper Table 2; E-pm-<modulation>, adaln a run of its own)
    seeds       every seed of the budget for the arms of the headline comparisons (budgets.COMPARISONS):
                A-best vs E-best, E vs E-table, E-pm-scale+rotate vs E-pm-adaln; paired differences, verdicts
    magnitudes  the paper's Figure 5: residual-stream RMS per block of A-best and E-best at the kept checkpoints
    grid        samples of A-best next to E-best (scoring sampler, guidance and EMA)

A part after `rates` needs best rates: it refuses (one line, exit 2) until `rates` has finished for the
configs it needs. Runs are shared between parts: a run is (arm, rate, seed) and lives in one folder, so
E at its best rate, seed 0, is trained once by `rates` and reused by every later part.

Out folder (--out, default results/study):
    study.json                         the budget and the command; a rerun with another budget is refused,
                                       except one that only adds rates to brackets (widening one whose best
                                       rate sat at its edge)
    runs/<arm>/lr<rate>/               one `mapdit ablate` folder per arm and rate: runs/, results/, diverged/
    magnitudes/residual_per_block.png, grid/A_vs_E.png
Every scored run keeps its samples (RUN/eval/samples-*.npz) so another metric can re-score the same images.
Resumable: finished runs (result JSON) are skipped, interrupted ones continue, diverged ones stay recorded.
`--workers 2` trains two runs at once, one thread each (on 2 cores ~1.25x the runs per hour: the demo model
is too small to keep two threads busy); the results are those of 1-thread runs.

RESULTS.md (default: inside --out) is regenerated from the stored results at the end of every invocation (also
`--report-only`) by mapdit.experiments.results; its PNGs are linked where they are, or copied to --docs-dir.
Its first line names the study that wrote it: a file that another study or a person wrote is never replaced
(one line, exit 2, before any run trains), so updating the repository's RESULTS.md is an explicit
`--results-md RESULTS.md --docs-dir docs/results` with `--out benchmarks/results/study`.

SIGTERM/Ctrl-C: the run under way checkpoints and stops (as `mapdit train`), or, between runs, the next one does
not start; nothing unfinished is scored, the command exits 0 with a line saying how to continue, and the same
command continues the stopped run. A second signal stops at once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mapdit import signals
from mapdit.config import TrainConfig
from mapdit.errors import Diverged, Stopped, UserError
from mapdit.evaluate.fid import default_cache_dir
from mapdit.evaluate.magnitudes import attention_entropy_for_run
from mapdit.evaluate.scoring import DEFAULT_CACHE
from mapdit.experiments import ablate
from mapdit.experiments.ablate import RunStopped
from mapdit.experiments.budgets import (
    BASE_ARMS,
    COMPARISONS,
    CONFIGS,
    FULL,
    MODULATIONS,
    PARTS,
    QUICK,
    Arm,
    StudyBudget,
    arm_by_name,
    component_arms,
    modulation_arms,
)
from mapdit.experiments.results import (
    best_rates,
    check_report_targets,
    class_rows,
    heldout_error,
    lr_tag,
    magnitude_curves,
    plot_magnitudes,
    read_study_meta,
    run_folder,
    run_record,
    scored_samples,
    side_by_side,
    write_results_md,
)
from mapdit.log import Logger
from mapdit.options import opt
from mapdit.runio import check_writable, write_json
from mapdit.sample import save_png
from mapdit.samplers import check_sampler

# Cost model of the plan printed at the start (2 cores): the demo model trains ~220 images/s, i.e. ~3.5
# steps/s of batch 64 (measured 2026-12-01: 4000 steps of batch 32 in 8.4-9.5 min, docs/recipe.md); sampling
# costs about one forward image per 1/600 s (the training step's rate of image forwards, forward + backward
# counted as three), plus ~20 s per run for loading, held-out error and magnitudes.
STEPS_PER_S_AT_64 = 3.5
FORWARD_IMAGES_PER_S = 600.0
SCORING_OVERHEAD_S = 20.0
# `--workers 2` on 2 cores: two 1-thread runs at once finish 1.25-1.28x the runs per hour of one 2-thread run
# at a time (measured 2026-12-01, 300 steps of batch 32, Config E and A: the demo model is too small to keep
# two threads busy, docs/recipe.md "Speed"; the full study on idle cores 2026-12-02: 1.4x, 5.2 min per 2-thread
# run against 7.2-7.6 min per pair of 1-thread runs, training and scoring)
TWO_WORKER_SPEEDUP = 1.25


@dataclass(frozen=True)
class RunOptions:
    """How the runs are executed: nothing here changes a result (not part of the budget). The fields declared
    with `opt` are also the study's command-line options."""

    ema_snapshots: int = opt(10, "EMA snapshots per tracked width of each run (0: none)")
    log_every: int = opt(50, "a metrics.csv row every N steps of each run")
    sample_batch_size: int = opt(250, "samples per sampling batch of the scoring")
    magnitude_batch_size: int = opt(64, "images per batch of the magnitude measurement")
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    cache_dir: str | Path | None = opt(None, "reference statistics cache (default: $MAPDIT_CACHE/fid-stats, else "
                                       "~/.cache/mapdit/fid-stats)", parse=str)
    progress: bool = True
    log: Callable[[str], None] | None = None


def _check_options(opts: RunOptions) -> None:
    for flag, value, least in (("--ema-snapshots", opts.ema_snapshots, 0), ("--log-every", opts.log_every, 1),
                               ("--sample-batch-size", opts.sample_batch_size, 1),
                               ("--magnitude-batch-size", opts.magnitude_batch_size, 1)):
        if value < least:
            raise UserError(f"{flag} {value}: give a whole number of at least {least}")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train_arm(out: Path, arm: Arm, lr: float, seeds: list[int], budget: StudyBudget, say,
              opts: RunOptions = RunOptions(), heldout: bool = False) -> dict:
    """Train and score (arm, lr) for `seeds` with `run_ablation` (finished seeds are skipped); a non-finite
    loss is recorded as diverged (and not retried), any other error stops the study. With `heldout`, each
    new run's held-out error and attention entropy are computed (and cached) right away, so that
    --report-only stays fast and needs no checkpoint."""
    folder = run_folder(out, arm.name, lr)
    train = budget.train_budget(lr, ema_snapshots=opts.ema_snapshots, log_every=opts.log_every)
    score = budget.score_budget(sample_batch_size=opts.sample_batch_size,
                                magnitude_batch_size=opts.magnitude_batch_size)
    trained, skipped, diverged = [], [], []
    for s in seeds:
        name = f"{arm.name}-seed{s}"
        record = folder / "diverged" / f"{name}.json"
        tag = f"{arm.name} at {lr:g}"
        if record.is_file():
            say(f"{tag}: seed {s} skipped, diverged before ({record})")
            diverged.append(f"{lr_tag(lr)}/{name}")
            continue
        if run_record(out, arm, lr, s, num_steps=budget.num_steps)["status"] == "finished":  # e.g. by an earlier part
            say(f"{tag}: seed {s} skipped, already finished ({folder / 'results'})")
            skipped.append(f"{arm.name}/{lr_tag(lr)}/{name}")
            continue
        try:
            summary = ablate.run_ablation(train, score, configs=[arm.config], modulations=[arm.modulation],
                                          seeds=[s], out=folder, overrides=dict(arm.overrides), device=opts.device,
                                          cache_dir=opts.cache_dir, progress=opts.progress, log=opts.log)
        except RunStopped as err:  # which run of the study
            raise RunStopped(f"{tag}: {err.what}") from None
        except Diverged as err:
            write_json(record, {"name": name, "arm": arm.name, "config": arm.config, "modulation": arm.modulation,
                                "overrides": arm.overrides, "seed": s, "lr": lr,
                                "diverged_at_step": err.step, "message": str(err)})
            say(f"{tag}: seed {s} diverged at step {err.step} (recorded in {record})")
            diverged.append(f"{lr_tag(lr)}/{name}")
            continue
        trained += [f"{arm.name}/{lr_tag(lr)}/{n}" for n in summary.get("trained", [])]
        skipped += [f"{arm.name}/{lr_tag(lr)}/{n}" for n in summary.get("skipped", [])]
        for result in summary.get("results", []) if heldout else []:  # cached now: RESULTS.md needs no checkpoint
            heldout_error(result.get("run_dir"), budget.ema_std, budget.heldout_images)
            attention_entropy_for_run(result["run_dir"], weights="ema", ema_std=budget.ema_std)
    return {"trained": trained, "skipped": skipped, "diverged": diverged}


# A worker's state: the study's pid, whether a run is under way, whether the study asked it to stop
_WORKER = {"parent": None, "busy": False, "stop": False}
# The study asks a worker to stop with this signal, and it is also the worker's parent-death signal: the
# kernel sends that once per exiting thread of the study, so a worker must count it once (SIGTERM itself
# twice is train()'s "second signal: stop now", which writes no checkpoint)
STOP_SIGNAL = signal.SIGUSR1


def _worker_init(threads: int, parent: int) -> None:
    """A worker process of `--workers`: its share of the cores, denormals flushed like the CLI's, and its own
    session, so that a Ctrl-C or a signal to the study's process group reaches the study alone, which asks
    each worker once (STOP_SIGNAL). On Linux the study's death sends STOP_SIGNAL too: a `kill -9` of the study
    would otherwise leave its runs training on, orphaned. SIGTERM/SIGINT sent to the worker itself are held
    (mapdit.signals) as under `mapdit`: a run under way checkpoints and stops."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    _WORKER["parent"] = parent
    with contextlib.suppress(OSError):
        os.setsid()
    signals.hold()
    signal.signal(STOP_SIGNAL, _worker_stop)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, STOP_SIGNAL)
    if os.getppid() != parent:  # the study died before prctl took effect: nothing started yet
        os._exit(0)


def _worker_stop(signum, frame) -> None:
    """STOP_SIGNAL in a worker: the first one stops the run under way at its next step (train() takes the SIGTERM
    it raises; between training and the next run it is held) and no further run starts; later ones change
    nothing. A worker whose study is gone exits once no run is under way."""
    if not _WORKER["stop"]:
        _WORKER["stop"] = True
        if _WORKER["busy"]:
            signal.raise_signal(signal.SIGTERM)
    if not _WORKER["busy"] and os.getppid() != _WORKER["parent"]:
        os._exit(0)


def _worker_run(out: Path, arm: Arm, lr: float, seed: int, budget: StudyBudget, opts: RunOptions) -> dict:
    """One (arm, rate, seed) in a worker process; its lines go to stderr with the worker's pid. A worker
    asked to stop starts no run; one whose study died exits after the run under way has stopped."""
    if _WORKER["stop"]:
        raise RunStopped(f"{arm.name} at {lr:g}: seed {seed} not started")
    say = Logger(sink=lambda line: print(line, file=sys.stderr, flush=True), prefix=f"study[{os.getpid()}]: ")
    _WORKER["busy"] = True
    try:
        return train_arm(out, arm, lr, [seed], budget, say, opts, heldout=True)
    finally:
        _WORKER["busy"] = False
        if _WORKER["parent"] is not None and os.getppid() != _WORKER["parent"]:
            sys.stderr.flush()
            os._exit(0)  # nobody collects results or sends runs any more


class _Workers:
    """`--workers N`: runs trained N at a time in spawned processes of cores/N threads each. A run is
    submitted once per invocation (parts share runs); a failed run stops the study after the running ones.
    A signal to the study asks each worker once to stop (`stop`); `wait` then collects the stopped runs."""

    def __init__(self, n: int, out: Path, budget: StudyBudget, opts: RunOptions, say):
        threads = max(1, torch.get_num_threads() // n)
        # spawn, not fork: a forked child of a process whose OpenMP pool is started can hang
        self.pool = concurrent.futures.ProcessPoolExecutor(
            n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(threads, os.getpid()))
        self.out, self.budget = out, budget
        # what a worker receives is pickled: the DEFAULT_CACHE sentinel would arrive as another object
        cache = default_cache_dir() if opts.cache_dir is DEFAULT_CACHE else opts.cache_dir
        self.opts = dataclasses.replace(opts, log=None, progress=False,  # N bars on one terminal would garble
                                        cache_dir=cache)
        self.say = say
        self.pending: dict[concurrent.futures.Future, str] = {}  # future -> part
        self.submitted: dict[tuple, str] = {}  # (arm, rate, seed) -> part

    def _pids(self) -> list[int]:
        return list((getattr(self.pool, "_processes", None) or {}).keys())

    def stop(self, signum: int | None = None) -> None:
        """Ask every worker once to stop (called in the study's signal handler: it only sends signals)."""
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, STOP_SIGNAL)

    def submit(self, part: str, arm: Arm, lr: float, seed: int) -> str | None:
        """Queue a run; None, or the part that already queued it."""
        key = (arm.name, lr, seed)
        if key in self.submitted:
            return self.submitted[key]
        self.submitted[key] = part
        future = self.pool.submit(_worker_run, self.out, arm, lr, seed, self.budget, self.opts)
        future.add_done_callback(lambda f: self._failed(f, f"{arm.name} at {lr:g}, seed {seed}"))
        self.pending[future] = part
        return None

    def _failed(self, future: concurrent.futures.Future, what: str) -> None:
        """A run failed: say so now and start no other run (the study stops once the running ones end)."""
        if future.cancelled() or future.exception() is None or isinstance(future.exception(), Stopped):
            return
        self.say(f"{what} failed ({type(future.exception()).__name__}: {future.exception()}); no further run "
                 "starts, the study stops when the runs under way end")
        for other in list(self.pending):
            other.cancel()

    def busy_with(self, part: str) -> bool:
        return part in self.pending.values()

    def wait(self, summaries: dict[str, dict], after_each: Callable[[], None] = lambda: None) -> None:
        """Wait for every queued run; add what each did to its part's summary, then call `after_each`. After a
        signal: the runs not started are cancelled, the stopped ones collected, and `RunStopped` says which."""
        stopped = []
        try:
            for future in concurrent.futures.as_completed(list(self.pending)):
                if signals.pending() is not None:
                    for other in self.pending:
                        other.cancel()  # those not handed to a worker yet
                if future.cancelled():  # after another run failed or a signal: raised below
                    continue
                if isinstance(future.exception(), RunStopped):
                    stopped.append(future.exception().what)
                    continue
                got = future.result()  # a worker's error is raised here
                for k in ("trained", "skipped", "diverged"):
                    summaries[self.pending[future]][k] += got[k]
                after_each()
        except KeyboardInterrupt:  # a second signal: stop now (each worker's run ends without a checkpoint)
            for pid in self._pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self.pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            self.pool.shutdown(wait=True, cancel_futures=True)
            raise
        self.pending.clear()
        asked = signals.pending()
        if stopped or asked is not None:
            under_way = [w for w in stopped if "not started" not in w]
            why = "" if asked is None else f" {signal.Signals(asked).name}"
            raise RunStopped("; ".join(under_way) or f"stopped by signal{why} between runs")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def part_runs(part: str, budget: StudyBudget, best: dict, configs=CONFIGS, components=None,
              modulations=MODULATIONS) -> list[tuple[Arm, float | None, list[int]]]:
    """(arm, rate, seeds) a part trains; rate None where the best rate is not known yet."""
    seed0 = [budget.seed0]
    if part == "rates":
        return [(BASE_ARMS[c], lr, seed0) for c in configs for lr in budget.rates[c]]
    if part == "components":
        arms = component_arms()
        return [(arms[n], best.get("E"), seed0) for n in (components or list(arms))]
    if part == "modulation":
        return [(a, best.get("E"), seed0) for a in modulation_arms(modulations).values()]
    if part == "seeds":
        names = list(dict.fromkeys(n for _, x, y in COMPARISONS for n in (x, y)))
        return [(arm_by_name(n), best.get(arm_by_name(n).config), list(budget.seeds)) for n in names]
    return []


def _needs(part: str) -> tuple[str, ...]:
    return {"components": ("E",), "modulation": ("E",), "seeds": ("A", "E"), "magnitudes": ("A", "E"),
            "grid": ("A", "E")}.get(part, ())


def run_seconds(budget: StudyBudget) -> float:
    """Estimated seconds of one run (training and scoring) on 2 cores, from the cost model above."""
    steps_per_s = STEPS_PER_S_AT_64 * 64 / budget.batch_size
    evals = budget.fid_samples * budget.sampling_steps * (2 if budget.cfg_scale != 1 else 1)
    return budget.num_steps / steps_per_s + evals / FORWARD_IMAGES_PER_S + SCORING_OVERHEAD_S


def plan(out: Path, budget: StudyBudget, parts, configs=CONFIGS, components=None, modulations=MODULATIONS) -> dict:
    """Runs the chosen parts still have to train (shared runs counted once; where a best rate is not known
    yet, the runs of that arm are all counted, except seed 0 of a base config, which `rates` trains) and
    the estimated minutes."""
    best = best_rates(out, budget, [c for c in ("A", "E") if c in budget.rates])
    keys, finished = set(), set()
    for part in parts:
        for arm, lr, seeds in part_runs(part, budget, best, configs, components, modulations):
            for s in seeds:
                if lr is None and arm.name == arm.config and s == budget.seed0 and "rates" in parts:
                    continue  # the best rate's run of the rates part
                key = (arm.name, lr, s)
                keys.add(key)
                if lr is not None and run_record(out, arm, lr, s, num_steps=budget.num_steps)["status"] != "missing":
                    finished.add(key)
    todo = len(keys) - len(finished)
    per_run = run_seconds(budget)
    return {"runs": len(keys), "finished": len(finished), "to_train": todo, "seconds_per_run": per_run,
            "minutes": todo * per_run / 60.0}


# ------------------------------------------------------------------------------------------------
# The parts that train nothing
# ------------------------------------------------------------------------------------------------
def _magnitudes_part(out: Path, budget: StudyBudget, best: dict, say) -> dict:
    curves = magnitude_curves(out, budget, best)
    missing = [c for c in ("A", "E") if f"Config {c} at {best[c]:g}" not in curves]
    if missing:
        raise UserError(f"the magnitudes part needs the magnitudes of Config {', '.join(missing)} at the best rate "
                        "(its run has no magnitudes CSV): rerun --studies rates")
    path = plot_magnitudes(curves, budget.checkpoints, out / "magnitudes" / "residual_per_block.png")
    say(f"magnitudes -> {path}")
    return {"trained": ["magnitudes"], "skipped": []}


def _grid_part(out: Path, budget: StudyBudget, best: dict, say) -> dict:
    """A-best next to E-best (seed 0): the first 8 of each class of the samples each run was scored with, so
    the grid shows the images behind the FD and accuracy (and needs no checkpoint)."""
    target = out / "grid" / "A_vs_E.png"
    panels = []
    for config in ("A", "E"):
        record = run_record(out, BASE_ARMS[config], best[config], budget.seed0, num_steps=budget.num_steps)
        npz = scored_samples(record)
        if npz is None:
            raise UserError(f"the grid part needs the scored samples of Config {config} at {best[config]:g} "
                            f"(RUN/eval/samples-*.npz): rerun --studies rates")
        png = save_png(out / "grid" / f"{config}.png", class_rows(npz, per_class=8), upscale=2)
        panels.append((f"Config {config}, lr {best[config]:g}", png,
                       f"FD {record['value']:.1f}, accuracy {record['accuracy']:.3f}"))
    side_by_side(panels, target)
    say(f"grid -> {target}")
    return {"trained": ["grid"], "skipped": []}


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
def study_budget(quick: bool = False, **given) -> StudyBudget:
    """FULL (QUICK with `quick`) with the settings given (None: the preset's); `rates` replaces the brackets
    of the configs it names."""
    base = QUICK if quick else FULL
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("min_snr_gamma") == 0:  # 0: DiT's unweighted loss
        given["min_snr_gamma"] = None
    if "rates" in given:
        given["rates"] = {**base.rates, **given["rates"]}
    return dataclasses.replace(base, **given)


def _extends(stored: dict | None, rates: dict) -> bool:
    """Whether `rates` keeps every config's stored bracket and only adds rates to it: a finished study may
    widen a bracket whose best rate sat at its edge, and its runs stay valid."""
    if not isinstance(stored, dict) or set(stored) != set(rates):
        return False
    return all({f"{r:.6g}" for r in stored[c]} <= {f"{r:.6g}" for r in rates[c]} for c in rates)


def _command(out: Path, quick: bool, parts, b: StudyBudget, configs, components, modulations) -> str:
    """Every setting spelled out: the exact command that reproduces (and resumes) this study."""
    return " ".join(["mapdit study", *(["--quick"] if quick else []), f"--out {shlex.quote(str(out))}",
                     f"--studies {','.join(parts)}", f"--model {b.model}", f"--num-steps {b.num_steps}",
                     f"--batch-size {b.batch_size}", f"--seeds {','.join(map(str, b.seeds))}",
                     f"--fd-samples {b.fid_samples}", f"--sampler {b.sampler}",
                     f"--sampling-steps {b.sampling_steps}", f"--cfg-scale {b.cfg_scale:g}",
                     f"--checkpoints {','.join(map(str, b.checkpoints))}", f"--heldout-images {b.heldout_images}",
                     "--rates " + ",".join(f"{c}={'/'.join(f'{r:g}' for r in v)}" for c, v in b.rates.items()),
                     *([f"--configs {','.join(configs)}"] if tuple(configs) != CONFIGS else []),
                     *([f"--components {','.join(components)}"] if components is not None else []),
                     *([f"--modulations {','.join(modulations)}"] if tuple(modulations) != MODULATIONS else []),
                     *([f"--num-ref {b.num_ref}"] if b.num_ref is not None else []),
                     f"--min-snr-gamma {0 if b.min_snr_gamma is None else b.min_snr_gamma:g}"])


def run_study(*, out: str | Path = "results/study", quick: bool = False, studies=PARTS, model: str | None = None,
              num_steps: int | None = None, batch_size: int | None = None, seeds: list[int] | None = None,
              fid_samples: int | None = None, sampler: str | None = None, sampling_steps: int | None = None,
              cfg_scale: float | None = None, checkpoints: list[int] | None = None, heldout_images: int | None = None,
              rates: dict[str, list[float]] | None = None, configs=CONFIGS, components: list[str] | None = None,
              modulations=MODULATIONS, num_ref: int | None = None, min_snr_gamma: float | None = None,
              opts: RunOptions | None = None,
              workers: int = 1, progress: bool = True, results_md: str | Path | bool | None = True,
              docs_dir: str | Path | None = None, command: str | None = None) -> dict:
    """Run the chosen parts (skipping what is finished) and regenerate RESULTS.md (True: `out`/RESULTS.md; None:
    none; an existing file that this study did not write is refused before any work) with its figures linked
    in `out`, or copied to `docs_dir`; `workers` > 1 trains that many runs at once (a part waits for `rates`
    only where it needs the best rates). Returns {"studies": {part: {"trained", "skipped", "diverged"}},
    "plan": plan(), "results_md": path or None}."""
    out = Path(out)
    report = results_md is not None and results_md is not False
    results_md = None if results_md is True else results_md
    opts = opts or RunOptions(progress=progress)
    b = study_budget(quick, model=model, num_steps=num_steps, batch_size=batch_size, seeds=seeds,
                     fid_samples=fid_samples, sampler=sampler, sampling_steps=sampling_steps, cfg_scale=cfg_scale,
                     checkpoints=checkpoints, heldout_images=heldout_images, rates=rates, num_ref=num_ref,
                     min_snr_gamma=min_snr_gamma)
    b.check()  # every setting a run would reject, before study.json stores it or any run trains
    _check_options(opts)
    check_sampler(b.sampler)  # before any training: an unknown name or a missing diffusers fails now
    if f"{b.ema_std:.3f}" not in {f"{w:.3f}" for w in TrainConfig().ema_stds}:
        raise UserError(f"the scoring EMA width {b.ema_std} is not tracked by training "
                        f"({TrainConfig().ema_stds}): it would be a post-hoc reconstruction")
    if b.min_snr_gamma is not None and not b.min_snr_gamma > 0:
        raise UserError(f"--min-snr-gamma {b.min_snr_gamma}: give a positive gamma (e.g. 5), or 0 for DiT's "
                        "unweighted loss")
    if workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more runs at a time")
    unknown = [s for s in studies if s not in PARTS]
    if unknown or not studies:
        raise UserError(f"--studies: use some of {', '.join(PARTS)} (got {', '.join(studies) or 'none'})")
    if [c for c in configs if c not in CONFIGS] or not configs:
        raise UserError(f"--configs: use some of {', '.join(CONFIGS)}")
    all_components = component_arms()
    if components is not None and [c for c in components if c not in all_components]:
        raise UserError(f"--components: use some of {', '.join(all_components)}")
    if [m for m in modulations if m not in MODULATIONS] or "adaln" not in modulations:
        raise UserError(f"--modulations: use some of {', '.join(MODULATIONS)}, adaln included (the reference)")
    if b.checkpoints[-1] != b.num_steps or b.checkpoints[0] < 1:
        raise UserError(f"--checkpoints {list(b.checkpoints)}: positive steps, the last one the run's "
                        f"{b.num_steps} steps")
    bad_rates = any(not v or not all(0 < r < 1 for r in v) for v in b.rates.values())
    if bad_rates or [c for c in b.rates if c not in CONFIGS]:
        raise UserError(f"--rates {b.to_dict()['rates']}: each of {', '.join(CONFIGS)} needs rates in (0, 1)")
    check_writable(out, "--out", "pass another --out")
    if report:  # where the report goes: writable, and not a file someone else wrote
        results_md, docs_dir = check_report_targets(out, results_md, docs_dir)
    meta_path = out / "study.json"
    old = read_study_meta(out)  # a study.json edited into another shape: one line, before any run trains
    settings = b.to_dict()
    if old:
        stored = old.get("settings", {})
        differ = [k for k in settings if stored.get(k) != settings[k]
                  and not (k == "rates" and _extends(stored.get(k), settings[k]))]
        if differ:
            raise UserError(f"{out} holds a study with other settings ({', '.join(differ)} differ): use another --out")
    parts = [p for p in PARTS if p in studies]
    command = command or _command(out, quick, parts, b, configs, components, modulations)
    elapsed_before = old.get("elapsed_s", 0.0)
    started = time.perf_counter()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    machine = f"{platform.machine() or '?'} {platform.processor() or ''}".strip()
    meta = {"settings": settings, "quick": quick, "command": command, "elapsed_s": elapsed_before,
            "started": old.get("started", today), "updated": today,
            "machine": f"{machine}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    write_json(meta_path, meta)
    say = Logger(sink=opts.log or (lambda line: print(line, file=sys.stderr)), prefix="study: ")
    opts = dataclasses.replace(opts, cache_dir=DEFAULT_CACHE if opts.cache_dir is None else opts.cache_dir)

    the_plan = plan(out, b, parts, configs, components, modulations)
    speedup = TWO_WORKER_SPEEDUP if workers > 1 else 1.0
    say(f"plan: parts {', '.join(parts)}; {the_plan['runs']} runs, {the_plan['finished']} already finished, "
        f"{the_plan['to_train']} to train and score, about {the_plan['minutes'] / speedup:.0f} min on 2 idle cores "
        f"(~{the_plan['seconds_per_run'] / 60:.1f} min per run: {STEPS_PER_S_AT_64:g} steps/s at batch 64 and "
        f"{b.fid_samples} samples of {b.sampling_steps} steps"
        + (f"; {workers} runs at a time, ~{speedup:g}x the runs per hour on 2 cores)" if workers > 1 else ")"))
    pool = _Workers(workers, out, b, opts, say) if workers > 1 else None
    done: dict[str, dict] = {}

    def save_time() -> None:  # after every run, so that a killed invocation loses at most one run's time
        write_json(meta_path, dict(meta, elapsed_s=elapsed_before + time.perf_counter() - started))

    try:
        with contextlib.ExitStack() as held:
            held.enter_context(signals.held())  # a no-op under `mapdit`, which holds them from its start
            if pool is not None:
                held.enter_context(signals.on_first(pool.stop))  # each worker is asked once, right away
            for part in parts:
                say(f"{part} ...")
                if pool is not None and (_needs(part) and pool.busy_with("rates") or part in ("magnitudes", "grid")):
                    say("waiting for the runs under way (this part needs them finished)")
                    pool.wait(done, save_time)
                best = best_rates(out, b, _needs(part), part) if _needs(part) else {}
                done[part] = summary = {"trained": [], "skipped": [], "diverged": []}
                for arm, lr, part_seeds in part_runs(part, b, best, configs, components, modulations):
                    if pool is None:
                        for s in part_seeds:
                            got = train_arm(out, arm, lr, [s], b, say, opts, heldout=True)
                            for k in summary:
                                summary[k] += got[k]
                            save_time()
                        continue
                    for s in part_seeds:
                        if signals.pending() is not None:
                            pool.wait(done, save_time)  # raises RunStopped
                        queued_by = pool.submit(part, arm, lr, s)
                        if queued_by is not None:
                            summary["skipped"].append(f"{arm.name}/{lr_tag(lr)}/{arm.name}-seed{s}")
                            say(f"{arm.name} at {lr:g}: seed {s} skipped, already queued by part {queued_by}")
                if part == "magnitudes":
                    done[part] = {**summary, **_magnitudes_part(out, b, best, say)}
                elif part == "grid":
                    done[part] = {**summary, **_grid_part(out, b, best, say)}
                elif part == "rates":
                    if pool is not None:
                        pool.wait(done, save_time)
                    found = best_rates(out, b, configs)
                    say("best rates: " + ", ".join(f"{c} {'-' if r is None else f'{r:g}'}" for c, r in found.items()))
                save_time()
            if pool is not None:
                pool.wait(done, save_time)
    except RunStopped as err:  # a run checkpointed and stopped, or a signal came between runs
        save_time()
        raise Stopped(f"{err.what}; continue with: {command}") from None
    finally:
        if pool is not None:
            pool.close()
    md = None
    if report:
        md = write_results_md(out, results_md, docs_dir, components, modulations)
        say(f"results -> {md}")
    save_time()
    return {"studies": done, "plan": the_plan, "results_md": md}
