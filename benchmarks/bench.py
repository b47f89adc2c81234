#!/usr/bin/env python
"""Speed benchmarks of mapdit: training steps, FLOP/s against the machine's matmul, where the time goes,
scaling, sampling, memory. Plain Python; every comparison is measured side by side in one run.

    python benchmarks/bench.py --quick                  # a few minutes
    python benchmarks/bench.py --out BENCHMARKS.tables.md   # the full suite (tens of minutes on 2 cores)

Method. All configurations of a table are built first; after warm-up steps they are run in rounds, each
round running every configuration once (the order rotated from round to round), so that a change in the
machine's load hits them alike. A table reports the median over rounds with the min-max range, and ratios
are taken per round (the configuration's time over its reference's time in the same round) and then
summarised by their median and range. The training step is the training loop's real step
(`mapdit.step.train_step`): forced weight normalisation (`model.project_weights_()`), `diffusion.training_losses`,
backward, the gradient norm (`get_total_norm`, foreach), fused `Adam`, and the power-EMA update of two widths.
Data are synthetic tensors of the right shape (the data loader is not timed).

`torch.set_flush_denormal(True)` is set first, as the training loop does: on the CPU, denormal floats
(tiny Adam moments, zero-initialised layers) make every elementwise operator ~10x slower; without it
Config A's step ran 10x slower.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mapdit.config import make_config
from mapdit.demo import DEMO_MODEL
from mapdit.diffusion import make_diffusion
from mapdit.ema import PowerEMA
from mapdit.fused import reference_math
from mapdit.model import DiT
from mapdit.step import Batch, train_step

# The demo's model (`mapdit demo`: the recipe fmnist-cpu, mapdit.recipes) on Fashion-MNIST 28x28x1, at its batch 32.
DEMO = dict(model=DEMO_MODEL, preset="E", input_size=28, in_channels=1, num_classes=10, batch=32)
LATENT = dict(input_size=32, in_channels=4, num_classes=1000)  # 256x256 ImageNet latents, as in DiT
TRAIN_MODELS = ("DiT-XS/2", "DiT-S/4", "DiT-S/2")
BATCH = 32
VARIANTS = [("A", "adaln"), ("B", "adaln"), ("C", "adaln"), ("D", "adaln"), ("E", "adaln"),
            ("E", "scale+rotate"), ("E", "rotate")]
EMA_STDS = (0.05, 0.10)  # TrainConfig's default widths
CFG_SCALE = 4.0
SAMPLE_BATCH = 4  # images per sampling run (8 model inputs per step with classifier-free guidance)


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = CLOCKS["wall"]  # the training steps' and the matmul's clock (--clock)


def median(xs):
    return statistics.median(xs)


def fmt_range(xs, f="{:.3g}"):
    return f"{f.format(median(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


def rounds(items: dict, n_rounds: int, warmup: int, log=None) -> dict[str, list[float]]:
    """Run every callable `warmup` times, then n_rounds rounds of each once (rotated order); each call
    returns its own elapsed seconds. Returns {key: [seconds per round]}."""
    keys = list(items)
    for _ in range(warmup):
        for k in keys:
            items[k]()
    out = {k: [] for k in keys}
    for r in range(n_rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            out[k].append(items[k]())
        if log:
            log(f"  round {r + 1}/{n_rounds}: " + ", ".join(f"{k} {out[k][-1]:.3g}s" for k in keys))
    return out


def paired(times: dict, key: str, ref: str) -> list[float]:
    return [a / b for a, b in zip(times[key], times[ref])]


def best_ratio(times: dict, key: str, ref: str) -> str:
    """Fastest round over fastest round: on a shared machine load only ever slows a run down, so the
    fastest of several runs is the least disturbed one."""
    return f"{min(times[key]) / min(times[ref]):.3f}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------
# The training step (the loop's real step, minus data loading)
# ------------------------------------------------------------------------------------------------
class TrainStep:
    """One configuration: model, Adam, power EMA, diffusion, a fixed synthetic batch. Calling it runs
    one training step, the loop's own `mapdit.step.train_step`, and returns its wall time; `phases`
    accumulates the time of (projection, forward+backward, clip+optimizer+EMA)."""

    def __init__(self, model: str, preset: str, modulation: str = "adaln", batch: int = BATCH,
                 data: dict | None = None, adam: str = "fused", seed: int = 0, dit_cls=DiT,
                 patches: list | None = None):
        data = LATENT if data is None else data
        self.cfg = make_config(model, preset=preset, modulation=modulation, **data)
        torch.manual_seed(seed)
        self.model = dit_cls(self.cfg).train()
        named = self.model.trainable_parameters()
        self.params = [p for _, p in named]
        wn = self.cfg.weight_normalization or self.cfg.forced_weight_normalization
        lr = 1e-2 if wn else 1e-4  # TrainConfig.resolved's defaults
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.99), eps=1e-8,
                                    foreach=adam == "foreach", fused=(adam == "fused") or None)
        self.ema = PowerEMA(dict(named), sigma_rels=EMA_STDS)
        self.diffusion = make_diffusion(self.cfg.num_train_steps, learn_sigma=self.cfg.learn_sigma)
        g = torch.Generator().manual_seed(seed + 1)
        c, s = self.cfg.in_channels, self.cfg.input_size
        self.x = torch.randn(batch, c, s, s, generator=g)
        y = torch.randint(0, self.cfg.num_classes, (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < 0.1
        self.y = torch.where(drop, torch.full_like(y, self.cfg.null_class), y)
        self.batch = batch
        self.fwd = self.model  # what training_losses calls (a torch.compile wrapper in the compile section)
        self.patches = patches or []  # (object, attribute, value) set for the duration of each step
        self.step = 0
        self.sums = torch.zeros(4)
        self.phases = [0.0, 0.0, 0.0]

    def _draw(self):
        g = torch.Generator().manual_seed(1_000_003 + self.step)
        t = torch.randint(0, self.diffusion.num_timesteps, (self.batch,), generator=g)
        noise = torch.randn(self.x.shape, generator=g)
        return t, noise

    def run(self, ranges: bool = False):
        """One step (record_function ranges around the phases when `ranges`)."""
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.patches]
        for obj, name, value in self.patches:
            setattr(obj, name, value)
        try:
            return self._run(ranges)
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def _run(self, ranges: bool):
        from torch.profiler import record_function

        self.step += 1
        t, noise = self._draw()
        rf = record_function if ranges else _null_range
        marks = [clock()]  # the start, then the end of each phase

        @contextlib.contextmanager
        def phase(name: str):
            with rf(f"phase:{name}"):
                yield
            marks.append(clock())

        result = train_step(self.model, self.fwd, self.diffusion, self.opt, self.ema, self.params,
                            Batch(self.x, self.y, t, noise), self.step, phase=phase)
        self.sums += result.stats
        for i in range(3):
            self.phases[i] += marks[i + 1] - marks[i]
        return marks[-1] - marks[0]

    __call__ = run

    def count_flops(self) -> int:
        """FLOPs of the forward and backward of one step (matmuls and attention), by FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        self.step += 1
        t, noise = self._draw()
        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
        self.model.project_weights_()
        with counter:
            losses = self.diffusion.training_losses(self.model, self.x, t, self.y, noise=noise)
            self.opt.zero_grad(set_to_none=True)
            losses["loss"].mean().backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def largest_matmul(self) -> tuple[int, int, int]:
        """(M, K, N) of the model's largest matmul: the MLP's first linear over all tokens of the batch."""
        d = self.cfg.hidden_size
        tokens = (self.cfg.input_size // self.cfg.patch_size) ** 2
        return self.batch * tokens, d, int(d * self.cfg.mlp_ratio)


class _null_range:
    def __init__(self, name):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_attention_flops() -> dict:
    """FlopCounterMode counts no FLOPs for the CPU flash-attention kernels; count them as it counts the
    GPU ones (forward: 2 matmuls; backward: 5, including the recomputed scores)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(g, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(g, q, k, v)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


class Matmul:
    """A plain fp32 matmul of a given shape: the practical peak FLOP/s of this machine for that shape.

    Each call runs it `reps` times and returns the fastest: the machine's practical peak in that round
    (so the fraction of it that a training step reaches is, if anything, understated)."""

    def __init__(self, m: int, k: int, n: int, reps: int = 5):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        self.c = torch.empty(m, n)
        self.flops = 2 * m * k * n
        self.reps = reps

    def __call__(self) -> float:
        best = math.inf
        for _ in range(self.reps):
            t0 = clock()
            torch.mm(self.a, self.b, out=self.c)
            best = min(best, clock() - t0)
        return best


def label(preset: str, modulation: str) -> str:
    return f"{preset}/{modulation}"


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
class Report:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self("| " + " | ".join(str(c) for c in row) + " |")
        self()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {msg}", file=sys.stderr, flush=True)


def section_training(rep: Report, args, results: dict) -> None:
    rep("## Training step: images/s (forward + backward + Adam + EMA + forced weight normalisation)")
    rep()
    rep(f"fp32, batch {BATCH} (demo: {DEMO['batch']}), {torch.get_num_threads()} threads; median over "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps (min-max in brackets). "
        "Ratios are step-time ratios paired per round: < 1 means faster than the reference.")
    rep()
    setups = [(m, LATENT, BATCH, args.variants) for m in args.train_models]
    if not args.no_demo:
        demo_data = {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")}
        setups.append((DEMO["model"] + " (demo, 28x28x1)", demo_data, DEMO["batch"],
                       [("A", "adaln"), ("E", "adaln"), ("E", "scale+rotate"), ("E", "rotate")]))
    for name, data, batch, variants in setups:
        model = name.split(" ")[0]
        log(f"training: {name}")
        steps = {label(p, m): TrainStep(model, p, m, batch=batch, data=data, adam=args.adam) for p, m in variants}
        items = dict(steps)
        flops = {}
        with_peak = model == "DiT-S/2" or args.peak_everywhere
        if with_peak:
            first = next(iter(steps.values()))
            mm = Matmul(*first.largest_matmul())
            items["matmul"] = mm
            for key in ("A/adaln", "E/adaln"):
                if key in steps:
                    flops[key] = steps[key].count_flops()
        for s in steps.values():
            s.phases = [0.0, 0.0, 0.0]
        times = rounds(items, args.rounds, args.warmup, log)
        rows = []
        for key, s in steps.items():
            ts = times[key]
            row = [key, fmt_range([batch / t for t in ts], "{:.1f}"), f"{1e3 * median(ts):.0f}"]
            if key != "A/adaln" and "A/adaln" in times:
                row += [fmt_range(paired(times, key, "A/adaln"), "{:.3f}"), best_ratio(times, key, "A/adaln")]
            else:
                row += ["1", "1"] if key == "A/adaln" else ["", ""]
            pre, mod = key.split("/")
            ref = f"{pre}/adaln"
            if mod != "adaln" and ref in times:
                row += [fmt_range(paired(times, key, ref), "{:.3f}"), best_ratio(times, key, ref)]
            else:
                row += ["", ""]
            total = sum(s.phases)
            row.append(f"{100 * (s.phases[0] + s.phases[2]) / total:.1f} %")
            rows.append(row)
        rep(f"### {name}, batch {batch}")
        rep()
        rep.table(["config/modulation", "images/s", "ms/step", "time ÷ A (paired)", "÷ A (best)",
                   "time ÷ adaln (paired)", "÷ adaln (best)", "opt+EMA+WN share"], rows)
        results.setdefault("training", {})[name] = {k: {"times": v} for k, v in times.items()}
        if with_peak:
            (m_, k_, n_) = mm.a.shape[0], mm.a.shape[1], mm.b.shape[1]
            peak = [mm.flops / t for t in times["matmul"]]
            rows = []
            for key, f in flops.items():
                achieved = [f / t for t in times[key]]
                frac = [a / p for a, p in zip(achieved, peak)]
                rows.append([key, f"{f / 1e9:.1f}", fmt_range([a / 1e9 for a in achieved], "{:.1f}"),
                             fmt_range([p / 1e9 for p in peak], "{:.1f}"),
                             fmt_range([100 * x for x in frac], "{:.1f}") + " %",
                             f"{100 * max(achieved) / max(peak):.1f} %"])
                results["training"][name][key]["flops"] = f
            rep(f"FLOP/s of the step against the same run's matmul ({m_}x{k_} @ {k_}x{n_}, fp32, the shape of "
                "the MLP's first linear over the batch). FLOPs from FlopCounterMode on one real step "
                "(matmuls and attention, forward and backward; attention backward includes the recomputed "
                "scores, as torch counts it).")
            rep()
            rep.table(["config", "GFLOP/step", "achieved GFLOP/s", "matmul GFLOP/s", "fraction (paired)",
                       "fraction (best ÷ best)"], rows)
            results["training"][name]["matmul_flops"] = mm.flops
        del steps, items


def profile_step(step: TrainStep) -> dict[str, float]:
    """Self CPU time of one profiled step, split into matmul / attention / other (within forward+backward)
    and the projection + optimizer + EMA phases. Seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.run(ranges=True)
    buckets = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "opt+EMA+WN": 0.0}
    for ev in prof.events():
        if ev.name.startswith("phase:"):
            continue
        phase, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("phase:"):
                phase = parent.name
            parent = parent.cpu_parent
        self_t = ev.self_cpu_time_total / 1e6
        if phase in ("phase:weight_projection", "phase:optimizer_ema"):
            buckets["opt+EMA+WN"] += self_t
        elif phase == "phase:forward_backward":
            name = ev.name
            if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"):
                buckets["matmul"] += self_t
            elif "scaled_dot_product" in name or "flash_attention" in name:
                buckets["attention"] += self_t
            else:
                buckets["other"] += self_t
    return buckets


def section_breakdown(rep: Report, args, results: dict) -> None:
    model = args.profile_model
    rep(f"## Where the time goes: {model}, batch {BATCH}, one profiled step per config (torch.profiler)")
    rep()
    rep("Self CPU time by operator class. matmul: aten::mm/addmm/bmm; attention: the SDPA kernels (forward "
        "and backward); other: every other operator of forward and backward (elementwise, norms, "
        "reductions, copies, autograd bookkeeping); opt+EMA+WN: clip_grad_norm_, Adam, the power-EMA "
        "update and the forced weight normalisation. Profiling adds overhead to small operators; the "
        "unprofiled share of opt+EMA+WN is in the training table.")
    rep()
    rows = []
    for preset, mod in VARIANTS:
        if mod != "adaln" and not args.full_breakdown:
            continue
        step = TrainStep(model, preset, mod, adam=args.adam)
        for _ in range(args.warmup):
            step()
        log(f"profiling {model} {preset}/{mod}")
        b = min((profile_step(step) for _ in range(args.profile_reps)), key=lambda d: sum(d.values()))
        total = sum(b.values())
        rows.append([label(preset, mod), f"{total:.2f}"] + [f"{100 * b[k] / total:.1f} %" for k in
                                                             ("matmul", "attention", "other", "opt+EMA+WN")])
        results.setdefault("breakdown", {})[label(preset, mod)] = b
        del step
    rep.table(["config", "profiled s", "matmul", "attention", "other", "opt+EMA+WN"], rows)


def section_scaling(rep: Report, args, results: dict) -> None:
    size = args.scaling_size
    rep(f"## How cost grows: DiT-{size}, Configs A and E (adaln), fp32")
    rep()
    rep("Step time against batch size (patch 4) and against tokens per image (patch 8, 4, 2; batch 32). "
        "ms per step and µs per token (batch x tokens); E/A paired per round.")
    rep()
    rows = []
    cases = [(f"DiT-{size}/4", b) for b in (8, 32, 128)] + [(f"DiT-{size}/{p}", BATCH) for p in (8, 2)]
    for model, batch in cases:
        log(f"scaling: {model} batch {batch}")
        steps = {p: TrainStep(model, p, "adaln", batch=batch, adam=args.adam) for p in ("A", "E")}
        times = rounds(steps, args.rounds, args.warmup, log)
        tokens = batch * (LATENT["input_size"] // steps["A"].cfg.patch_size) ** 2
        rows.append([model, batch, tokens] + [f"{1e3 * median(times[p]):.0f}" for p in ("A", "E")]
                    + [f"{1e6 * median(times[p]) / tokens:.1f}" for p in ("A", "E")]
                    + [fmt_range(paired(times, "E", "A"), "{:.3f}"), best_ratio(times, "E", "A")])
        results.setdefault("scaling", {})[f"{model}@{batch}"] = times
        del steps
    rep.table(["model", "batch", "tokens", "A ms", "E ms", "A µs/token", "E µs/token", "E ÷ A (paired)",
               "E ÷ A (best)"], rows)


class GuidedForward:
    """A sampler's unit of work: one guided model call (eval, no_grad) on the conditional and the
    unconditional halves of a batch, 2 x `batch` inputs; calling it returns its wall time."""

    def __init__(self, model: DiT, batch: int):
        self.model, cfg = model, model.config
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(2 * batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        self.t = torch.randint(0, cfg.num_train_steps, (batch,), generator=g).repeat(2)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
        self.y = torch.cat([y, torch.full_like(y, cfg.null_class)])

    def __call__(self) -> float:
        was = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(self.x, self.t, self.y)
        elapsed = time.perf_counter() - t0
        self.model.train(was)
        return elapsed


def section_sampling(rep: Report, args, results: dict) -> None:
    from mapdit.samplers import sample

    model_name = "DiT-S/2"
    rep(f"## Sampling: {model_name}, {SAMPLE_BATCH} images, classifier-free guidance (scale {CFG_SCALE}), "
        "eval mode, no_grad")
    rep()
    models = {}
    for preset in ("A", "E"):
        cfg = make_config(model_name, preset=preset, **LATENT)
        torch.manual_seed(0)
        models[preset] = DiT(cfg).eval()
    shape = (SAMPLE_BATCH, LATENT["in_channels"], LATENT["input_size"], LATENT["input_size"])
    y = torch.arange(SAMPLE_BATCH) % LATENT["num_classes"]

    def run(preset, sampler, steps, run_steps):
        def go():
            m = models[preset]
            cfg = m.config
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(m, shape=shape, y=y, sampler=sampler, steps=run_steps, cfg_scale=CFG_SCALE,
                       null_class=cfg.null_class, generator=torch.Generator().manual_seed(0),
                       num_train_steps=cfg.num_train_steps, learn_sigma=cfg.learn_sigma)
            return (time.perf_counter() - t0) * steps / run_steps  # extrapolated to `steps` when fewer ran
        return go

    plans = [("ddpm", 250, args.sample_steps_ddpm), ("ddim", 50, args.sample_steps_ddim)]
    rows = []
    for sampler, steps, run_steps in plans:
        log(f"sampling {sampler} {run_steps}/{steps} steps")
        items = {p: run(p, sampler, steps, run_steps) for p in models}
        times = rounds(items, args.sample_rounds, 0, log)
        note = "" if run_steps == steps else f" (ran {run_steps}, extrapolated per step)"
        rows.append([f"{sampler} {steps} steps{note}"] + [fmt_range([SAMPLE_BATCH / t for t in times[p]], "{:.3f}")
                                                          for p in ("A", "E")]
                    + [fmt_range(paired(times, "E", "A"), "{:.3f}"), best_ratio(times, "E", "A")])
        results.setdefault("sampling", {})[sampler] = times
    rep.table(["sampler", "A images/s", "E images/s", "E ÷ A (time, paired)", "E ÷ A (best)"], rows)

    # forward-only, the sampler's unit of work: one CFG forward of 2 x SAMPLE_BATCH inputs
    times = rounds({p: GuidedForward(m, SAMPLE_BATCH) for p, m in models.items()}, args.rounds * 3, 2, None)
    rep(f"Forward only (one guided step: {2 * SAMPLE_BATCH} inputs), {args.rounds * 3} interleaved rounds: "
        f"A {1e3 * median(times['A']):.0f} ms, E {1e3 * median(times['E']):.0f} ms, "
        f"E ÷ A = {fmt_range(paired(times, 'E', 'A'), '{:.3f}')} paired, {best_ratio(times, 'E', 'A')} best ÷ best.")
    rep()
    results.setdefault("sampling", {})["forward"] = times


MEMORY_CASES = [("DiT-S/2", "A", "adaln", BATCH, None), ("DiT-S/2", "E", "adaln", BATCH, None),
                ("DiT-S/2", "E", "scale+rotate", BATCH, None), ("DiT-S/4", "A", "adaln", BATCH, None),
                ("DiT-S/4", "E", "adaln", BATCH, None)]


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(spec: str) -> None:
    """Child process: build one config and run one step (Adam state exists), then report the resident set
    before the next steps and its peak over 3 more steps.

    Peaks come from /proc/self/status VmHWM, reset through /proc/self/clear_refs: ru_maxrss would not do,
    Linux carries it over from the parent process across fork and exec."""
    model, preset, mod, batch, demo = json.loads(spec)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_flush_denormal(True)
    data = {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")} if demo else None
    step = TrainStep(model, preset, mod, batch=batch, data=data)
    step()  # Adam state now exists
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live, tensor_peak = 0, 0  # bytes of tensors allocated during the step and still alive, and their peak
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    for ev in sorted(events, key=lambda e: e.start_ns()):
        live += ev.nbytes()  # + allocation, - free
        tensor_peak = max(tensor_peak, live)
    for _ in range(2):
        step()
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak, "tensor_peak_bytes": tensor_peak}))


def section_memory(rep: Report, args, results: dict) -> None:
    rep("## Peak memory of a training step (CPU, one process per config)")
    rep()
    rep("A fresh process per config. Step tensors: the peak of the bytes of tensors a training step "
        "allocates and still holds (activations, gradients, temporaries) over the model, Adam and EMA state, "
        "from torch.profiler's memory events. RSS: the process's resident set after a first step (model, "
        "Adam state, EMA, the allocator's cache) and its peak over three more steps (VmHWM, reset first).")
    rep()
    rows = []
    cases = [c for c in MEMORY_CASES if not (args.quick and c[0] == "DiT-S/2")]
    cases += [(DEMO["model"], "A", "adaln", DEMO["batch"], True), (DEMO["model"], "E", "adaln", DEMO["batch"], True)]
    for case in cases:
        log(f"memory: {case}")
        env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
        out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(case)], capture_output=True,
                             text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        model, preset, mod, batch, demo = case
        rows.append([model + (" (demo)" if demo else ""), label(preset, mod), batch,
                     f"{r['tensor_peak_bytes'] / 2**30:.2f}", f"{r['before_kib'] / 2**20:.2f}",
                     f"{r['peak_kib'] / 2**20:.2f}"])
        results.setdefault("memory", {})[f"{model}:{preset}/{mod}@{batch}"] = r
    rep.table(["model", "config", "batch", "step tensors peak GiB", "RSS between steps GiB", "peak RSS GiB"],
              rows)


def section_gpu(rep: Report, args, results: dict) -> None:
    rep("## GPU")
    rep()
    if torch.cuda.is_available():
        rep(f"A GPU is present ({torch.cuda.get_device_name()}), but this suite measures the CPU paths only.")
    else:
        rep("Skipped: no GPU on this machine (torch.cuda.is_available() is False).")
    rep()


def section_optimizer(rep: Report, args, results: dict) -> None:
    """The per-step work outside forward/backward, phase by phase, and the alternatives the loop could use."""
    model = args.optimizer_model
    rep(f"## Outside forward and backward: {model} Config E parameters, per step")
    rep()
    rep("Each phase timed alone on the same parameters and gradients, interleaved rounds (median, min-max). "
        "The loop runs: projection, get_total_norm(foreach) (clip_grad_norm_ only with --grad-clip), Adam(fused), "
        "EMA update. "
        "Beside them, what the loop ran before: clip_grad_norm_(inf) (the same norm plus a multiply of every "
        "gradient by 1.0) and Adam(foreach).")
    rep()
    step = TrainStep(model, "E", "adaln")
    step()
    params = step.params
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    opts = {}
    for kind in ("foreach", "fused"):
        opts[kind] = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2,
                                      betas=(0.9, 0.99), eps=1e-8, foreach=kind == "foreach",
                                      fused=(kind == "fused") or None)
        for q, g in zip(opts[kind].param_groups[0]["params"], grads):
            q.grad = g.clone()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    counter = [step.step]

    def timed(fn):
        def go():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return go

    def ema():
        counter[0] += 1
        step.ema.update(params, counter[0])

    items = {
        "forced weight normalisation (project_weights_)": timed(step.model.project_weights_),
        "clip_grad_norm_(inf, foreach)": timed(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf"),
                                                                                      foreach=True)),
        "get_total_norm(foreach)": timed(lambda: torch.nn.utils.get_total_norm([p.grad for p in params],
                                                                               foreach=True)),
        "Adam(foreach).step": timed(opts["foreach"].step),
        "Adam(fused).step": timed(opts["fused"].step),
        "power EMA update (2 widths)": timed(ema),
    }
    times = rounds(items, max(args.rounds, 5), 2, None)
    step_s = None
    tr = results.get("training", {}).get(model, {}).get("E/adaln")
    if tr:
        step_s = median(tr["times"])
    rows = [[k, fmt_range([1e3 * t for t in v], "{:.1f}"),
             f"{100 * median(v) / step_s:.2f} %" if step_s else ""] for k, v in times.items()]
    rep.table(["phase", "ms", "share of the E/adaln step" if step_s else ""], rows)
    results["optimizer"] = times


def section_compile(rep: Report, args, results: dict) -> None:
    model = args.compile_model
    rep(f"## torch.compile (Inductor, CPU): {model}, batch {BATCH}, training step")
    rep()
    rep("The training loop's `--compile`: the model's forward compiled (fullgraph, no graph breaks), the "
        "batched projection, optimizer and EMA eager. Compile time is excluded (warm-up); ratios paired.")
    rep()
    steps = {}
    for preset in ("A", "E"):
        steps[f"{preset} eager"] = TrainStep(model, preset, "adaln", adam=args.adam)
        compiled = TrainStep(model, preset, "adaln", adam=args.adam)
        compiled.fwd = torch.compile(compiled.model, fullgraph=True)
        steps[f"{preset} compiled"] = compiled
    log(f"compile: {model} (compiling on the warm-up steps)")
    t0 = time.perf_counter()
    times = rounds(steps, args.rounds, max(2, args.warmup), log)
    rows = [[k, f"{1e3 * median(v):.0f}", fmt_range([BATCH / t for t in v], "{:.1f}"),
             fmt_range(paired(times, k, "A eager"), "{:.3f}"), best_ratio(times, k, "A eager")]
            for k, v in times.items()]
    rep.table(["config", "ms/step", "images/s", "time ÷ A eager (paired)", "(best)"], rows)
    rep(f"E compiled ÷ A compiled: {fmt_range(paired(times, 'E compiled', 'A compiled'), '{:.3f}')}; "
        f"whole section incl. compilation {time.perf_counter() - t0:.0f} s.")
    rep()
    results["compile"] = times


# variant -> the fast paths it switches to their plain formula (`mapdit.fused.FAST_PATHS`)
ABLATION = {
    "all fast paths": (),
    "WN: autograd normalize(W) per forward": ("linear",),
    "cosine attention: autograd normalize(q, k)": ("qk",),
}


class PlainPaths:
    """A training step run inside `reference_math(*paths)`: those fast paths compute the plain formula (same
    values, autograd's generic backward); none switched when `paths` is empty. Returns the step's seconds."""

    def __init__(self, step: TrainStep, paths: tuple[str, ...]):
        self.step, self.paths = step, paths

    def __call__(self) -> float:
        if not self.paths:
            return self.step()
        with reference_math(*self.paths):
            return self.step()


def section_ablation(rep: Report, args, results: dict) -> None:
    model = args.ablation_model
    rep(f"## What each fast path buys: {model}, batch {BATCH}, Config E, training step")
    rep()
    rep("One fast path at a time replaced by the plain formula it computes (`fused.reference_math(path)`: "
        "identical values; autograd's generic backward). Step time relative to all fast paths, paired per "
        "round: > 1 means the fast path saves that fraction. MP-SiLU folding changes how the model is built; "
        "it is covered by the before/after section.")
    rep()
    rows = []
    for mod in ("adaln", "scale+rotate"):
        log(f"ablation: {model} E/{mod}")
        steps = {name: PlainPaths(TrainStep(model, "E", mod, adam=args.adam), paths)
                 for name, paths in ABLATION.items()}
        times = rounds(steps, args.rounds, args.warmup, log)
        for name in steps:
            if name == "all fast paths":
                rows.append([f"E/{mod}", name, f"{1e3 * median(times[name]):.0f}", "1", "1"])
            else:
                rows.append([f"E/{mod}", name, f"{1e3 * median(times[name]):.0f}",
                             fmt_range(paired(times, name, "all fast paths"), "{:.3f}"),
                             best_ratio(times, name, "all fast paths")])
        results.setdefault("ablation", {})[mod] = times
        del steps
    rep.table(["config", "variant", "ms/step", "time ÷ all fast paths (paired)", "(best)"], rows)


# ------------------------------------------------------------------------------------------------
# Before/after against another revision of the model code
# ------------------------------------------------------------------------------------------------
def baseline_dit(rev: str):
    """The DiT class of git revision `rev` (its nn.py, fused.py and model.py, with today's other modules)."""
    import importlib
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="mapdit-baseline-"))
    pkg = tmp / "mapdit_baseline"
    shutil.copytree(ROOT / "src" / "mapdit", pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for f in ("nn.py", "fused.py", "model.py"):  # (fused.py: from revisions that have it)
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/mapdit/{f}"], capture_output=True,
                               text=True, check=f != "fused.py")
        if shown.returncode == 0:
            (pkg / f).write_text(shown.stdout)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("mapdit_baseline.model").DiT


def section_baseline(rep: Report, args, results: dict) -> None:
    old = baseline_dit(args.baseline)
    rep(f"## Before/after: this tree against revision {args.baseline} (its nn.py, fused.py and model.py)")
    rep()
    rep("Training step, batch 32, paired per round; 'after ÷ before' < 1 means this tree is faster.")
    rep()
    rows = []
    for model in args.baseline_models:
        for preset, mod in (("A", "adaln"), ("E", "adaln"), ("E", "scale+rotate")):
            log(f"baseline: {model} {preset}/{mod}")
            items = {"before": TrainStep(model, preset, mod, adam=args.adam, dit_cls=old),
                     "after": TrainStep(model, preset, mod, adam=args.adam)}
            times = rounds(items, args.rounds, args.warmup, log)
            rows.append([model, label(preset, mod), f"{1e3 * median(times['before']):.0f}",
                         f"{1e3 * median(times['after']):.0f}", fmt_range(paired(times, "after", "before"), "{:.3f}"),
                         best_ratio(times, "after", "before")])
            del items
    rep.table(["model", "config", "before ms", "after ms", "after ÷ before (paired)", "(best)"], rows)


# ------------------------------------------------------------------------------------------------
# Which fast paths earn their place (issue 28: keep one only where it wins >= 3 % of the whole step)
# ------------------------------------------------------------------------------------------------
FASTPATH_SETTINGS = {  # name -> (model, preset, modulation, data)
    "demo-E": (DEMO_MODEL, "E", "adaln", {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")}),
    "demo-A": (DEMO_MODEL, "A", "adaln", {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")}),
    "demo-E-scale+rotate": (DEMO_MODEL, "E", "scale+rotate",
                            {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")}),
    "S4-E": ("DiT-S/4", "E", "adaln", LATENT),
    "S4-A": ("DiT-S/4", "A", "adaln", LATENT),
    "S2-E": ("DiT-S/2", "E", "adaln", LATENT),
    "S2-A": ("DiT-S/2", "A", "adaln", LATENT),
}


class WithPaths:
    """A training step run inside `switch(*paths)` (a `reference_math` of this tree or of the baseline's)."""

    def __init__(self, step: TrainStep, switch, paths: tuple[str, ...]):
        self.step, self.switch, self.paths = step, switch, paths

    def __call__(self) -> float:
        with self.switch(*self.paths):
            return self.step()


def section_fastpaths(rep: Report, args, results: dict) -> None:
    """The whole training step with and without each fast path, eager and compiled, paired per round.

    'before': revision args.baseline's model code (the folded block forward: MP constants carried as
    coefficients, fused gates and residuals through `mul_add`, fused scale-rotation). 'formula': this tree
    (the block as the formula) with every remaining fast path; 'formula - X': the same inside
    `reference_math(X)`. Under torch.compile every fast path of fused.py falls back to its plain formula by
    construction, so the compiled pair measures the block forward alone."""
    import importlib

    rev = args.baseline or "e95bf9f"
    old_dit = baseline_dit(rev)
    old_switch = importlib.import_module("mapdit_baseline.fused").reference_math
    from mapdit.fused import FAST_PATHS

    rep(f"## Fast paths: the whole training step with and without each (this tree vs {rev})")
    rep()
    rep(f"Batch {BATCH}, {torch.get_num_threads()} threads, fp32, flush-denormal, fused Adam; the loop's "
        f"`train_step`; {args.rounds} interleaved rounds after {args.warmup} warm-up steps (compiled: "
        "compilation in the warm-up). Ratios: time ÷ 'formula' paired per round, median (min-max); "
        "> 1 means the variant is slower, i.e. the fast path it lacks saves that fraction.")
    rep()
    rows = []
    for name in args.fastpath_settings:
        model, preset, mod, data = FASTPATH_SETTINGS[name]
        mp = preset != "A"
        log(f"fast paths: {name}")

        def make(dit_cls=DiT):
            return TrainStep(model, preset, mod, batch=BATCH, data=data, adam=args.adam, dit_cls=dit_cls)

        items = {"formula": make(), "before": make(old_dit)}
        if mp:
            for path in FAST_PATHS:
                if path != "rotation" or "rotate" in mod:  # (rotation: only with a rotating modulation)
                    items[f"formula - {path}"] = WithPaths(make(), reference_math, (path,))
            items["before - mul_add"] = WithPaths(make(old_dit), old_switch, ("mul_add",))
            if "rotate" in mod:
                items["before - rotation"] = WithPaths(make(old_dit), old_switch, ("rotation",))
        if not args.no_compile:
            for key, cls in (("formula compiled", DiT), ("before compiled", old_dit)):
                step = make(cls)
                step.fwd = torch.compile(step.model, fullgraph=True)
                items[key] = step
        times = rounds(items, args.rounds, args.warmup, log)
        for key in items:
            ref = "formula compiled" if key == "before compiled" else "formula"
            ratio = "1" if key in ("formula", "formula compiled") else fmt_range(paired(times, key, ref), "{:.3f}")
            rows.append([name, key, f"{1e3 * median(times[key]):.0f}", ref if ratio != "1" else "", ratio])
        results.setdefault("fastpaths", {})[name] = times
        del items
    rep.table(["setting", "variant", "ms/step (median)", "reference", "time ÷ reference (paired)"], rows)


def section_ratios(rep: Report, args, results: dict) -> None:
    """E ÷ A and the fraction of a same-run matmul, before (revision args.baseline's model code) and after
    (this tree), all four configurations, this tree's guided forward (the sampler's step) and the matmul
    probe in the same interleaved rounds."""
    rev = args.baseline or "e95bf9f"
    old_dit = baseline_dit(rev)
    rep(f"## E ÷ A and the matmul probe: this tree against {rev}, in one run")
    rep()
    rep(f"Training step (the loop's `train_step`), batch {BATCH}, {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up steps; ratios paired per round, median (min-max). Matmul: the MLP's first "
        "linear over the batch, the fastest of 5 in each round; fraction = the step's FLOP/s (FlopCounterMode: "
        "matmuls and attention, forward and backward) over the matmul's. Sampling: one guided model call of "
        f"this tree (eval, no_grad, 2 x {BATCH} inputs), in the same rounds.")
    rep()
    rows = []
    for name in args.fastpath_settings:
        model, _, mod, data = FASTPATH_SETTINGS[name]
        log(f"ratios: {name}")
        items = {f"{p} {w}": TrainStep(model, p, mod, batch=BATCH, data=data, adam=args.adam, dit_cls=cls)
                 for w, cls in (("before", old_dit), ("after", DiT)) for p in ("A", "E")}
        flops = {k: s.count_flops() for k, s in items.items()}
        mm = Matmul(*items["A after"].largest_matmul())
        guided = {f"{p} guided": GuidedForward(items[f"{p} after"].model, BATCH) for p in ("A", "E")}
        times = rounds({**items, **guided, "matmul": mm}, args.rounds, args.warmup, log)
        peak = [mm.flops / t for t in times["matmul"]]
        for w in ("before", "after"):
            frac = {p: [flops[f"{p} {w}"] / t / pk for t, pk in zip(times[f"{p} {w}"], peak)] for p in ("A", "E")}
            rows.append([model + (" (demo)" if name.startswith("demo") else ""), w,
                         f"{1e3 * median(times[f'A {w}']):.0f}", f"{1e3 * median(times[f'E {w}']):.0f}",
                         fmt_range(paired(times, f"E {w}", f"A {w}"), "{:.3f}"),
                         fmt_range(frac["A"], "{:.3f}"), fmt_range(frac["E"], "{:.3f}")])
        rows.append([model + (" (demo)" if name.startswith("demo") else ""), "after, sampling (one guided call)",
                     f"{1e3 * median(times['A guided']):.0f}", f"{1e3 * median(times['E guided']):.0f}",
                     fmt_range(paired(times, "E guided", "A guided"), "{:.3f}"), "", ""])
        results.setdefault("ratios", {})[name] = times
        del items, guided
    rep.table(["model", "code", "A ms", "E ms", "E ÷ A (paired)", "A ÷ matmul", "E ÷ matmul"], rows)


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller models and sampling runs")
    p.add_argument("--out", default=None, help="also write the markdown tables to this file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default="training,optimizer,breakdown,scaling,sampling,memory,gpu",
                   help="comma-separated: training, breakdown, scaling, sampling, memory, gpu, optimizer, "
                        "ablation, compile, fastpaths, ratios, baseline (with --baseline REV)")
    p.add_argument("--adam", choices=("foreach", "fused"), default="fused",
                   help="Adam implementation (the training loop uses fused on the CPU and GPU)")
    p.add_argument("--baseline", default=None, help="git revision for the before/after section")
    p.add_argument("--models", default=None, help="comma-separated models for the training table "
                                                  "(default: DiT-XS/2, DiT-S/4, DiT-S/2; quick: DiT-XS/2, DiT-S/4)")
    p.add_argument("--variants", default=None, help="comma-separated preset/modulation pairs for the training "
                                                    "table, e.g. A/adaln,E/adaln "
                                                    "(default: A-E adaln, E rotate variants)")
    p.add_argument("--no-demo", action="store_true", help="leave the demo model out of the training table")
    p.add_argument("--rounds", type=int, default=None, help="override the number of interleaved rounds")
    p.add_argument("--fastpath-settings", default="demo-E,demo-A,S4-E",
                   help=f"comma-separated settings of the fastpaths and ratios sections (ratios: the model of "
                        f"each, both presets): {', '.join(FASTPATH_SETTINGS)}")
    p.add_argument("--no-compile", action="store_true", help="fastpaths section: eager only")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="time training steps and the matmul by wall clock, or by the CPU time of the calling "
                        "thread (with --threads 1 all work runs on it: robust on a machine shared with other "
                        "processes, where wall time measures the scheduler)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if args.clock == "thread" and args.threads != 1:
        raise SystemExit("--clock thread needs --threads 1 (other threads' work would not be counted)")
    torch.set_flush_denormal(True)  # as the training loop: denormals cost ~10x per elementwise op on CPU
    if args.memory_child:
        memory_child(args.memory_child)
        return 0

    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 5)
    args.warmup = 1 if quick else 2
    args.train_models = tuple(args.models.split(",")) if args.models else (("DiT-XS/2", "DiT-S/4") if quick
                                                                            else TRAIN_MODELS)
    args.variants = ([tuple(v.split("/")) for v in args.variants.split(",")] if args.variants else VARIANTS)
    args.peak_everywhere = "DiT-S/2" not in args.train_models  # then the matmul reference goes everywhere
    args.profile_model = "DiT-S/4" if quick else "DiT-S/2"
    args.profile_reps = 1 if quick else 2
    args.full_breakdown = not quick
    args.scaling_size = "XS" if quick else "S"
    args.sample_steps_ddpm = 10 if quick else 250
    args.sample_steps_ddim = 5 if quick else 50
    args.sample_rounds = 2 if quick else 1
    args.baseline_models = ("DiT-S/4",) if quick else ("DiT-S/4", "DiT-S/2")
    args.fastpath_settings = args.fastpath_settings.split(",")
    args.ablation_model = "DiT-XS/2" if quick else "DiT-S/4"
    args.compile_model = "DiT-XS/2" if quick else "DiT-S/4"
    args.optimizer_model = "DiT-S/4" if quick else "DiT-S/2"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.baseline and not {"baseline", "fastpaths", "ratios"} & set(sections):
        sections.append("baseline")

    rep = Report()
    results: dict = {}
    load_start = load_average()
    started = time.time()
    rep(f"# mapdit benchmark ({'quick' if quick else 'full'})")
    rep()
    rep(f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}`")
    rep(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    rep(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, flush-denormal on, {args.clock} clock")
    rep(f"- load average (1, 5, 15 min) at start: {load_start}")
    rep()
    funcs = {"training": section_training, "breakdown": section_breakdown, "scaling": section_scaling,
             "sampling": section_sampling, "memory": section_memory, "gpu": section_gpu,
             "ablation": section_ablation, "baseline": section_baseline, "compile": section_compile,
             "optimizer": section_optimizer, "fastpaths": section_fastpaths,
             "ratios": section_ratios}
    for name in sections:
        if name not in funcs:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(funcs)}")
        funcs[name](rep, args, results)
    rep(f"- load average at end: {load_average()}; wall time {(time.time() - started) / 60:.1f} min")
    if args.out:
        Path(args.out).write_text("\n".join(rep.lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
