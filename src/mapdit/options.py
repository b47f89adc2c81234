"""Options defined once: each field of a config dataclass carries its command-line name, help text, choices
and resume policy (`opt`), and everything else is derived from it: the command line and its help
(`mapdit.commands.options.add_options`), the values the user typed (`given`), the resume checks
(mapdit.resume) and config.json (the dataclass itself).

    lr: float | None = opt(None, "peak learning rate (default: 1e-4 plain, 1e-2 MP linears)", resume="apply")

This module holds the declarations and reads them back (`options`, `flag_of`); it builds no parser (library
modules build no parsers): mapdit.commands.options turns the declarations into argparse options.

Resume policy (TrainConfig and ModelConfig): "match" = a resumed run keeps its own value, and the option
given again with another value is a one-line refusal; "apply" = the value given on --resume is used from
then on; "never" = not a run setting (not stored in config.json, never compared).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING
from typing import Any, Sequence

from .errors import UserError

RESUME_POLICIES = ("match", "apply", "never")
REQUIRED = MISSING  # opt(REQUIRED, ...): an option without a default (the command line requires it)


def opt(default: Any, help: str, *, flag: str | None = None, aliases: Sequence[str] = (),
        choices: Sequence | None = None, metavar: str | None = None, resume: str = "match", cli: bool = True,
        nargs: int | str | None = None, parse=None) -> Any:
    """A dataclass field with its option metadata. `flag`: the command-line name (default "--" + the field
    name with dashes); `aliases`: older spellings still accepted; `choices`: the allowed values (checked by
    the parser and by `check_choice`); `cli=False`: a setting with no command-line option; `parse`: the
    function that turns the text into the value (default: from the annotation)."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume={resume!r}: use one of {RESUME_POLICIES}")
    if not help:
        raise ValueError("every option needs a help text")
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": None if choices is None else
            tuple(choices), "metavar": metavar, "resume": resume, "cli": cli, "nargs": nargs, "parse": parse,
            "opt": True}
    if default is MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared option, read back from its dataclass field."""
    name: str  # the field name (also the argparse dest)
    hint: Any  # the resolved annotation
    default: Any  # MISSING when required
    help: str
    flag: str
    aliases: tuple[str, ...]
    choices: tuple | None
    metavar: str | None
    resume: str
    cli: bool
    nargs: int | str | None
    parse: Any

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def base_type(self):
        """The annotation without `| None` and, for a tuple, its element type."""
        hint = self.hint
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1:
            hint = args[0]
        if typing.get_origin(hint) is tuple:
            return typing.get_args(hint)[0]
        return hint

    @property
    def is_tuple(self) -> bool:
        hint = self.hint
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1:
            hint = args[0]
        return typing.get_origin(hint) is tuple

    @property
    def tuple_length(self) -> int | None:
        """The fixed length of a tuple option (tuple[float, float] -> 2); None for tuple[X, ...]."""
        hint = self.hint
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, _UnionType) and len(args) == 1:
            hint = args[0]
        inner = typing.get_args(hint)
        return None if not self.is_tuple or inner[-1] is Ellipsis else len(inner)

    def default_text(self) -> str:
        """The default as shown in --help."""
        value = self.default
        if value is MISSING:
            return "required"
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, (tuple, list)):
            return " ".join(str(v) for v in value)
        return str(value)


_UnionType = type(int | None)


def options(cls, *, cli_only: bool = False) -> list[Option]:
    """The options a dataclass declares with `opt`, in field order (`cli_only`: those with a command-line
    option)."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("opt"):
            continue
        if cli_only and not meta["cli"]:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        found.append(Option(name=f.name, hint=hints[f.name], default=default, help=meta["help"],
                            flag=meta["flag"] or "--" + f.name.replace("_", "-"), aliases=meta["aliases"],
                            choices=meta["choices"], metavar=meta["metavar"], resume=meta["resume"],
                            cli=meta["cli"], nargs=meta["nargs"], parse=meta["parse"]))
    return found


def option(cls, name: str) -> Option:
    for o in options(cls):
        if o.name == name:
            return o
    raise KeyError(f"{cls.__name__} declares no option {name!r}")


def flag_of(name: str, *classes) -> str:
    """The command-line name of a field of one of `classes`, for messages (seed -> --global-seed); a name
    no class declares: "--" + the name with dashes."""
    for cls in classes:
        for o in options(cls):
            if o.name == name:
                return o.flag
    return "--" + name.replace("_", "-")


def stored_fields(cls) -> list[str]:
    """The fields config.json records (every field not declared resume="never")."""
    policy = {o.name: o.resume for o in options(cls)}
    return [f.name for f in dataclasses.fields(cls) if policy.get(f.name, "match") != "never"]


def check_choice(value, name: str, choices: Sequence, what: str | None = None) -> None:
    """A one-line UserError when `value` is not one of `choices` (for values that come from files or
    Python, where no parser checked them)."""
    if value not in choices:
        raise UserError(f"{what or name.replace('_', ' ')} {value!r}: use one of {', '.join(map(str, choices))}")
