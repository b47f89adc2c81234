#!/usr/bin/env python
"""The first-GPU check: what a CUDA machine does with mapdit, measured in at most ~8 minutes.

    benchmarks/gpu_check.sh                      # on a CUDA machine; appends a section to BENCHMARKS.md
    benchmarks/gpu_check.sh --budget 300         # a shorter wall-clock budget (seconds, default 450)
    python benchmarks/gpu_check.py --cpu-dry-run --out DIR --benchmarks DIR/B.md   # the plumbing, tiny, on a CPU

On a machine without CUDA it refuses with one line and exit status 2 (unless --cpu-dry-run).

What it measures, in order of priority (later parts are skipped, and say so, when the budget runs out):
  1. the device, its dense bf16 peak from the NVIDIA datasheet (by device name; none for an unknown name),
     and a same-run bf16 matmul probe (8192^3);
  2. the training step `mapdit train` runs (`mapdit.step.train_step`: weight projection, loss under bf16
     autocast, backward, fused Adam, power EMA; the model built by `mapdit.setup.model_optimizer_ema`),
     eager, for DiT-S/2, DiT-B/2 and DiT-XL/2 on 32x32x4 latents (DiT's 256^2 ImageNet setting), Config A
     and Config E in interleaved rounds (E / A paired per round);
  3. a short real training run: `mapdit train` for 400 steps of Config E, DiT-S/2, bf16, on random latents
     in the prepared format (`mapdit.data.latents.synthetic_latents`): the loss must fall;
  4. the same steps compiled as `mapdit train --compile` compiles them (`mapdit.setup.forward_of`), model by
     model while the budget lasts (the compile time is reported, not timed into the step).

MFU = model FLOPs per step / step time / peak, with the model FLOPs from the config: 3 x the forward's FLOPs
(backward = 2 x forward), the forward counted on meta tensors (`mapdit.model.forward_flops`: 2 FLOPs per
multiply-add; DiT-XL/2 gives 118.6 GMACs per image, DiT's table). Step times are medians over rounds of
`--steps` steps, each timed between two `torch.cuda.synchronize()` calls.

Outputs: the section appended to `--benchmarks` (default BENCHMARKS.md at the repository root), and
gpu_check.md / gpu_check.json in `--out` (default: $OUT when set, else benchmarks/results/), so that a run on a
lent machine brings its numbers back.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

try:
    import torch

    from mapdit.config import TrainConfig, make_config
    from mapdit.diffusion import make_diffusion
    from mapdit.distributed import Dist
    from mapdit.model import forward_flops
    from mapdit.setup import forward_of, model_optimizer_ema
    from mapdit.step import Batch, train_step
except ImportError as e:  # a bare machine: say what is missing in one line
    print(f"gpu_check: error: {e}: run it with the project's environment (make setup; or PY=python-with-torch "
          "benchmarks/gpu_check.sh)", file=sys.stderr)
    sys.exit(2)

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; matched on the device name,
# most specific first. An unknown device gets no peak: MFU is then given against the matmul probe only.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
MODELS = (("DiT-S/2", 256), ("DiT-B/2", 256), ("DiT-XL/2", 128))  # (model, batch); OOM halves the batch
LATENT = dict(input_size=32, in_channels=4, num_classes=1000)
PRESETS = ("A", "E")
TRAIN_RUN = dict(model="DiT-S/2", config="E", steps=400, batch=256, log_every=50)
TITLE = "## First-GPU check (benchmarks/gpu_check.sh)"
EXIT_USAGE = 2


class OutOfTime(Exception):
    """The budget (or a SIGTERM) ended the check: what was measured so far is still written."""


def peak_tflops(name: str) -> float | None:
    """The datasheet's dense bf16 peak of a device called `name`, or None for a device not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def train_flops_per_image(cfg) -> int:
    """Model FLOPs of one training image: forward + backward (2 x forward), from the config alone."""
    with torch.device("meta"):
        from mapdit.model import DiT

        model = DiT(cfg)
    return 3 * forward_flops(model, batch=1)


def mfu(flops_per_step: float, seconds: float, peak: float | None) -> float | None:
    return None if peak is None or seconds <= 0 else flops_per_step / seconds / (peak * 1e12)


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """Every torch.compile call inside uses `backend` (the CPU dry run: "eager", so that it takes seconds);
    None: unchanged (Inductor)."""
    if backend is None:
        yield
        return
    real = torch.compile
    torch.compile = functools.partial(real, backend=backend)
    try:
        yield
    finally:
        torch.compile = real


class Check:
    """The measurements and the clock. `results` is what gpu_check.json holds; `lines` the markdown."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results: dict = {"models": [], "ratios": [], "skipped": []}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> bool:
        """True if `seconds` are left; else `what` is recorded as skipped."""
        if self.left() >= seconds:
            return True
        self.results["skipped"].append(f"{what} (budget: {self.left():.0f} s left, ~{seconds:.0f} s needed)")
        return False

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.start:5.0f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# 1. the matmul probe
# ------------------------------------------------------------------------------------------------
def matmul_probe(check: Check, n: int) -> float:
    """bf16 n x n x n matmul throughput, TFLOP/s (median of 5 rounds of 10)."""
    a = torch.randn(n, n, device=check.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=check.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        check.sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        check.sync()
        times.append((time.perf_counter() - t0) / 10)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------------------
# 2 and 4. the training step, eager and compiled
# ------------------------------------------------------------------------------------------------
class Step:
    """One configuration of the training step, built as `mapdit train` builds it, on a fixed random batch."""

    def __init__(self, check: Check, model_name: str, preset: str, batch: int, compiled: bool):
        self.cfg = make_config(model_name, preset=preset, **check.args.latent)
        tc = TrainConfig(num_steps=1000, batch_size=batch, precision="bf16", compile=compiled,
                         device=str(check.device)).resolved(self.cfg)
        self.model, self.params, self.opt, self.ema = model_optimizer_ema(self.cfg, tc, check.device)
        self.model.train()
        self.fwd = forward_of(self.model, Dist(device=check.device), compiled)
        self.diffusion = make_diffusion(self.cfg.num_train_steps, learn_sigma=self.cfg.learn_sigma)
        self.autocast = torch.autocast(check.device.type, dtype=torch.bfloat16)
        g = torch.Generator(device=check.device).manual_seed(0)
        c, s = self.cfg.in_channels, self.cfg.input_size
        shape = (batch, c, s, s)
        self.batch = Batch(torch.randn(shape, generator=g, device=check.device),
                           torch.randint(0, self.cfg.num_classes, (batch,), generator=g, device=check.device),
                           torch.randint(0, 1000, (batch,), generator=g, device=check.device),
                           torch.randn(shape, generator=g, device=check.device))
        self.n, self.step, self.check = batch, 0, check
        self.losses: list[float] = []

    def run(self, steps: int) -> float:
        """`steps` training steps; their mean wall time in seconds."""
        self.check.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            result = train_step(self.model, self.fwd, self.diffusion, self.opt, self.ema, self.params, self.batch,
                                self.step, autocast=self.autocast)
        self.check.sync()
        self.losses.append(float(result.stats[0]))
        return (time.perf_counter() - t0) / steps


def build_pair(check: Check, model_name: str, batch: int, compiled: bool) -> tuple[dict[str, Step], int, float]:
    """Config A and E steps at the largest batch <= `batch` that fits (halved on out-of-memory), warmed up
    (the compile happens here); returns them, the batch and the warm-up seconds."""
    while True:
        t0 = time.perf_counter()
        try:
            steps = {p: Step(check, model_name, p, batch, compiled) for p in PRESETS}
            for s in steps.values():
                s.run(check.args.warmup)
            return steps, batch, time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            steps = None
            torch.cuda.empty_cache()
            if batch <= 8:
                raise
            check.log(f"{model_name}: out of memory at batch {batch}; halving")
            batch //= 2


def measure_models(check: Check, compiled: bool, peak: float | None, probe: float) -> None:
    mode = "compiled" if compiled else "eager"
    for model_name, batch in check.args.models:
        # a compile of the bigger models takes minutes: ask for more time before starting one
        need = (60 + 40 * (model_name in ("DiT-B/2",)) + 120 * (model_name in ("DiT-L/2", "DiT-XL/2"))
                if compiled and not check.args.cpu_dry_run else 10)
        if not check.need(need, f"{model_name} {mode}"):
            continue
        check.log(f"{model_name} {mode}: building and warming up (batch {batch})")
        steps, batch, warm_s = build_pair(check, model_name, batch, compiled)
        times: dict[str, list[float]] = {p: [] for p in PRESETS}
        for r in range(check.args.rounds):
            order = PRESETS if r % 2 == 0 else PRESETS[::-1]  # alternate which goes first
            for p in order:
                times[p].append(steps[p].run(check.args.steps))
        for p in PRESETS:
            t = statistics.median(times[p])
            flops = train_flops_per_image(steps[p].cfg) * batch
            row = {"model": model_name, "config": p, "mode": mode, "batch": batch, "ms_per_step": 1e3 * t,
                   "images_per_s": batch / t, "tflops": flops / t / 1e12, "mfu": mfu(flops, t, peak),
                   "of_probe": flops / t / 1e12 / probe, "warmup_s": warm_s, "rounds_ms": [1e3 * x for x in times[p]],
                   "last_loss": steps[p].losses[-1]}
            check.results["models"].append(row)
            check.log(f"{model_name} {p} {mode}: {1e3 * t:.1f} ms/step, {row['tflops']:.1f} TFLOP/s")
        ratios = [e / a for a, e in zip(times["A"], times["E"])]
        check.results["ratios"].append({"model": model_name, "mode": mode, "batch": batch,
                                        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)})
        del steps
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# 3. a short real training run
# ------------------------------------------------------------------------------------------------
def mapdit_command() -> list[str]:
    """`mapdit` as this interpreter runs it, installed or not (src/ on the path)."""
    return [sys.executable, "-c", "import sys; from mapdit.cli import main; sys.exit(main())"]


def training_run(check: Check, work: Path) -> None:
    spec = check.args.train_run
    if not check.need(spec["expect_s"], f"training run ({spec['steps']} steps of {spec['model']})"):
        return
    from mapdit.data.latents import synthetic_latents

    lat = synthetic_latents(work / "latents", spec["items"], latent_shape=spec["latent_shape"], num_classes=1000)
    argv = ["train", "--data-path", str(lat), "--model", spec["model"], "--config", spec["config"],
            "--num-steps", str(spec["steps"]), "--global-batch-size", str(spec["batch"]), "--precision", "bf16",
            "--log-every", str(spec["log_every"]), "--ema-snapshots", "0", "--ckpt-every", str(spec["steps"]),
            "--results-dir", str(work / "results"), "--device", check.device.type]
    shown = "mapdit " + shlex.join(argv).replace(str(work), "$TMP")
    check.log(f"training run: {shown}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(mapdit_command() + argv, cwd=work, env=env, capture_output=True, text=True,
                          timeout=max(30.0, check.left()))
    wall = time.perf_counter() - t0
    run = {"command": shown, "wall_s": wall, "exit": proc.returncode}
    if proc.returncode != 0:
        run["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    else:
        import csv

        folder = sorted((work / "results").iterdir())[-1]
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        ckpts = sorted((folder / "checkpoints").glob("*.safetensors"))
        run.update(losses=[(int(r["step"]), float(r["loss"])) for r in rows],
                   steps_per_s=float(rows[-1]["steps_per_s"]), images_per_s=float(rows[-1]["images_per_s"]),
                   checkpoint_mb=ckpts[-1].stat().st_size / 1e6 if ckpts else None)
        run["loss_fell"] = run["losses"][-1][1] < run["losses"][0][1]
    check.results["training_run"] = run


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def _f(x, spec="{:.3g}") -> str:
    return "–" if x is None else spec.format(x)


def report(check: Check) -> str:
    r = check.results
    env = r["env"]
    lines = [f"{TITLE}, {env['date']}", "",
             f"- command: `{env['command']}`",
             f"- date: {env['date']} {env['time_utc']} UTC; wall time {r['wall_s']:.0f} s of a "
             f"{check.args.budget:.0f} s budget",
             f"- device: {env['device']}; dense bf16 peak {_f(env['peak_tflops'], '{:.0f}')} TFLOP/s "
             f"({env['peak_source']}); {env['host']}",
             f"- software: torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}",
             f"- matmul probe (bf16, {env['probe_n']}³, same run): {r['probe_tflops']:.0f} TFLOP/s"
             + (f" = {r['probe_tflops'] / env['peak_tflops']:.2f} of peak" if env["peak_tflops"] else ""),
             "", "The training step of `mapdit train` (projection, bf16-autocast loss, backward, fused Adam, power "
             f"EMA) on {env['latent']} latents; model FLOPs = 3 × the forward's (`mapdit.model.forward_flops`); "
             f"median of {check.args.rounds} rounds × {check.args.steps} steps after {check.args.warmup} warm-up steps "
             "(the compile happens in the warm-up).", ""]
    if r["models"]:
        lines += ["| model | config | mode | batch | ms/step | images/s | TFLOP/s | MFU (of peak) | of matmul probe "
                  "| warm-up s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in r["models"]:
            lines.append(f"| {m['model']} | {m['config']} | {m['mode']} | {m['batch']} | {m['ms_per_step']:.1f} | "
                         f"{m['images_per_s']:.0f} | {m['tflops']:.1f} | {_f(m['mfu'], '{:.3f}')} | "
                         f"{m['of_probe']:.3f} | {m['warmup_s']:.0f} |")
        lines += ["", "Config E ÷ Config A step time, paired per round (median, min–max):", ""]
        for q in r["ratios"]:
            lines.append(f"- {q['model']} {q['mode']}, batch {q['batch']}: **{q['median']:.3f}** "
                         f"({q['min']:.3f}–{q['max']:.3f})")
    run = r.get("training_run")
    if run:
        lines += ["", f"Training run: `{run['command']}` ($TMP: random latents in the prepared format, "
                  "`synthetic_latents`)", ""]
        if run["exit"] != 0:
            lines.append(f"- **failed** (exit {run['exit']}): {run.get('error', '')}")
        else:
            losses = ", ".join(f"{s}: {v:.4f}" for s, v in run["losses"])
            lines += [f"- wall time {run['wall_s']:.0f} s (start-up included); last window "
                      f"{run['steps_per_s']:.2f} steps/s, {run['images_per_s']:.0f} images/s",
                      f"- loss by step: {losses} ({'falls' if run['loss_fell'] else '**does not fall**'})",
                      f"- checkpoint: {_f(run['checkpoint_mb'], '{:.0f}')} MB"]
    if r["skipped"]:
        lines += ["", "Skipped: " + "; ".join(r["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def environment(args, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    peak = peak_tflops(name) if device.type == "cuda" else None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"device": name, "peak_tflops": peak,
            "peak_source": "NVIDIA datasheet, by device name" if peak else "device not in the table",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": f"{os.cpu_count()} CPUs", "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M"),
            "command": args.command + (" --cpu-dry-run" if args.cpu_dry_run else ""), "probe_n": args.probe_n,
            "latent": "{input_size}×{input_size}×{in_channels}".format(**args.latent)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=450.0, help="wall-clock budget in seconds (default 450)")
    p.add_argument("--out", default=None,
                   help="folder for gpu_check.md and gpu_check.json (default: $OUT, else benchmarks/results)")
    p.add_argument("--benchmarks", default=None,
                   help="the file the section is appended to (default: BENCHMARKS.md; with --cpu-dry-run: "
                        "BENCHMARKS-dry-run.md in --out)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the plumbing on the CPU: tiny models, a few steps, compile with the 'eager' backend; "
                        "writes only into --out (default: a new temporary folder)")
    p.add_argument("--command", default="benchmarks/gpu_check.sh", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="gpu_check-") if args.cpu_dry_run
                    else os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    if args.benchmarks is None:  # a dry run never touches the repository's BENCHMARKS.md
        args.benchmarks = str(Path(args.out) / "BENCHMARKS-dry-run.md" if args.cpu_dry_run else ROOT / "BENCHMARKS.md")
    if args.cpu_dry_run:  # everything small: DiT-XXS/4 on 8x8x4 latents
        args.models, args.latent = (("DiT-XXS/4", 4),), dict(input_size=8, in_channels=4, num_classes=10)
        args.steps, args.rounds, args.warmup, args.probe_n = 2, 2, 1, 256
        args.train_run = dict(model="DiT-XXS/4", config="E", steps=4, batch=4, log_every=2, items=16,
                              latent_shape=(4, 8, 8), expect_s=5)
    else:
        args.models, args.latent = MODELS, LATENT
        args.steps, args.rounds, args.warmup, args.probe_n = 10, 3, 3, 8192
        args.train_run = dict(TRAIN_RUN, items=4096, latent_shape=(4, 32, 32), expect_s=90)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: error: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine "
              "(or --cpu-dry-run to try the plumbing)", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as mapdit.setup.init_device
        torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)
    check = Check(args, device)

    def on_term(signum, frame):
        raise OutOfTime(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    check.results["env"] = env = environment(args, device)
    peak = env["peak_tflops"]
    try:
        with compile_backend("eager" if args.cpu_dry_run else None), tempfile.TemporaryDirectory() as tmp:
            check.results["probe_tflops"] = probe = matmul_probe(check, args.probe_n)
            check.log(f"{env['device']}: matmul probe {probe:.1f} TFLOP/s, peak {peak}")
            measure_models(check, compiled=False, peak=peak, probe=probe)
            training_run(check, Path(tmp))
            measure_models(check, compiled=True, peak=peak, probe=probe)
    except OutOfTime as e:
        check.results["skipped"].append(f"everything after the stop ({e})")
    check.results["wall_s"] = time.monotonic() - check.start
    text = report(check)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(check.results, indent=1))
    check.log(f"appending the section to {args.benchmarks}; gpu_check.md and gpu_check.json in {out}")
    with open(args.benchmarks, "a") as f:
        f.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
