"""What an experiment gives every variant: a training budget and a scoring budget (frozen: one budget for
all variants), and `mapdit study`'s budget (FULL, QUICK), learning-rate brackets and arms (what it trains)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mapdit.config import MP_OPTIONS, ModelConfig, default_lr, make_config
from mapdit.errors import UserError
from mapdit.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS


@dataclass(frozen=True)
class TrainBudget:
    """How every variant is trained."""

    model: str
    num_steps: int
    batch_size: int = 256
    lr: float | None = None  # None: the config's default (1e-4, or 1e-2 with weight normalisation)
    data_path: str = "fashion-mnist"
    ema_snapshots: int = 100
    ckpt_every: int | None = None  # None: num_steps // 5 (one magnitude measurement per checkpoint)
    ckpt_steps: tuple[int, ...] | None = None  # checkpoints at exactly these steps too
    log_every: int = 10
    precision: str = "fp32"
    min_snr_gamma: float | None = None  # None: DiT's unweighted eps-MSE


@dataclass(frozen=True)
class ScoreBudget:
    """How every variant is scored: the Fréchet distance of its samples and its residual magnitudes."""

    fid_samples: int = 10_000
    features: str | None = None  # None: fmnist for Fashion-MNIST, inception otherwise
    ref: str | None = None  # None: the training data
    num_ref: int | None = None
    sampler: str = "ddpm"
    sampling_steps: int = 250
    cfg_scale: float = 1.0
    weights: str = "ema"
    ema_std: float | None = None
    sample_batch_size: int = 64
    magnitude_batch_size: int = 64


# the settings a stored result records; a stored result counts for an ablation only when they all match
SETTINGS_KEYS = ("model", "num_steps", "batch_size", "lr", "data_path", "fid_samples", "features", "ref",
                 "num_ref", "sampler", "sampling_steps", "cfg_scale", "weights", "ema_std", "min_snr_gamma")


def settings(train: TrainBudget, score: ScoreBudget) -> dict:
    """The budget as a stored result records it (results/<variant>.json "settings")."""
    both = {**dataclasses.asdict(train), **dataclasses.asdict(score)}
    return {key: both[key] for key in SETTINGS_KEYS}




# ------------------------------------------------------------------------------------------------
# `mapdit study`: its budget
# ------------------------------------------------------------------------------------------------
PARTS = ("rates", "components", "modulation", "seeds", "magnitudes", "grid")  # `--studies`, run in this order
CONFIGS = ("A", "B", "C", "D", "E")
MODULATIONS = ("adaln", "scale", "shift", "rotate", "scale+rotate")

# Scoring of every run (one constant each, so that they change in one place)
SCORE_SAMPLES = 1000
SCORE_CFG = 4.0  # classifier-free guidance on every channel
SCORE_EMA = 0.10  # EMA sigma_rel every run is scored with (a width training tracks: no post-hoc reconstruction)
HELDOUT_IMAGES = 2000  # test images of the held-out eps-MSE
TEST_IMAGES = 10_000  # Fashion-MNIST's test split: the scoring reference and the held-out images

# Learning-rate brackets (rates part); later parts use each config's best rate from these
# (C's 0.1 and 0.3, D's and E's 0.3 were added when the best rate of the bracket sat at its edge; B's 1e-4
# is the paper's default without weight normalisation, reported beside the best like A's)
RATES = {"A": (1e-4, 3e-3, 1e-2, 3e-2), "B": (1e-4, 3e-3, 1e-2, 3e-2), "C": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
         "D": (1e-2, 3e-2, 1e-1, 3e-1), "E": (1e-2, 3e-2, 1e-1, 3e-1)}


@dataclass(frozen=True)
class StudyBudget:
    """What every run of `mapdit study` gets and how it is scored; study.json stores it (`to_dict`) and a
    rerun with another one is refused. `seeds`: the seeds of the headline comparisons (every other part
    uses the first); `checkpoints`: kept checkpoints (Figure 5), the last one `num_steps`; `rates`: each
    config's bracket."""

    model: str
    num_steps: int
    batch_size: int
    seeds: tuple[int, ...]
    fid_samples: int
    sampler: str
    sampling_steps: int
    cfg_scale: float
    ema_std: float
    heldout_images: int
    checkpoints: tuple[int, ...]
    rates: dict = field(hash=False)  # config -> tuple of rates
    num_ref: int | None = None  # a fixed random subset of the test images (None: all 10k)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (None: unweighted eps-MSE)

    def __post_init__(self):  # JSON lists and ints as given become the stored types
        set_ = object.__setattr__
        set_(self, "seeds", tuple(int(s) for s in self.seeds))
        set_(self, "checkpoints", tuple(sorted(int(c) for c in self.checkpoints)))
        set_(self, "rates", {c: tuple(float(r) for r in v) for c, v in self.rates.items()})
        set_(self, "cfg_scale", float(self.cfg_scale))
        set_(self, "ema_std", float(self.ema_std))

    def to_dict(self) -> dict:
        """As study.json stores it (lists, not tuples)."""
        d = dataclasses.asdict(self)
        return dict(d, seeds=list(self.seeds), checkpoints=list(self.checkpoints),
                    rates={c: list(v) for c, v in self.rates.items()})

    @classmethod
    def from_dict(cls, data: dict, base: "StudyBudget | None" = None) -> "StudyBudget":
        """A stored budget; keys it lacks come from `base` (default FULL)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(base or FULL, **{k: v for k, v in data.items() if k in names})

    def check(self) -> "StudyBudget":
        """Every setting a run would reject, as a one-line UserError naming its flag, before anything is
        stored or trained (a bad one used to fail after the first run had trained, with study.json already
        holding it, so the corrected rerun was refused as "other settings")."""
        try:
            make_config(self.model)
        except UserError as err:
            raise UserError(f"--model {self.model}: {err}") from None
        whole = {"--num-steps": (self.num_steps, 1), "--batch-size": (self.batch_size, 1),
                 "--fid-samples": (self.fid_samples, 2), "--sampling-steps": (self.sampling_steps, 1),
                 "--heldout-images": (self.heldout_images, 1)}
        if self.num_ref is not None:
            whole["--num-ref"] = (self.num_ref, 2)
        for flag, (value, least) in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                why = " (a Fréchet distance needs 2)" if least == 2 else ""
                raise UserError(f"{flag} {value}: give a whole number of at least {least}{why}")
        if self.num_ref is not None and self.num_ref > TEST_IMAGES:
            raise UserError(f"--num-ref {self.num_ref}: the Fashion-MNIST test split has {TEST_IMAGES} images; give "
                            "at most that many, or leave it out (all of them)")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise UserError(f"--cfg-scale {self.cfg_scale:g}: give a finite number >= 0 (1: no guidance)")
        return self

    @property
    def seed0(self) -> int:
        return self.seeds[0]

    def train_budget(self, lr: float, *, ema_snapshots: int = 10, log_every: int = 50) -> TrainBudget:
        """The training budget of a run at `lr`: checkpoints at exactly the kept steps (was every multiple of
        their gcd: every step for 7,20, ~50 GB at the full budget)."""
        return TrainBudget(model=self.model, num_steps=self.num_steps, batch_size=self.batch_size, lr=lr,
                           data_path="fashion-mnist", ema_snapshots=ema_snapshots, ckpt_every=self.num_steps,
                           ckpt_steps=self.checkpoints, log_every=log_every, min_snr_gamma=self.min_snr_gamma)

    def score_budget(self, *, sample_batch_size: int = 250, magnitude_batch_size: int = 64) -> ScoreBudget:
        """FD_fmnist and conditioning accuracy against the Fashion-MNIST test images, EMA `ema_std`."""
        return ScoreBudget(fid_samples=self.fid_samples, features="fmnist", num_ref=self.num_ref,
                           sampler=self.sampler, sampling_steps=self.sampling_steps, cfg_scale=self.cfg_scale,
                           weights="ema", ema_std=self.ema_std, sample_batch_size=sample_batch_size,
                           magnitude_batch_size=magnitude_batch_size)


# FULL: the demo's recipe (DiT-XXS/4, batch 32, Min-SNR-5) at half its length: 2000 steps, about one epoch, where
# Config A at 1e-2 already reaches conditioning accuracy 0.883 (FD 33.5; docs/recipe.md, lever
# batch32+minsnr5@1000); seeds 0-2 for the headline comparisons, checkpoints at 500, 1000 and 2000 steps
# (Figure 5). 47 runs: the plan estimates ~6.2 min per run on 2 idle cores (~4.7 hours one at a time, ~3.8
# with --workers 2); measured 2026-12-02 on idle cores, 5.2 min per 2-thread run and 7.2-7.6 min per pair of
# 1-thread runs (--workers 2), i.e. ~2.9 hours for all 47. QUICK: the same parts with everything smaller and
# one seed (23 runs; the plan estimates 12 minutes, measured 6.1 on idle cores), a smoke test, not evidence.
FULL = StudyBudget(model="DiT-XXS/4", num_steps=2000, batch_size=32, seeds=(0, 1, 2), fid_samples=SCORE_SAMPLES,
                   sampler=DEFAULT_SAMPLER, sampling_steps=DEFAULT_STEPS, cfg_scale=SCORE_CFG, ema_std=SCORE_EMA,
                   heldout_images=HELDOUT_IMAGES, checkpoints=(500, 1000, 2000), rates=RATES, min_snr_gamma=5.0)
QUICK = StudyBudget(model="DiT-XXS/4", num_steps=80, batch_size=16, seeds=(0,), fid_samples=200,
                    sampler=DEFAULT_SAMPLER, sampling_steps=10, cfg_scale=SCORE_CFG, ema_std=SCORE_EMA,
                    heldout_images=500, checkpoints=(40, 80),
                    rates={"A": (1e-4, 1e-2), "B": (1e-2,), "C": (1e-2,), "D": (3e-2,), "E": (1e-2, 3e-2)},
                    min_snr_gamma=5.0)


def paper_rate(model: str, config: str) -> float:
    """The rate `train` picks when none is given (the paper's; mapdit.config.default_lr)."""
    return default_lr(make_config(model, preset=config))


# ------------------------------------------------------------------------------------------------
# `mapdit study`: its arms (what is trained: a base config, a modulation, ModelConfig fields set on top)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    name: str
    config: str
    modulation: str = "adaln"
    what: str = ""
    overrides: dict = field(default_factory=dict, hash=False)  # ModelConfig fields set as given


BASE_ARMS = {c: Arm(c, c, what=f"Config {c}") for c in CONFIGS}
TIME_EMBEDDING_ARMS = {
    "E-table": Arm("E-table", "E", what="upstream's learned timestep table", overrides={"time_embedding": "table"}),
    "E-mp-sinusoid": Arm("E-mp-sinusoid", "E", what="unit-RMS sinusoid (DiT's x sqrt 2)",
                         overrides={"time_embedding": "mp-sinusoid"}),
}
ACTIVATION_ARMS = {"E-silu": Arm("E-silu", "E", what="upstream's SiLU instead of DiT's GELU",
                                 overrides={"mlp_activation": "silu"})}
PER_MODULATOR = {"modulation_gains": "per-modulator"}


def component_arms() -> dict[str, Arm]:
    """The components part: E with each MP option off (leave-one-out), the time-embedding variants and the
    activation, by name. Each differs from E in exactly one ModelConfig field as built."""
    arms = {f"E-{o}": Arm(f"E-{o}", "E", what=f"without {o}", overrides={o: False}) for o in MP_OPTIONS}
    return {**arms, **TIME_EMBEDDING_ARMS, **ACTIVATION_ARMS}


def modulation_arms(modulations=MODULATIONS) -> dict[str, Arm]:
    """The modulation part (paper Table 2) by modulation name: Config E with per-modulator gains and each
    modulation. adaln is one of them (E-pm-adaln, its own run: E itself has one shared gain per block), and
    each other arm differs from it in the modulation only."""
    return {m: Arm(f"E-pm-{m}", "E", m, what=f"modulation {m}, per-modulator gains", overrides=dict(PER_MODULATOR))
            for m in modulations}


# the headline comparisons: (title, x, y); the paired difference is x - y, seed by seed
COMPARISONS = (("full MP vs the baseline (each at its best rate)", "E", "A"),
               ("smooth noise-level embedding vs upstream's table", "E", "E-table"),
               ("scale+rotate vs adaln (per-modulator gains)", "E-pm-scale+rotate", "E-pm-adaln"))


def arm_by_name(name: str) -> Arm:
    arms = {**BASE_ARMS, **component_arms(), **{a.name: a for a in modulation_arms().values()}}
    if name not in arms:
        raise UserError(f"unknown arm {name!r}: use one of {', '.join(arms)}")
    return arms[name]


# ModelConfig fields whose default follows other options (`ModelConfig.validate` resolves them)
DEPENDENT = ("time_embedding", "conditioning")


def with_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """`cfg` with ModelConfig fields set as given and the defaults that depend on other options resolved again
    from the result (unless set): E without mp_embedding builds the sinusoid of a model without it, as the
    study always has (make_config resolves them for the preset, before an option is turned off)."""
    if not overrides:
        return cfg
    return dataclasses.replace(cfg, **{**{k: None for k in DEPENDENT}, **overrides}).validate()


def arm_config(model: str, arm: Arm) -> ModelConfig:
    """The ModelConfig an arm trains, the way `run_ablation` builds it: the preset with the modulation, then the
    overrides (`with_overrides`)."""
    return with_overrides(make_config(model, preset=arm.config, modulation=arm.modulation), arm.overrides)
