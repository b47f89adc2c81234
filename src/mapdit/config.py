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

# model choices besides the MP options and sizes (command-line flags of the same name)
CHOICE_KEYS = ("modulation", "gate_init", "rotation_pairing", "learn_sigma", "mlp_activation", "time_embedding",
               "modulation_gains", "conditioning")

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


@dataclass
class ModelConfig:
    model: str = "DiT-S/2"
    input_size: int = 32  # latent/image side length
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1  # >0 adds the null-class row used for classifier-free guidance
    num_train_steps: int = 1000  # diffusion steps (rows of the MP timestep table)
    mlp_ratio: float = 4.0
    # the eight MP options
    cosine_attention: bool = False
    weight_normalization: bool = False
    forced_weight_normalization: bool = False
    mp_residual: bool = False
    mp_silu: bool = False
    no_layernorm: bool = False
    mp_pos_enc: bool = False
    mp_embedding: bool = False
    # choices beside the eight options (each changes only what it names)
    mlp_activation: str = "gelu"  # "gelu" (DiT's tanh-GELU) | "silu"; `mp_silu` divides it by its RMS
    # timestep features: "sinusoid" (DiT), "mp-sinusoid" (the same times sqrt 2: RMS 1), "fourier" (MP
    # Fourier features of the noise level ln(sigma_t)/4, EDM2-style), "table" (a learned MP row per integer
    # step, upstream MaP-DiT's form). None: "fourier" with `mp_embedding`, else "sinusoid".
    time_embedding: str | None = None
    # "shared": one MP modulation linear and one learned gain per block for every chunk;
    # "per-modulator": one learned gain per modulator (shift/scale/rotate/gate of each site). MP models only.
    modulation_gains: str = "shared"
    # how the timestep and label embeddings form the conditioning c: "sum" (DiT's t + y; an MP sum under
    # mp_residual) or "balanced" (each normalised to RMS 1, then an MP sum: EDM2's unit-magnitude embeddings).
    # None: "balanced" with MP linears (their unit rows let |t| grow by alignment while the label stays
    # small: the label then moves the modulation < 1 %), else "sum".
    conditioning: str | None = None
    # modulation
    modulation: str = "adaln"
    gate_init: str = "zero"  # "zero": branch*g (AdaLN-Zero); "identity": branch*(1+g)
    rotation_pairing: str = "half"  # "half" | "interleaved" (see nn.rotate_pairs)
    # residual blend t of the MP sum (EDM2 eq. 88; 0.3 for block residuals, EDM2's res_balance)
    residual_blend: float = 0.3
    preset: str | None = None  # informational: the preset the flags came from

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
        if self.gate_init not in ("zero", "identity"):
            raise UserError(f"gate init {self.gate_init!r}: use 'zero' or 'identity'")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise UserError(f"MLP activation {self.mlp_activation!r}: use one of {', '.join(MLP_ACTIVATIONS)}")
        if self.time_embedding is not None and self.time_embedding not in TIME_EMBEDDINGS:
            raise UserError(f"time embedding {self.time_embedding!r}: use one of {', '.join(TIME_EMBEDDINGS)}")
        if self.conditioning is not None and self.conditioning not in CONDITIONINGS:
            raise UserError(f"conditioning {self.conditioning!r}: use one of {', '.join(CONDITIONINGS)}")
        if self.modulation_gains not in MODULATION_GAINS:
            raise UserError(f"modulation gains {self.modulation_gains!r}: use one of {', '.join(MODULATION_GAINS)}")
        if self.rotation_pairing not in ("half", "interleaved"):
            raise UserError(f"rotation pairing {self.rotation_pairing!r}: use 'half' or 'interleaved'")
        self.modulation = "+".join(parse_modulation(self.modulation))
        if self.modulation == "shift+scale+gate":
            self.modulation = "adaln"
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


@dataclass
class TrainConfig:
    """Everything a training run is driven by (config.json's "train"); `None` fields are filled by `resolved`."""

    data_path: str | None = None  # None: "fashion-mnist" (or, on resume, the run's own data)
    results_dir: str = "results"
    num_steps: int = 400_000
    batch_size: int = 256  # global: split evenly over ranks
    lr: float | None = None  # None: 1e-4 without weight normalisation (DiT's), 1e-2 with it (EDM2's order)
    warmup_steps: int | None = None  # None: num_steps // 150
    decay_start: int | None = None  # None: num_steps // 10; then lr ~ 1/sqrt(step / decay_start)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    seed: int = 0
    label_dropout: float = 0.1
    min_snr_gamma: float | None = None  # None: uniform eps-MSE (DiT); else weights min(SNR_t, gamma) / SNR_t
    ema_stds: tuple[float, ...] = (0.05, 0.10)
    ema_snapshots: int = 100  # snapshots per tracked width over the run (0: none)
    snapshot_dtype: str = DEFAULT_SNAPSHOT_DTYPE
    ckpt_every: int | None = None  # None: num_steps // 5
    log_every: int = 10
    precision: str = "fp32"  # or "bf16" (autocast)
    compile: bool = False
    device: str | None = None
    skip_nonfinite: bool = False
    image_size: int | None = None
    hflip: bool = False
    sample_every: int = 0  # write a grid from the EMA weights every N steps (0: never)
    fid_every: int = 0  # FID (FD_fmnist on Fashion-MNIST) of the EMA weights every N steps, in metrics.csv
    fid_samples: int = 1000
    magnitude_every: int = 0  # residual-stream magnitude per block every N steps (a multiple of log_every)

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """Fill the defaults that depend on the run length and the model."""
        tc = dataclasses.replace(self)
        if tc.lr is None:
            tc.lr = 1e-2 if (model.weight_normalization or model.forced_weight_normalization) else 1e-4
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
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision {self.precision!r}: use fp32 or bf16")
        if not self.ema_stds or any(not 0 < s < 0.2887 for s in self.ema_stds):
            raise UserError(f"--ema-stds {list(self.ema_stds)}: each width must be in (0, 0.288)")
        if len({f"{s:.3f}" for s in self.ema_stds}) != len(self.ema_stds):
            raise UserError(f"--ema-stds {list(self.ema_stds)}: the widths must differ in the first 3 decimals")
        if self.lr is not None and not positive(self.lr):
            raise UserError(f"--lr {self.lr} must be a positive number")
        if self.min_snr_gamma is not None and not positive(self.min_snr_gamma):
            raise UserError(f"--min-snr-gamma {self.min_snr_gamma} must be a positive number (e.g. 5; leave it out "
                            "for DiT's uniform weighting)")
        if self.grad_clip is not None and not positive(self.grad_clip):
            raise UserError(f"--grad-clip {self.grad_clip} must be a positive number (leave it out for no clipping)")
        if self.ema_snapshots < 0:
            raise UserError(f"--ema-snapshots {self.ema_snapshots} must be 0 (no snapshots) or more")
        if self.snapshot_dtype not in SNAPSHOT_DTYPES:
            raise UserError(f"--snapshot-dtype {self.snapshot_dtype!r}: use one of {', '.join(SNAPSHOT_DTYPES)}")
        if self.log_every < 1:
            raise UserError(f"--log-every {self.log_every} must be at least 1")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise UserError(f"--ckpt-every {self.ckpt_every} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be 0 or more")
        if self.decay_start is not None and self.decay_start < 1:
            raise UserError(f"--decay-start {self.decay_start} must be at least 1")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"label dropout {self.label_dropout} must be in [0, 1)")
        for name in ("sample_every", "fid_every", "magnitude_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 (off) or more")
        for name in ("fid_every", "magnitude_every"):  # logged on metrics rows
            if getattr(self, name) % self.log_every:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of "
                                f"--log-every {self.log_every} (its value goes into that row of metrics.csv)")
        if self.fid_every and self.fid_samples < 2:
            raise UserError(f"--fid-samples {self.fid_samples} must be at least 2")
