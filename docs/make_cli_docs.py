#!/usr/bin/env python
"""Write docs/cli.md, the command-line reference, from the parsers themselves (`mapdit.cli.build_parser()`),
so that it says what the code accepts:

    python docs/make_cli_docs.py            # rewrite docs/cli.md
    python docs/make_cli_docs.py --check    # exit 1 if docs/cli.md differs from what the parsers give

tests/test_readme.py runs the check. The help is formatted at a fixed width (COLUMNS=100), whatever the
terminal, so that the file is the same on every machine.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
WIDTH = "100"

HEADER = """# mapdit command-line reference

Every sub-command's `--help`, generated from the parsers by `python docs/make_cli_docs.py` (do not edit
by hand: `tests/test_readme.py` fails when this file and the code differ). `python train.py ...` and
`python sample.py ...` take exactly the options of `mapdit train` and `mapdit sample`. A mistake in any
option ends with one line, `mapdit <command>: error: ...`, and exit code 2.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("mapdit's parser has no sub-commands")


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Sub-command -> its one-line help, as `mapdit --help` lists it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def render() -> str:
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal's width: fix it
    sys.path.insert(0, str(ROOT / "src"))
    from mapdit.cli import build_parser

    parser = build_parser()
    parser.prog = "mapdit"
    commands = _subparsers(parser)
    summaries = _summaries(parser)
    out = [HEADER, "| command | what it does |", "|---|---|"]
    out += [f"| [`mapdit {name}`](#mapdit-{name}) | {summaries.get(name, '')} |" for name in commands]
    out += ["", "## mapdit", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in commands.items():
        out += [f"## mapdit {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write docs/cli.md from mapdit's parsers")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date (writes nothing)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not CLI_MD.exists() or CLI_MD.read_text() != text:
            print(f"{CLI_MD.relative_to(ROOT)} is out of date: run python docs/make_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text)
    print(f"wrote {CLI_MD.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
