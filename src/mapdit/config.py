"""Configuration as plain data: the model's (sizes, the eight MP options, modulation, presets A-E) and the
training run's.

A `ModelConfig` is everything needed to rebuild a model, a `TrainConfig` everything a training run is
driven by; both round-trip through JSON and are stored with every run (config.json). Options are resolved
here and in `model.Layers` (when `DiT` is built), never inside forwards.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass

from .errors import UserError
from .options import check_choice, flag_of, opt, stored_fields
from .recipes import RECIPE_NAMES, RECIPES

# name -> (depth, width, heads). XS is upstream MaP-DiT's addition; XXS is ours, for CPU demos.
SIZES: dict[str, tuple[int, int, int]] = {
    "XXS": (4, 128, 4),
    "XS": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
MODEL_NAMES = [f"DiT-{s}/{p}" for s in SIZES for p in PATCHES]

# The eight techniques of the paper, by their command-line names (`--use-<name with dashes>`).
MP_OPTIONS = (
    "cosine_attention",
    "weight_normalization",
    "forced_weight_normalization",
    "mp_residual",
    "mp_silu",
    "no_layernorm",
    "mp_pos_enc",
    "mp_embedding",
)

# The ablation ladder (configs A to E of the MaP-DiT paper): cumulative. The B/C split is inferred, not
# confirmed by the paper.
PRESETS: dict[str, tuple[str, ...]] = {
    "A": (),
    "B": ("cosine_attention",),
    "C": ("cosine_attention", "weight_normalization"),
    "D": ("cosine_attention", "weight_normalization", "forced_weight_normalization"),
    "E": MP_OPTIONS,
}

MLP_ACTIVATIONS = ("gelu", "silu")
TIME_EMBEDDINGS = ("sinusoid", "mp-sinusoid", "fourier", "table")
MODULATION_GAINS = ("shared", "per-modulator")
CONDITIONINGS = ("sum", "balanced")
GATE_INITS = ("zero", "identity")
ROTATION_PAIRINGS = ("half", "interleaved")

MODULATION_PARTS = ("shift", "scale", "rotate", "gate")  # order of chunks in the modulation linear
MODULATION_ALIASES = {"adaln": ("shift", "scale", "gate")}


def _fits(value, hint) -> bool:
    """Is `value` (as read from JSON) of the annotated type `hint`? bool is not an int here, ints are floats,
    floats must be finite, and a JSON list stands for a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return True  # a type this check does not know: left to the dataclass's own checks


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        inner = _type_name(args[0]) if len(args) == 2 and args[1] is Ellipsis else None
        return f"a list of {inner}s" if inner else f"a list of {len(args)} numbers"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_field_types(cls, data: dict, where: str) -> None:
    """One-line UserError naming the first field of `data` (read from a file: `where`) whose value is not of
    the type the dataclass `cls` declares for it, e.g. "num_classes": "ten"."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in hints and not _fits(value, hints[key]):
            raise UserError(f"{where}: {key} is {json.dumps(value)}, not {_type_name(hints[key])}: fix or replace "
                            "the file")


def parse_modulation(text: str) -> tuple[str, ...]:
    """'adaln' | any '+'-joined subset of {scale, shift, rotate, gate}.

    A gate is part of every named variant unless written as 'nogate' (the paper's variants are
    'scale', 'shift', 'rotate', 'scale+rotate', all with a gate). Returned in canonical chunk order.
    """
    parts: set[str] = set()
    gate = True
    for token in text.lower().replace(" ", "").split("+"):
        if token in MODULATION_ALIASES:
            parts.update(MODULATION_ALIASES[token])
        elif token == "nogate":
            gate = False
        elif token in MODULATION_PARTS:
            parts.add(token)
        else:
            raise UserError(f"unknown modulation part {token!r} in {text!r}: use 'adaln' or a '+'-joined "
                            "subset of scale, shift, rotate, gate (add 'nogate' to drop the gate)")
    parts.add("gate") if gate else parts.discard("gate")
    if not parts - {"gate"}:
        raise UserError(f"modulation {text!r} conditions nothing: give at least one of scale, shift, rotate")
    return tuple(p for p in MODULATION_PARTS if p in parts)


def canonical_modulation(parts: tuple[str, ...]) -> str:
    """The name config.json records for a set of modulation parts: 'adaln' for shift+scale+gate, else the parts
    in chunk order, with '+nogate' when there is no gate (so that parsing the name gives the parts back)."""
    if parts == MODULATION_ALIASES["adaln"]:
        return "adaln"
    name = "+".join(p for p in parts if p != "gate")
    return name + ("+gate" if "gate" in parts else "+nogate")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (config.json's "model"). Every field is a run setting: on
    --resume it must match the run's own (resume policy "match", mapdit.options)."""

    model: str = opt("DiT-S/2", f"model size and patch: DiT-{{{','.join(SIZES)}}}/{{{','.join(map(str, PATCHES))}}}",
                     metavar="DiT-SIZE/PATCH")
    input_size: int = opt(32, "latent/image side length (train: from the data)")
    in_channels: int = opt(4, "input channels (train: from the data)")
    num_classes: int = opt(1000, "number of classes (train: from the data)")
    learn_sigma: bool = opt(True, "learn the variance too, as DiT (off: eps only)",
                            flag="--no-learn-sigma")
    # the one label-dropout rate: the share of training labels replaced by the null class, which is the row
    # classifier-free guidance samples with (DiT's class_dropout_prob; 0: no null class, no guidance)
    class_dropout_prob: float = opt(0.1, "label dropout: the share of training labels replaced by the null class "
                                    "that classifier-free guidance uses (0: no null class, no guidance)",
                                    flag="--label-dropout")
    num_train_steps: int = opt(1000, "diffusion steps (rows of the MP timestep table)", cli=False)
    mlp_ratio: float = opt(4.0, "MLP hidden width / model width", cli=False)
    # the eight MP options
    cosine_attention: bool = opt(False, "MP: cosine attention (normalised queries and keys)",
                                 flag="--use-cosine-attention")
    weight_normalization: bool = opt(False, "MP: weight-normalised linears (bias-free MP linears)",
                                     flag="--use-weight-normalization")
    forced_weight_normalization: bool = opt(False, "MP: forced weight normalisation (weights projected to unit "
                                            "rows every step)", flag="--use-forced-weight-normalization")
    mp_residual: bool = opt(False, "MP: magnitude-preserving residual sums (EDM2 eq. 88)", flag="--use-mp-residual")
    mp_silu: bool = opt(False, "MP: activations divided by their RMS on unit Gaussian input", flag="--use-mp-silu")
    no_layernorm: bool = opt(False, "MP: no LayerNorm before the modulation", flag="--use-no-layernorm")
    mp_pos_enc: bool = opt(False, "MP: unit-magnitude positional encoding", flag="--use-mp-pos-enc")
    mp_embedding: bool = opt(False, "MP: unit-magnitude timestep and label embeddings", flag="--use-mp-embedding")
    # choices beside the eight options (each changes only what it names)
    mlp_activation: str = opt("gelu", "the MLP's activation: gelu (DiT's tanh-GELU) or silu; --use-mp-silu divides "
                              "it by its RMS", choices=MLP_ACTIVATIONS)
    # None resolves (in `validate`, so config.json records the resolved value): "fourier" with mp_embedding,
    # else "sinusoid"
    time_embedding: str | None = opt(None, "timestep features: sinusoid (DiT), mp-sinusoid (the same times sqrt 2), "
                                     "fourier (MP Fourier features of ln(sigma_t)/4, EDM2), table (a learned MP row "
                                     "per step, upstream MaP-DiT) (default: fourier with --use-mp-embedding, i.e. "
                                     "preset E, else sinusoid)", choices=TIME_EMBEDDINGS)
    modulation_gains: str = opt("shared", "models with MP linears: one learned modulation gain per block (shared) "
                                "or one per modulator (per-modulator)", choices=MODULATION_GAINS)
    # None resolves (in `validate`): "balanced" with MP linears (their unit rows let |t| grow by alignment
    # while the label stays small: the label then moves the modulation < 1 %), else "sum"
    conditioning: str | None = opt(None, "how the timestep and label embeddings form the conditioning: sum (DiT's "
                                   "t + y; an MP sum with --use-mp-residual) or balanced (each RMS 1, then an MP "
                                   "sum, EDM2) (default: balanced with MP linears, i.e. --use-weight-normalization "
                                   "or --use-forced-weight-normalization and presets C, D, E; else sum)",
                                   choices=CONDITIONINGS)
    modulation: str = opt("adaln", "adaln (shift+scale+gate) or a '+'-joined subset of scale, shift, rotate, gate; a "
                          "gate is included unless 'nogate' is added; e.g. scale+rotate")
    gate_init: str = opt("zero", "zero: branch * g (AdaLN-Zero); identity: branch * (1 + g)", choices=GATE_INITS)
    rotation_pairing: str = opt("half", "which channels the rotation modulation pairs (nn.rotate_pairs)",
                                choices=ROTATION_PAIRINGS)
    # residual blend t of the MP sum (EDM2 eq. 88; 0.3 for block residuals, EDM2's res_balance)
    residual_blend: float = opt(0.3, "blend t of the MP residual sum (EDM2 eq. 88)", cli=False)
    preset: str | None = opt(None, "ablation preset: A = the original DiT, B-D add cosine attention, weight "
                             "normalisation, forced weight normalisation, E = all eight MP options; --use-* flags add "
                             "to it. With MP linears (C, D, E) --conditioning resolves to balanced, and with "
                             "--use-mp-embedding (E) --time-embedding to fourier", flag="--config",
                             choices=tuple(PRESETS), parse=str.upper)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def size(self) -> str:
        return parse_model_name(self.model)[0]

    @property
    def patch_size(self) -> int:
        return parse_model_name(self.model)[1]

    @property
    def depth(self) -> int:
        return SIZES[self.size][0]

    @property
    def hidden_size(self) -> int:
        return SIZES[self.size][1]

    @property
    def num_heads(self) -> int:
        return SIZES[self.size][2]

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def modulation_parts(self) -> tuple[str, ...]:
        return parse_modulation(self.modulation)

    @property
    def time_embedding_kind(self) -> str:
        if self.time_embedding is not None:
            return self.time_embedding
        return "fourier" if self.mp_embedding else "sinusoid"

    @property
    def conditioning_kind(self) -> str:
        if self.conditioning is not None:
            return self.conditioning
        return "balanced" if self.uses_mp_linear else "sum"

    @property
    def uses_mp_linear(self) -> bool:
        """Linears become bias-free MP linears when either weight-normalisation option is on."""
        return self.weight_normalization or self.forced_weight_normalization

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.class_dropout_prob > 0 else None

    def enabled_mp_options(self) -> list[str]:
        return [name for name in MP_OPTIONS if getattr(self, name)]

    # ---- checks and serialisation ----------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        check_field_types(type(self), dataclasses.asdict(self), "model config")
        parse_model_name(self.model)
        if self.input_size % self.patch_size:
            raise UserError(f"patch size {self.patch_size} of {self.model} does not divide input size "
                            f"{self.input_size}: pick a patch size that divides it or pad/resize the data")
        if self.in_channels < 1 or self.num_classes < 1:
            raise UserError("in_channels and num_classes must be at least 1")
        check_choice(self.gate_init, "gate_init", GATE_INITS)
        check_choice(self.mlp_activation, "mlp_activation", MLP_ACTIVATIONS, "MLP activation")
        check_choice(self.modulation_gains, "modulation_gains", MODULATION_GAINS)
        check_choice(self.rotation_pairing, "rotation_pairing", ROTATION_PAIRINGS)
        if self.time_embedding is not None:
            check_choice(self.time_embedding, "time_embedding", TIME_EMBEDDINGS)
        if self.conditioning is not None:
            check_choice(self.conditioning, "conditioning", CONDITIONINGS)
        if not 0 <= self.class_dropout_prob < 1:
            raise UserError(f"--label-dropout {self.class_dropout_prob} must be in [0, 1)")
        if self.modulation_gains == "per-modulator" and not self.uses_mp_linear:
            raise UserError("--modulation-gains per-modulator needs MP linears (--use-weight-normalization or "
                            "--use-forced-weight-normalization, presets C-E): a model without them has no "
                            "modulation gains")
        # the defaults that depend on other options, resolved once: config.json records what is built
        self.time_embedding = self.time_embedding_kind
        self.conditioning = self.conditioning_kind
        self.modulation = canonical_modulation(parse_modulation(self.modulation))
        if self.hidden_size % 4:
            raise UserError("hidden size must be divisible by 4 (sin-cos positional encoding, rotation pairs)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        """A validated config from JSON data: unknown keys and values of the wrong type (named, with `where`,
        e.g. the file they came from) are one-line UserErrors."""
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}: was this written by a newer mapdit?")
        check_field_types(cls, data, where)
        data = dict(data)
        # configs written before these choices existed: what those versions built
        if "mlp_activation" not in data:
            data["mlp_activation"] = "silu" if data.get("mp_silu") else "gelu"
        if "time_embedding" not in data:
            data["time_embedding"] = "table" if data.get("mp_embedding") else "sinusoid"
        data.setdefault("conditioning", "sum")
        # configs written when null meant "the default": what that version resolved it to (frozen here, so a
        # later change of a default never rebuilds an existing run as another model)
        mp_linear = bool(data.get("weight_normalization") or data.get("forced_weight_normalization"))
        if data["time_embedding"] is None:
            data["time_embedding"] = "fourier" if data.get("mp_embedding") else "sinusoid"
        if data["conditioning"] is None:
            data["conditioning"] = "balanced" if mp_linear else "sum"
        if data.get("modulation_gains") == "per-modulator" and not mp_linear:
            data["modulation_gains"] = "shared"  # was accepted and built nothing
        return cls(**data).validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def parse_model_name(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"DiT-([A-Z]+)/(\d+)", name)
    if not m or m.group(1) not in SIZES or int(m.group(2)) not in PATCHES:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}")
    return m.group(1), int(m.group(2))


def make_config(model: str = "DiT-S/2", preset: str | None = None, use_all_mp: bool = False,
                **overrides) -> ModelConfig:
    """Build a config from a preset (A-E), `use_all_mp`, then explicit overrides (None = not given).

    Option overrides are additive to the preset: a flag given on the command line turns an option on.
    """
    options: dict = {}
    if preset is not None:
        key = preset.upper()
        if key not in PRESETS:
            raise UserError(f"unknown config preset {preset!r}: use one of {', '.join(PRESETS)}")
        options.update({name: True for name in PRESETS[key]})
        options["preset"] = key
    if use_all_mp:
        options.update({name: True for name in MP_OPTIONS})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in MP_OPTIONS:
            options[key] = options.get(key, False) or bool(value)
        else:
            options[key] = value
    return ModelConfig(model=model, **options).validate()


# ------------------------------------------------------------------------------------------------
# Training settings
# ------------------------------------------------------------------------------------------------
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SNAPSHOT_DTYPE = "float16"  # EMA snapshots (mapdit.ema.DEFAULT_SNAPSHOT_DTYPE is this dtype)
PRECISIONS = ("fp32", "bf16")

# The largest relative width sigma_rel of an EDM2 power-function EMA. Its profile with exponent gamma > -1 has
# sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (EDM2 eq. 3), which peaks at gamma = 1/phi - 1 ~ -0.382
# (phi the golden ratio) with sigma_rel^2 = phi^-5: every width up to phi^-2.5 ~ 0.3003 has a gamma (1/sqrt(12)
# ~ 0.2887, the uniform average gamma = 0, is not the bound). Used by the training check and by mapdit.ema.
SIGMA_REL_MAX = ((1.0 + math.sqrt(5.0)) / 2.0) ** -2.5


def default_lr(model: ModelConfig) -> float:
    """The learning rate a run uses when none is given: 1e-2 for models with MP linears (unit-norm rows: EDM2's
    order of rate), else DiT's 1e-4."""
    return 1e-2 if model.uses_mp_linear else 1e-4


@dataclass
class TrainConfig:
    """Everything a training run is driven by (config.json's "train", with the `None` defaults filled by
    `resolved` when the run is created). Resume policy per field (mapdit.options): "match" settings are the
    run's own; "apply" ones may be given again on --resume and take effect; "never" ones belong to the
    invocation (not stored)."""

    recipe: str | None = opt(None, "a named recipe whose values are the defaults (options given override them): "
                             + "; ".join(f"{r.name}: {r.what}" for r in RECIPES.values())
                             + " (default: none, the paper's defaults)", choices=RECIPE_NAMES)
    data_path: str | None = opt(None, "'fashion-mnist', a folder of IDX files, a folder of class subfolders, or "
                                "prepared latents (default: fashion-mnist; on --resume the run's own)", resume="apply")
    results_dir: str = opt("results", "the folder new runs are created in (NNN-<model>)", resume="apply")
    num_steps: int = opt(400_000, "training steps (on --resume: the run's own unless given)", resume="apply")
    batch_size: int = opt(256, "global batch, split evenly over the ranks", flag="--global-batch-size",
                          aliases=("--batch-size",))
    lr: float | None = opt(None, "peak learning rate (default: 1e-2 for models with MP linears, presets C-E, else "
                           "DiT's 1e-4)", resume="apply")
    warmup_steps: int | None = opt(None, "linear warm-up steps (default: num_steps // 150)")
    decay_start: int | None = opt(None, "step from which lr ~ 1/sqrt(step / decay_start) (EDM2's decay) "
                                  "(default: num_steps // 10)")
    adam_betas: tuple[float, float] = opt((0.9, 0.99), "Adam's beta1 beta2", metavar="BETA")
    adam_eps: float = opt(1e-8, "Adam's epsilon")
    grad_clip: float | None = opt(None, "clip the gradient norm to this (default: none, no clipping)",
                                  resume="apply")
    seed: int = opt(0, "seed of the model's init, the data order and every draw of a step", flag="--global-seed",
                    aliases=("--seed",))
    min_snr_gamma: float | None = opt(None, "weight the eps-MSE by min(SNR_t, gamma) / SNR_t (Min-SNR, e.g. 5) "
                                      "(default: none, uniform, as DiT)")
    ema_stds: tuple[float, ...] = opt((0.05, 0.10), f"relative widths sigma_rel of the power EMAs tracked "
                                      f"(EDM2), each in (0, {SIGMA_REL_MAX:.4f}]", metavar="SIGMA_REL",
                                      flag="--ema-std", aliases=("--ema-stds",))
    ema_snapshots: int = opt(100, "EMA snapshots per tracked width over the run (0: none)")
    snapshot_dtype: str = opt(DEFAULT_SNAPSHOT_DTYPE, "dtype of the EMA snapshots", choices=SNAPSHOT_DTYPES)
    ckpt_every: int | None = opt(None, "checkpoint every N steps (default: num_steps // 5)", resume="apply")
    keep_last: int = opt(0, "keep only the newest N checkpoints (0: keep all)", resume="apply")
    ckpt_steps: tuple[int, ...] | None = opt(None, "also checkpoint at exactly these steps (mapdit study's kept "
                                             "checkpoints)", resume="apply", cli=False)
    tensorboard: bool = opt(False, "also log the metrics for TensorBoard into RUN/tensorboard (needs the "
                            "tensorboard package: pip install 'mapdit[tensorboard]')", resume="apply")
    allow_new_data: bool = opt(False, "on --resume, go on with data whose fingerprint (count, shape, checksum) "
                               "differs from the run's own (this invocation only)", resume="never")
    log_every: int = opt(10, "a metrics.csv row every N steps", resume="apply")
    precision: str = opt("fp32", "fp32, or bf16 autocast", choices=PRECISIONS)
    compile: bool = opt(False, "torch.compile the model with its loss, forward and backward (this invocation "
                             "only)", resume="never")
    device: str | None = opt(None, "cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu; this "
                             "invocation only)", resume="never")
    skip_nonfinite: bool = opt(False, "skip (and count) steps with a NaN/Inf loss or gradient instead of "
                               "stopping", resume="apply")
    image_size: int | None = opt(None, "resize images to this side (default: none, the data's own)")
    hflip: bool = opt(False, "random horizontal flips")
    sample_every: int = opt(0, "write a sample grid from the EMA weights every N steps (0: never)", resume="apply")
    fid_every: int = opt(0, "Frechet distance of the EMA weights every N steps into metrics.csv (FD_fmnist on "
                         "Fashion-MNIST, FID with Inception features; a multiple of --log-every; 0: never)",
                         flag="--fd-every", aliases=("--fid-every",), resume="apply")
    fid_samples: int = opt(1000, "samples per --fd-every score", flag="--fd-samples", aliases=("--fid-samples",),
                           resume="apply")
    magnitude_every: int = opt(0, "residual-stream magnitude per block every N steps into "
                               "residual_magnitudes.csv (a multiple of --log-every; 0: never)", resume="apply")

    def to_dict(self) -> dict:
        """What config.json records: every run setting (resume policy "match" or "apply"), none of the
        invocation's ("never": device, compile)."""
        keep = set(stored_fields(type(self)))
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """Fill the defaults that depend on the run length and the model."""
        tc = dataclasses.replace(self)
        if tc.lr is None:
            tc.lr = default_lr(model)
        if tc.warmup_steps is None:
            tc.warmup_steps = max(1, tc.num_steps // 150)
        if tc.decay_start is None:
            tc.decay_start = max(1, tc.num_steps // 10)
        if tc.ckpt_every is None:
            tc.ckpt_every = max(1, tc.num_steps // 5)
        return tc

    def check(self, world_size: int = 1) -> None:
        """Reject impossible or contradictory settings with one line each (UserError)."""
        def positive(value) -> bool:
            return value is not None and math.isfinite(value) and value > 0

        if self.num_steps < 1:
            raise UserError("--num-steps must be at least 1")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise UserError(f"--global-batch-size {self.batch_size} must be a positive multiple of the number "
                            f"of processes ({world_size})")
        check_choice(self.precision, "precision", PRECISIONS, "--precision")
        if not self.ema_stds or any(not 0 < s <= SIGMA_REL_MAX for s in self.ema_stds):
            raise UserError(f"--ema-std {list(self.ema_stds)}: each width must be in (0, {SIGMA_REL_MAX:.4f}]")
        if len({f"{s:.3f}" for s in self.ema_stds}) != len(self.ema_stds):
            raise UserError(f"--ema-std {list(self.ema_stds)}: the widths must differ in the first 3 decimals")
        if self.lr is not None and not positive(self.lr):
            raise UserError(f"--lr {self.lr} must be a positive number")
        if self.min_snr_gamma is not None and not positive(self.min_snr_gamma):
            raise UserError(f"--min-snr-gamma {self.min_snr_gamma} must be a positive number (e.g. 5; leave it out "
                            "for DiT's uniform weighting)")
        if self.grad_clip is not None and not positive(self.grad_clip):
            raise UserError(f"--grad-clip {self.grad_clip} must be a positive number (leave it out for no clipping)")
        if self.ema_snapshots < 0:
            raise UserError(f"--ema-snapshots {self.ema_snapshots} must be 0 (no snapshots) or more")
        check_choice(self.snapshot_dtype, "snapshot_dtype", SNAPSHOT_DTYPES, "--snapshot-dtype")
        if self.log_every < 1:
            raise UserError(f"--log-every {self.log_every} must be at least 1")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise UserError(f"--ckpt-every {self.ckpt_every} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be 0 or more")
        if self.decay_start is not None and self.decay_start < 1:
            raise UserError(f"--decay-start {self.decay_start} must be at least 1")
        if self.keep_last < 0:
            raise UserError(f"--keep-last {self.keep_last} must be 0 (keep all) or more")
        if self.ckpt_steps is not None and any(int(s) < 1 for s in self.ckpt_steps):
            raise UserError(f"checkpoint steps {list(self.ckpt_steps)} must be at least 1")
        if self.recipe is not None:
            check_choice(self.recipe, "recipe", RECIPE_NAMES, "--recipe")
        # the option as --help spells it (fid_every is --fd-every; "--fid-every" named only the old alias)
        for name in ("sample_every", "fid_every", "magnitude_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag_of(name, TrainConfig)} must be 0 (off) or more")
        for name in ("fid_every", "magnitude_every"):  # logged on metrics rows
            if getattr(self, name) % self.log_every:
                raise UserError(f"{flag_of(name, TrainConfig)} {getattr(self, name)} must be a multiple of "
                                f"--log-every {self.log_every} (its value goes into that row of metrics.csv)")
        if self.fid_every and self.fid_samples < 2:
            raise UserError(f"--fd-samples {self.fid_samples} must be at least 2")
