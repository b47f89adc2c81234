"""The command line generated from the option declarations (mapdit.options.opt): one argparse option per
dataclass field, its help ending in its default; the values the user typed; the dataclass built from them.

Every generated option's argparse default is the sentinel `UNSET`, so `given(args)` knows what was typed
without a second parser, and `from_args` can start from any base (the dataclass's defaults, a recipe's
values, or a stored run's).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

from ..errors import UserError
from ..options import MISSING, Option, options


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # the argparse default of every generated option: "not given"


def help_text(o: Option) -> str:
    """The option's help, ending in its default unless the text already states it; '%' escaped for
    argparse."""
    text = o.help
    if "default" not in text and not o.required:
        shown = o.default_text()
        if _one_word(o) and isinstance(o.default, (tuple, list)):  # as it is typed: 0,1,2
            shown = ",".join(str(v) for v in o.default)
        text = f"{text} (default: {shown})"
    if o.aliases:
        text = f"{text} (also: {', '.join(o.aliases)})"
    return text.replace("%", "%%")


def add_options(parser, cls, *, group: str | None = None, skip: Iterable[str] = ()) -> None:
    """One option per field of `cls` declared with `opt(cli=True)`, except those named in `skip`: type,
    choices, nargs from the declaration; bool -> a switch (`--x` for a default-off setting, `--no-x` for a
    default-on one; a setting a resumed run may change gets both); a required option is required; a tuple
    with its own `parse` is one word that `parse` splits (study's --seeds 0,1,2)."""
    target = parser.add_argument_group(group) if group else parser
    skip = set(skip)
    for o in options(cls, cli_only=True):
        if o.name in skip:
            continue
        names = [o.flag, *o.aliases]
        if o.base_type is bool and not o.is_tuple:
            _add_switch(target, o, names)
            continue
        kw: dict[str, Any] = {"dest": o.name, "default": UNSET, "help": help_text(o)}
        kw["type"] = o.parse if isinstance(o.parse, type) else _parser_type(o.parse) if o.parse else o.base_type
        if o.choices is not None:
            kw["choices"] = o.choices
        if o.metavar is not None or o.choices is None:  # choices show themselves
            kw["metavar"] = o.metavar or o.flag.lstrip("-").upper().replace("-", "_")
        if o.nargs is not None:
            kw["nargs"] = o.nargs
        elif o.is_tuple and not _one_word(o):  # tuple[float, ...] -> one or more; tuple[float, float] -> two
            kw["nargs"] = o.tuple_length or "+"
        if o.required:
            kw["required"] = True
        target.add_argument(*names, **kw)


def _one_word(o: Option) -> bool:
    """A tuple option with its own `parse` reads the whole tuple from one word (e.g. '0,1,2')."""
    return o.is_tuple and o.parse is not None and o.nargs is None


def _parser_type(parse):
    """`parse` as an argparse type: its UserError (a library parse function's one-line message) becomes
    argparse's one-line error, 'mapdit <command>: error: argument --x: <message>'."""
    def convert(text: str):
        try:
            return parse(text)
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_switch(target, o: Option, names: list[str]) -> None:
    on = bool(o.default is not MISSING and o.default)
    base = o.name.replace("_", "-")
    if not on:  # default off: --x turns it on
        target.add_argument(*names, dest=o.name, action="store_true", default=UNSET, help=help_text(o))
        if o.resume == "apply":
            target.add_argument(f"--no-{base}", dest=o.name, action="store_false", default=UNSET,
                                help=f"turn {o.flag} off (on --resume of a run that had it)")
    else:  # default on: --no-x turns it off
        flag = names[0] if names[0].startswith("--no-") else f"--no-{base}"
        target.add_argument(flag, *names[1:], dest=o.name, action="store_false", default=UNSET,
                            help=f"{help_text(o)}; this flag turns it off")
        if o.resume == "apply":
            target.add_argument(f"--{base}", dest=o.name, action="store_true", default=UNSET,
                                help=f"turn {flag} back on")


def given(args: argparse.Namespace, *classes) -> dict[str, Any]:
    """The options the user typed, by field name, with their values (tuples for nargs options). With
    `classes`: only the fields of those dataclasses."""
    names = None
    if classes:
        names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    out = {}
    for key, value in vars(args).items():
        if value is UNSET or (names is not None and key not in names):
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def from_args(cls, args: argparse.Namespace, base=None, **overrides):
    """`cls` built from `base` (default: the dataclass's defaults) with the options the user typed, then
    `overrides`."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init} if base is not None else {}
    values.update(given(args, cls))
    values.update(overrides)
    return cls(**values)
