"""What an experiment gives every variant: a training budget and a scoring budget (frozen: one budget for
all variants), and `mapdit study`'s budget (FULL, QUICK), learning-rate brackets and arms (what it trains)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mapdit.config import MP_OPTIONS, PRECISIONS, ModelConfig, TrainConfig, default_lr, make_config
from mapdit.errors import UserError
from mapdit.options import REQUIRED, opt, option
from mapdit.samplers import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, PAPER_SPEC, SAMPLER_CHOICES

# Each budget field is declared once with `opt` (mapdit.options): `mapdit ablate` and `mapdit study` generate
# their options, help texts and defaults from these declarations (mapdit.commands.options.add_options).


@dataclass(frozen=True, kw_only=True)
class TrainBudget:
    """How every variant is trained (`mapdit ablate`'s training options)."""

    model: str = opt("DiT-XS/2", option(ModelConfig, "model").help)
    num_steps: int = opt(REQUIRED, "training steps of every variant")
    batch_size: int = opt(256, option(TrainConfig, "batch_size").help, aliases=("--global-batch-size",))
    lr: float | None = opt(None, "peak learning rate of every variant (default: each config's own, by the rule "
                           "mapdit train uses: mapdit.config.default_lr)")
    data_path: str = opt("fashion-mnist", "training data: 'fashion-mnist', a folder of IDX files, a folder of "
                         "class subfolders, or prepared latents")
    ema_snapshots: int = opt(100, option(TrainConfig, "ema_snapshots").help)
    ckpt_every: int | None = opt(None, "checkpoint every N steps (default: num_steps // 5; the magnitudes are "
                                 "measured at every checkpoint)")
    ckpt_steps: tuple[int, ...] | None = opt(None, option(TrainConfig, "ckpt_steps").help, cli=False)
    log_every: int = opt(10, option(TrainConfig, "log_every").help)
    precision: str = opt("fp32", option(TrainConfig, "precision").help, choices=PRECISIONS)
    min_snr_gamma: float | None = opt(None, "Min-SNR-gamma loss weighting (default: none, DiT's unweighted "
                                      "eps-MSE)", cli=False)


@dataclass(frozen=True)
class ScoreBudget:
    """How every variant is scored: the Fréchet distance of its samples and its residual magnitudes
    (`mapdit ablate`'s scoring options; the paper's sampler, ddpm at 250 steps without guidance, is its
    explicit default here, not the CLI's few-step one)."""

    fid_samples: int = opt(10_000, "samples generated per variant for its Fréchet distance", flag="--fd-samples",
                           aliases=("--fid-samples",))
    features: str | None = opt(None, "features of the distance: fmnist (FD_fmnist) or inception (FID) (default: "
                               "fmnist for Fashion-MNIST, inception otherwise)", choices=("fmnist", "inception"))
    ref: str | None = opt(None, "reference of the distance: 'fashion-mnist', an image folder, a prepared latent "
                          "folder or an ADM reference batch .npz (default: the training data)")
    num_ref: int | None = opt(None, "a fixed random subset of the reference of this many images (default: all)")
    sampler: str = opt(PAPER_SPEC.sampler, "ddpm/ancestral, ddim (ours) or dpm++2m, unipc, heun (diffusers' "
                       "few-step solvers)", choices=SAMPLER_CHOICES)
    sampling_steps: int = opt(PAPER_SPEC.steps, "sampler steps")
    cfg_scale: float = opt(PAPER_SPEC.cfg_scale, "classifier-free guidance scale (1: none)")
    weights: str = opt("ema", "sample from the EMA weights or the raw trained ones", choices=("ema", "raw"))
    ema_std: float | None = opt(None, "EMA width sigma_rel sampled from (default: the smallest tracked one)")
    sample_batch_size: int = opt(64, "samples per sampling batch (per rank)")
    magnitude_batch_size: int = opt(64, "images per batch of the magnitude measurement")


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
SCORE_CFG = DEFAULT_CFG  # classifier-free guidance on every channel
SCORE_EMA = 0.10  # EMA sigma_rel every run is scored with (a width training tracks: no post-hoc reconstruction)
HELDOUT_IMAGES = 2000  # test images of the held-out eps-MSE
TEST_IMAGES = 10_000  # Fashion-MNIST's test split: the scoring reference and the held-out images

# Learning-rate brackets (rates part); later parts use each config's best rate from these
# (C's 0.1 and 0.3, D's and E's 0.3 were added when the best rate of the bracket sat at its edge; B's 1e-4
# is the paper's default without weight normalisation, reported beside the best like A's)
RATES = {"A": (1e-4, 3e-3, 1e-2, 3e-2), "B": (1e-4, 3e-3, 1e-2, 3e-2), "C": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
         "D": (1e-2, 3e-2, 1e-1, 3e-1), "E": (1e-2, 3e-2, 1e-1, 3e-1)}


def comma_ints(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2): a list option typed as one word (study's --seeds, --checkpoints)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        values = ()
    if not values:
        raise UserError(f"{text!r}: give comma-separated whole numbers, e.g. 0,1,2")
    if len(set(values)) != len(values):
        raise UserError(f"{text!r} lists an entry twice")
    return values


def parse_rates(text: str) -> dict[str, tuple[float, ...]]:
    """'A=1e-4/1e-2,E=1e-2' -> {"A": (1e-4, 1e-2), "E": (1e-2,)} (study's --rates)."""
    rates = {}
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        config, _, values = item.partition("=")
        config = config.strip().upper()
        try:
            parsed = tuple(float(v) for v in values.split("/") if v.strip())
        except ValueError:
            parsed = ()
        if config not in CONFIGS or not parsed or config in rates or any(not (0 < v < 1) for v in parsed):
            raise UserError(f"{text!r}: give CONFIG=rate/rate/..., comma-separated, e.g. A=1e-4/1e-2,E=3e-2")
        rates[config] = parsed
    return rates


def format_rates(rates: dict) -> str:
    """The brackets as --rates takes them: A=0.0001/0.01,E=0.03."""
    return ",".join(f"{c}={'/'.join(f'{r:g}' for r in v)}" for c, v in rates.items())


def _unhashed(f):
    """A field left out of the frozen dataclass's hash (a dict cannot be hashed)."""
    f.hash = False
    return f


@dataclass(frozen=True)
class StudyBudget:
    """What every run of `mapdit study` gets and how it is scored; study.json stores it (`to_dict`) and a
    rerun with another one is refused. The defaults are the full study (FULL); each field is also the study's
    command-line option (mapdit.options.opt)."""

    model: str = opt("DiT-XXS/4", option(ModelConfig, "model").help)
    num_steps: int = opt(2000, "training steps of every run")
    batch_size: int = opt(32, "batch size of every run")
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds of the headline comparisons (the seeds part), comma-separated; "
                                 "every other part uses the first", parse=comma_ints, metavar="SEEDS")
    fid_samples: int = opt(SCORE_SAMPLES, "samples per run scored (FD_fmnist and conditioning accuracy)",
                           flag="--fd-samples", aliases=("--fid-samples",))
    sampler: str = opt(DEFAULT_SAMPLER, "sampler of the scoring", choices=SAMPLER_CHOICES)
    sampling_steps: int = opt(DEFAULT_STEPS, "sampler steps of the scoring")
    cfg_scale: float = opt(SCORE_CFG, "classifier-free guidance scale of the scoring, on every channel")
    ema_std: float = opt(SCORE_EMA, "EMA width sigma_rel every run is scored with (a tracked one)", cli=False)
    heldout_images: int = opt(HELDOUT_IMAGES, "test images of the held-out eps-MSE")
    checkpoints: tuple[int, ...] = opt((500, 1000, 2000), "kept checkpoints (Figure 5), comma-separated, the "
                                       "last one = --num-steps", parse=comma_ints, metavar="STEPS")
    rates: dict = _unhashed(opt(RATES, "learning-rate brackets of the rates part, CONFIG=rate/rate/..., "
                                "comma-separated; each config named gets this bracket instead "
                                f"(default: {format_rates(RATES)})", parse=parse_rates, metavar="RATES"))
    num_ref: int | None = opt(None, f"a fixed random subset of the Fashion-MNIST test images as the reference "
                              f"(default: none, all {TEST_IMAGES})")
    min_snr_gamma: float | None = opt(5.0, "Min-SNR-gamma loss weighting of every run (0: DiT's unweighted "
                                      "eps-MSE)")

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
                 "--fd-samples": (self.fid_samples, 2), "--sampling-steps": (self.sampling_steps, 1),
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


# FULL (StudyBudget's defaults): the demo's recipe (DiT-XXS/4, batch 32, Min-SNR-5) at half its length: 2000
# steps, about one epoch, where Config A at 1e-2 already reaches conditioning accuracy 0.883 (FD 33.5;
# docs/recipe.md, lever batch32+minsnr5@1000); seeds 0-2 for the headline comparisons, checkpoints at 500, 1000
# and 2000 steps (Figure 5). 47 runs: the plan estimates ~6.2 min per run on 2 idle cores (~4.7 hours one at a
# time, ~3.8 with --workers 2); measured 2026-12-02 on idle cores, 5.2 min per 2-thread run and 7.2-7.6 min per
# pair of 1-thread runs (--workers 2), i.e. ~2.9 hours for all 47. QUICK: the same parts with everything smaller
# and one seed (23 runs; the plan estimates 12 minutes, measured 6.1 on idle cores), a smoke test, not evidence.
FULL = StudyBudget()
QUICK = StudyBudget(num_steps=80, batch_size=16, seeds=(0,), fid_samples=200, sampling_steps=10, heldout_images=500,
                    checkpoints=(40, 80),
                    rates={"A": (1e-4, 1e-2), "B": (1e-2,), "C": (1e-2,), "D": (3e-2,), "E": (1e-2, 3e-2)})


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
