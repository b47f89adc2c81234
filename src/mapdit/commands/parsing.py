"""The command line's input checks, in one place: a mistake is one line, 'mapdit <command>: error: ...', exit 2.

Two stages, both driven by one table, `KINDS`, keyed by an option's name (its argparse `dest`): one name
means one concept across the sub-commands (`--batch-size` is a count wherever it appears), so it has one
check wherever it appears.

- while parsing (argparse `type=`): the syntax, e.g. 'ten' is not a whole number, nan is not finite;
- right after parsing (`check_inputs`, before the command does any work): the range (`--steps 0`) and the
  world (a missing `--ref`, a run folder that is not one), as a UserError naming the option.

`checked_everywhere(parser)` gives every option of every sub-command its kind, also options that other
modules add (e.g. generated from the config dataclasses). An option the table does not name keeps its own
type; a plain int or float gets the generic whole-number / finite-number check, a plain string the
non-empty check.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError, short_path


# ------------------------------------------------------------------------------------------------
# The parser: one line per mistake, pointing to the sub-command's help, with a close match
# ------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """An option mistake is one line on stderr ('mapdit train: error: ...') and exit code 2."""

    def error(self, message: str):
        hint = self._did_you_mean(message)
        if not hint and message.startswith("the following arguments are required"):
            # a required option misspelt: argparse says it is missing, and the typo is the reason
            unknown = [w for w in getattr(self, "_words", []) if w.startswith("--") and
                       not any(s.startswith(w.split("=")[0]) for a in self._actions for s in a.option_strings)]
            hint = close_option(self, unknown)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(args) if args is not None else []  # for the did-you-mean of a missing option
        return super().parse_known_args(args, namespace)

    def _did_you_mean(self, message: str) -> str:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m is None:
            return ""
        choices = re.findall(r"'([^']*)'", m.group(2)) or [c.strip() for c in m.group(2).split(",")]
        close = difflib.get_close_matches(m.group(1), choices, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def parse_args(self, args=None, namespace=None):
        # argparse reports a sub-command's unknown option from the top parser ('mapdit: error: unrecognized
        # arguments'), pointing to `mapdit --help`; the sub-command's own parser reports it here instead.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = chosen_subparser(self, parsed) or self
            parser.error(f"unrecognized arguments: {' '.join(extras)}{close_option(parser, extras)}")
        return parsed


def chosen_subparser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The parser of the sub-command in `args` (None for a parser without sub-commands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(getattr(args, action.dest, None))
    return None


def close_option(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'; did you mean --num-steps?' for the first unknown option that is close to one of `parser`'s."""
    known = [s for a in parser._actions for s in a.option_strings]
    for word in extras:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


# ------------------------------------------------------------------------------------------------
# Kinds of values: the syntax while parsing, the range and the world right after
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """An argparse `type` (`convert`: text -> value, ArgumentTypeError on bad syntax) with a check that runs
    after parsing (`check(value, flag)`: UserError when the value is out of range or names nothing)."""
    name: str
    convert: Callable[[str], object]
    check: Callable[[object, str], None] | None = None

    def __call__(self, text: str):
        return self.convert(text)

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.name


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def finite_float(text: str) -> float:
    """argparse type for every float option: a number, and not NaN or ±inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def text(value: str) -> str:
    """argparse type for every text option (names, paths): an empty value names nothing, and `or default`
    further down would silently turn it into the default (--data-path '' trained on Fashion-MNIST in ./)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is empty: give a value or leave the option out")
    return value


def path_text(value: str) -> str:
    """argparse type for every path option: non-empty, with ~ expanded here, so that the check and the command
    see one path (--out=~/x.png, where the shell leaves ~ alone, was checked as $HOME/x.png and written to ./~/)."""
    return os.path.expanduser(text(value))


def at_least(low: int) -> Callable[[object, str], None]:
    def check(value, flag: str) -> None:
        if value < low:
            raise UserError(f"{flag} {value} must be {'0 or more' if low == 0 else f'at least {low}'}")
    return check


def positive(value, flag: str) -> None:
    if not value > 0:
        raise UserError(f"{flag} {value} must be a positive number")


def fraction(value, flag: str) -> None:
    if not 0 <= value < 1:
        raise UserError(f"{flag} {value} must be in [0, 1)")


def _looked_up(path: Path) -> bool:
    """Whether `path` exists. A path the system refuses to look up (a name over NAME_MAX, a loop of symbolic
    links, a folder without search permission) raises its OSError, which check_inputs turns into one line."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _existing(path: Path, flag: str, what: str = "") -> None:
    if not _looked_up(path):
        if path.is_symlink():
            raise UserError(f"{flag} {path} is a symbolic link to nothing" + (f": {what}" if what else ""))
        parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1) \
            if parent.is_dir() else []
        hint = f" (did you mean {parent / near[0]}?)" if near else ""
        raise UserError(f"{flag} {path} does not exist{hint}" + (f": {what}" if what else ""))


def existing_file(value, flag: str) -> None:
    path = Path(value).expanduser()
    _existing(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file")


def existing_folder(value, flag: str) -> None:
    path = Path(value).expanduser()
    _existing(path, flag)
    if not path.is_dir():
        raise UserError(f"{flag} {path} is a file: give a folder")


def data_source(what: str) -> Callable[[object, str], None]:
    """'fashion-mnist' (or another name of the installed copy) or a path that exists; `what` says what to pass."""
    def check(value, flag: str) -> None:
        from ..data import fashion_mnist

        if not fashion_mnist.is_alias(value):
            _existing(Path(value).expanduser(), flag, what)
    return check


def run_folder(value, flag: str) -> None:
    from ..runio import check_run_folder  # torch-heavy; loaded by the commands anyway

    check_run_folder(value, flag)


def run_or_latest(value, flag: str) -> None:
    if value != "latest":
        run_folder(value, flag)


def writable_place(value, flag: str) -> None:
    """A file or folder a command will create (or add to): its nearest existing folder must take files.
    Nothing is created here; the command makes the folders when it writes."""
    path = Path(value).expanduser().absolute()
    ancestor = path
    while not _looked_up(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise UserError(f"{flag} {value}: {ancestor} is a file, so nothing can be made inside it: choose another "
                        "place")
    if not os.access(ancestor if ancestor.is_dir() else ancestor.parent, os.W_OK):
        raise UserError(f"{flag} {value}: {ancestor} is not writable (read-only or no permission): choose a "
                        "writable place")


def device(value, flag: str) -> None:
    import torch  # loaded by the commands anyway

    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag} {value!r} is not a device: use cpu, cuda or cuda:N") from None


COUNT = Kind("whole number", whole_number, at_least(1))       # how many of something: 1 or more
NATURAL = Kind("whole number", whole_number, at_least(0))     # a seed, a step, an interval where 0 = never
INTEGER = Kind("whole number", whole_number)                  # range known only later (e.g. a class label)
TEXT = Kind("text", text)                                     # a name or a word: not empty
POSITIVE = Kind("number", finite_float, positive)
NUMBER = Kind("number", finite_float)
FRACTION = Kind("number", finite_float, fraction)  # a decay rate (Adam's betas): torch raised a traceback
FILE = Kind("path", path_text, existing_file)
FOLDER = Kind("path", path_text, existing_folder)
DATA = Kind("path", path_text, data_source("pass 'fashion-mnist', a folder of IDX files, a folder of class subfolders "
                                      "or prepared latents"))
REF = Kind("path", path_text, data_source("pass 'fashion-mnist', an image folder, a prepared latent folder or an ADM "
                                     "reference batch .npz"))
OUTPUT = Kind("path", path_text, writable_place)
DEVICE = Kind("device", text, device)
PATH = Kind("path", path_text)   # a path or a name the command resolves (--ckpt: a path, a name or a step)
RUN = Kind("run folder", path_text, run_folder)
RUN_OR_LATEST = Kind("run folder", path_text, run_or_latest)

# option name (argparse dest) -> its kind, for every sub-command
KINDS: dict[str, Kind] = {
    **dict.fromkeys(("batch_size", "num_steps", "steps", "num_samples", "fid_samples", "sample_batch_size",
                     "magnitude_batch_size", "log_every", "ckpt_every", "epochs", "threads", "workers", "num_ref",
                     "shard_size", "resolution", "sampling_steps", "heldout_images", "guide_channels",
                     "input_size", "in_channels", "num_classes", "image_size", "per_class", "decay_start"), COUNT),
    **dict.fromkeys(("seed", "ema_snapshots", "sample_every", "fid_every", "magnitude_every", "num_workers",
                     "warmup_steps", "step", "t"), NATURAL),
    "class_label": INTEGER,
    **dict.fromkeys(("lr", "grad_clip", "ema_std", "ema_stds", "wait_timeout", "adam_eps"), POSITIVE),
    "cfg_scale": NUMBER,
    "adam_betas": FRACTION,
    "data_path": DATA,
    "ref": REF,
    **dict.fromkeys(("ckpt", "vae"), PATH),
    **dict.fromkeys(("inception_weights",), FILE),
    **dict.fromkeys(("image_folder",), FOLDER),
    **dict.fromkeys(("out", "results_dir", "cache_dir", "docs_dir", "results_md"), OUTPUT),
    "device": DEVICE,
    "run": RUN,
    "resume": RUN_OR_LATEST,
}


def checked_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every option of `parser` and of its sub-commands its kind: the table's for a name it lists, else
    the generic whole-number / finite-number syntax for a plain int / float (NaN and inf refused anywhere) and
    non-empty text for a plain string."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                checked_everywhere(sub)
        elif action.option_strings and action.nargs != 0:
            if action.dest in KINDS and action.type in (None, str, int, float):
                action.type = KINDS[action.dest]
            elif action.type is int:
                action.type = INTEGER
            elif action.type is float:
                action.type = NUMBER
            elif action.type in (None, str):
                action.type = TEXT


def defaults_in_help(parser: argparse.ArgumentParser) -> None:
    """End every option's help with its default, '(default: X)', unless the help already states one or the
    default is 'not given' (None, or a sentinel whose meaning the help explains)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                defaults_in_help(sub)
        elif action.option_strings and action.nargs != 0 and action.help not in (None, argparse.SUPPRESS):
            default = action.default
            if default is None or default is argparse.SUPPRESS or type(default).__name__ == "_Unset":
                continue
            if "default" not in action.help:
                action.help += " (default: %(default)s)"


def finite_floats_everywhere(parser: argparse.ArgumentParser) -> None:
    """Kept for callers of the old name: every option gets its kind (finite floats included)."""
    checked_everywhere(parser)


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The range and world checks of every option of the chosen sub-command, before it starts any work.
    UserError naming the option (its main spelling) for the first value that fails."""
    sub = chosen_subparser(parser, args) or parser
    for action in sub._actions:
        kind = action.type
        if not (isinstance(kind, Kind) and kind.check and action.option_strings):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is action.default:
            continue  # not given (a default, or a 'not given' sentinel): the command resolves it itself
        for item in value if isinstance(value, (list, tuple)) else [value]:
            try:
                kind.check(item, action.option_strings[0])
            except OSError as err:  # the system refuses to look the path up (too long, a symlink loop, ...)
                reason = (err.strerror or type(err).__name__).lower()
                raise UserError(f"{action.option_strings[0]} {short_path(item)}: {reason}: choose another "
                                "path") from None
