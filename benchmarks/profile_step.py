#!/usr/bin/env python
"""Where the demo's training step and a sampling step spend their time (issue 31, point 1).

    python benchmarks/profile_step.py --out benchmarks/results/profile-<date>.md       # ~2 min on 2 idle cores

The training step is the loop's own: `BatchSource` (Fashion-MNIST, the demo's batch 32, label dropout, t and
noise), then `mapdit.step.train_step` (forced weight normalisation, the IDDPM loss with its variational term
and Min-SNR-5, backward, gradient norm, fused Adam, the power EMA of two widths) on the demo's model
(DiT-XXS/4 on 28x28x1), Configs A and E, built by `setup.model_optimizer_ema` as `mapdit train` builds it.
Phases: data, forced-WN projection, forward (the loss, model included), backward, gradient norm (with the
finite check and the logged statistics), Adam, EMA update, and the loop's Python around them.

Two measurements of the same phases:
  * unprofiled: the phases' clock time over --steps steps (median per step);
  * torch.profiler over --profile-steps steps: per phase, the number of aten operators it runs and the
    share of its profiled time spent inside them (self time of aten ops) rather than outside (Python, the
    dispatcher, the autograd engine, optimizer bookkeeping). The profiler adds a few µs per operator, so the
    share outside is an upper bound.
Sampling: one dpm++2m step of the demo's grid settings (guidance 4: one doubled batch per step) on --sample-batch
images, split into the model's forward and the rest (guidance arithmetic and the scheduler).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench import Report  # the markdown report of bench.py
from mapdit.config import TrainConfig, make_config
from mapdit.data import IndexStream, load_dataset
from mapdit.demo import DEMO_BATCH, DEMO_CFG, DEMO_LR, DEMO_MIN_SNR_GAMMA, DEMO_MODEL
from mapdit.diffusion import make_diffusion
from mapdit.distributed import Dist
from mapdit.model import DiT
from mapdit.samplers import SamplerSpec, sample
from mapdit.setup import model_optimizer_ema
from mapdit.step import BatchSource, train_step

# phase -> the row it is reported as (nested phases are reported exclusive of their children)
ROWS = {"data": "data (BatchSource)", "weight_projection": "forced-WN projection",
        "forward": "forward (loss, model included)", "forward_backward": "backward (and zero_grad)",
        "optimizer_ema": "gradient norm, finite check, stats", "adam": "Adam (fused)", "ema": "EMA update (2 widths)",
        "loop": "loop Python outside the phases"}
PARENT = {"forward": "forward_backward", "adam": "optimizer_ema", "ema": "optimizer_ema"}
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


class Phases:
    """Nested named phases: accumulates each one's exclusive clock time, and marks it for the profiler."""

    def __init__(self, clock):
        self.clock, self.totals, self.stack = clock, defaultdict(float), []

    @contextlib.contextmanager
    def __call__(self, name: str):
        with torch.profiler.record_function(f"phase:{name}"):
            start = self.clock()
            self.stack.append(0.0)  # time spent in children
            try:
                yield
            finally:
                children = self.stack.pop()
                total = self.clock() - start
                self.totals[name] += total - children
                if self.stack:
                    self.stack[-1] += total


class Ranged:
    """`obj` with `method` run inside phase `name` (the loss, Adam's step, the EMA update)."""

    def __init__(self, obj, method: str, name: str, phases: Phases):
        self._obj, self._method, self._name, self._phases = obj, method, name, phases

    def __getattr__(self, attr):
        value = getattr(self._obj, attr)
        if attr != self._method:
            return value

        def run(*args, **kwargs):
            with self._phases(self._name):
                return value(*args, **kwargs)
        return run


class DemoStep:
    """The demo's training set-up for one preset; `run(step)` is one loop iteration. Returns its clock time."""

    def __init__(self, preset: str, data, clock, seed: int = 0):
        self.cfg = make_config(DEMO_MODEL, preset=preset, input_size=28, in_channels=1, num_classes=10)
        self.tc = TrainConfig(batch_size=DEMO_BATCH, lr=DEMO_LR, min_snr_gamma=DEMO_MIN_SNR_GAMMA, seed=seed)
        self.model, self.params, opt, ema = model_optimizer_ema(self.cfg, self.tc, torch.device("cpu"))
        self.model.train()
        self.diffusion = make_diffusion(self.cfg.num_train_steps, learn_sigma=self.cfg.learn_sigma)
        stream = IndexStream(len(data), self.tc.batch_size, self.tc.seed, 0, 1)
        self.source = BatchSource(data, stream, self.tc, Dist(), self.diffusion.num_timesteps, self.cfg.null_class,
                                  self.cfg.class_dropout_prob)
        self.clock = clock
        self.phases = Phases(clock)
        self.opt = Ranged(opt, "step", "adam", self.phases)
        self.ema = Ranged(ema, "update", "ema", self.phases)
        self.loss = Ranged(self.diffusion, "training_losses", "forward", self.phases)
        self.step = 0

    def run(self) -> float:
        self.step += 1
        start = self.clock()
        with self.phases("loop"):  # exclusive of the phases inside: the loop's own Python
            with self.phases("data"):
                batch = self.source(self.step)
            train_step(self.model, self.model, self.loss, self.opt, self.ema, self.params, batch, self.step,
                       min_snr_gamma=self.tc.min_snr_gamma, phase=self.phases)
        return self.clock() - start


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")


def op_class(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    return "other"


def profile_phases(fn, steps: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Over `steps` calls of fn under torch.profiler, per call: {phase: {"ops": s, "outside": s, "count": n}},
    exclusive of nested phases, and {phase: {op class or op name: self seconds}} for the aten ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    out = defaultdict(lambda: {"ops": 0.0, "outside": 0.0, "count": 0})
    by_op = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("phase:"):
            parent = parent.cpu_parent
        if ev.name.startswith("phase:"):
            name = ev.name[6:]
            out[name]["outside"] += ev.cpu_time_total / 1e6  # minus children phases and ops, below
            if parent is not None:
                out[parent.name[6:]]["outside"] -= ev.cpu_time_total / 1e6
        elif ev.name.startswith("aten::") and parent is not None:
            name, self_s = parent.name[6:], ev.self_cpu_time_total / 1e6
            out[name]["ops"] += self_s
            out[name]["outside"] -= self_s
            out[name]["count"] += 1
            by_op[name]["class:" + op_class(ev.name)] += self_s
            by_op[name][ev.name] += self_s
    scale = 1.0 / steps
    return ({k: {kk: vv * scale for kk, vv in v.items()} for k, v in out.items()},
            {k: {kk: vv * scale for kk, vv in v.items()} for k, v in by_op.items()})


def training_table(rep, args, data, clock) -> dict[str, float]:
    steps = {p: DemoStep(p, data, clock, args.seed) for p in args.configs}
    for s in steps.values():
        for _ in range(args.warmup):
            s.run()
        s.phases.totals.clear()
    times = {p: [] for p in steps}
    for _ in range(args.steps):  # interleaved, so that load hits every config alike
        for p, s in steps.items():
            times[p].append(s.run())
    totals = {p: dict(s.phases.totals) for p, s in steps.items()}  # before the profiled steps add to them
    prof, classes = {}, {}
    for p, s in steps.items():
        prof[p], classes[p] = profile_phases(s.run, args.profile_steps)
    rep(f"### Training step: the demo's model ({DEMO_MODEL}, 28x28x1), batch {DEMO_BATCH}")
    rep()
    header = ["phase"]
    for p in steps:
        header += [f"{p} ms", f"{p} share", f"{p} aten ops", f"{p} in ops (profiled)"]
    rows = []

    def in_ops(pr: dict) -> str:
        total = pr["ops"] + pr["outside"]
        return f"{100 * pr['ops'] / total:.0f} %" if total > 0 else ""

    for key, label in ROWS.items():
        row = [label]
        for p, s in steps.items():
            ms = 1e3 * totals[p].get(key, 0.0) / args.steps
            step_ms = 1e3 * sum(times[p]) / args.steps
            pr = prof[p].get(key, {"ops": 0.0, "outside": 0.0, "count": 0})
            row += [f"{ms:.1f}", f"{100 * ms / step_ms:.1f} %", f"{pr['count']:.0f}", in_ops(pr)]
        rows.append(row)
    total = ["whole step (median)"]
    for p in steps:
        summed = {k: sum(v[k] for v in prof[p].values()) for k in ("ops", "outside", "count")}
        total += [f"{1e3 * statistics.median(times[p]):.1f}", "100 %", f"{summed['count']:.0f}", in_ops(summed)]
    rows.append(total)
    rep.table(header, rows)
    rep("Inside forward and backward (profiled self time of aten ops): matmuls, attention, everything else; "
        "and the five costliest other operators.")
    rep()
    rows = []
    for p in steps:
        for key in ("forward", "forward_backward"):
            ops = classes[p].get(key, {})
            total = sum(v for k, v in ops.items() if k.startswith("class:")) or 1.0
            top = sorted(((v, k) for k, v in ops.items() if not k.startswith("class:") and op_class(k) == "other"),
                         reverse=True)[:5]
            rows.append([p, ROWS[key].split(" (")[0]] + [f"{100 * ops.get('class:' + c, 0.0) / total:.0f} %"
                                                         for c in ("matmul", "attention", "other")]
                        + [", ".join(f"{k[6:]} {100 * v / total:.0f} %" for v, k in top)])
    rep.table(["config", "phase", "matmul", "attention", "other", "costliest other ops"], rows)
    medians = {p: statistics.median(t) for p, t in times.items()}
    if "A" in medians and "E" in medians:
        ratios = [e / a for e, a in zip(times["E"], times["A"])]
        rep(f"E ÷ A, whole loop iteration, paired per step: median {statistics.median(ratios):.3f} "
            f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f}).")
        rep()
    return medians


def sampling_table(rep, args, clock) -> None:
    rep(f"### Sampling: dpm++2m, guidance {DEMO_CFG} (one doubled batch per step), {args.sample_batch} images, "
        f"{args.sample_steps} steps")
    rep()
    rows = []
    for preset in args.configs:
        cfg = make_config(DEMO_MODEL, preset=preset, input_size=28, in_channels=1, num_classes=10)
        torch.manual_seed(args.seed)
        model = DiT(cfg).eval()
        phases = Phases(clock)

        def model_fn(x, t, y):
            with phases("model"):
                return model(x, t, y)

        y = torch.arange(args.sample_batch) % cfg.num_classes
        spec = SamplerSpec("dpm++2m", args.sample_steps, DEMO_CFG)

        def run():
            with torch.no_grad(), phases("loop"):
                sample(model_fn, shape=(args.sample_batch, 1, 28, 28), y=y, spec=spec, null_class=cfg.null_class,
                       generator=torch.Generator().manual_seed(0), num_train_steps=cfg.num_train_steps,
                       learn_sigma=cfg.learn_sigma, clip_denoised=True)

        run()
        phases.totals.clear()
        start = clock()
        reps = max(1, args.sample_reps)
        for _ in range(reps):
            run()
        total = (clock() - start) / (reps * args.sample_steps)
        model_s = phases.totals["model"] / (reps * args.sample_steps)
        pr, _ = profile_phases(run, 1)
        n = args.sample_steps
        m = pr.get("model", {"ops": 0, "outside": 0, "count": 0})
        rest = pr.get("loop", {"ops": 0, "outside": 0, "count": 0})
        rows.append([preset, f"{1e3 * total:.1f}", f"{1e3 * model_s:.1f} ({100 * model_s / total:.0f} %)",
                     f"{m['count'] / n:.0f}", f"{100 * m['ops'] / max(1e-12, m['ops'] + m['outside']):.0f} %",
                     f"{1e3 * (total - model_s):.1f}", f"{rest['count'] / n:.0f}",
                     f"{args.sample_batch / (total * n):.1f}"])
    rep.table(["config", "ms per sampling step", "model forward ms", "model: aten ops", "model: in ops (profiled)",
               "guidance + scheduler ms", "guidance + scheduler: aten ops", "images/s"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="A,E", help="comma-separated presets")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per config (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=5, help="training steps under torch.profiler per config")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-reps", type=int, default=2, help="timed sampling runs per config")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall clock, or the calling thread's CPU time (with --threads 1: robust on a shared machine)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    args.configs = args.configs.split(",")
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread needs --threads 1")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the training loop
    clock = CLOCKS[args.clock]
    data = load_dataset(args.data, patch_size=4)

    rep = Report()
    rep("## Profile of the demo's training and sampling steps")
    rep()
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    rep(f"- command: `python benchmarks/profile_step.py {argv_text}`")
    rep(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads of {os.cpu_count()} logical CPUs; {args.clock} clock; load average "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3]) if Path('/proc/loadavg').exists() else 'n/a'}")
    rep()
    training_table(rep, args, data, clock)
    sampling_table(rep, args, clock)
    if args.out:
        Path(args.out).write_text("\n".join(rep.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
