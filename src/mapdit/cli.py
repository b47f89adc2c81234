"""`mapdit <command>`: argparse sub-commands that only parse and call into the library.

The one rule for errors, kept here: a mistake in the user's input is one line, `mapdit <command>: error:
...`, and exit code 2, with no traceback; anything else is a bug and stays a traceback. The input is
checked in two places, both before the command does any work: every option's value by its kind
(`commands.parsing`: syntax while parsing, range and existence right after), and every file the user named
where it is decoded (`errors.reading`: a file that is not what it should be). Below that, a `UserError`
anywhere, a full disk, a place that cannot be written (read-only, no permission) and a path the system
refuses to look up (a name too long, a loop of symbolic links) end the same way. A reader of the output
that goes away (`mapdit model-info | head -1`) is not an error: the command finishes.
Each sub-command lives in its own module of `mapdit.commands`.
"""
from __future__ import annotations

import io
import os
import sys

from . import signals
from .errors import Stopped, UserError


def build_parser():
    # The command modules load torch and the library. They are imported here, inside main's signals.held(),
    # not at the top: a SIGTERM or Ctrl-C that comes while mapdit starts is then held for training instead
    # of killing the process half-way (mapdit.signals), from the moment mapdit's code runs.
    from .commands import (
        ablate,
        demo,
        ema,
        fid,
        fmnist_classifier,
        magnitudes,
        model_info,
        prepare,
        sample,
        study,
        train,
    )
    from .commands.parsing import OneLineParser, checked_everywhere, defaults_in_help

    parser = OneLineParser(prog="mapdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (model_info, train, sample, ema, fmnist_classifier, prepare, demo, fid, magnitudes, ablate,
                    study):
        command.register(sub)
    checked_everywhere(parser)  # every option of every sub-command gets its kind (commands.parsing)
    defaults_in_help(parser)
    return parser


class ReaderMayLeave:
    """stdout or stderr whose reader may go away (`| head`, a killed `tee`): from then on what is written is
    dropped and the command goes on (a run's log.txt keeps every line). Else it is the stream itself."""

    def __init__(self, stream):
        self.stream, self.reader_gone = stream, False

    def write(self, text: str) -> int:
        return self._guarded(self.stream.write, text, default=len(text))

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, fn, *args, default=None):
        if not self.reader_gone:
            try:
                return fn(*args)
            except BrokenPipeError:
                self.reader_gone = True
                try:  # what is left in the buffer, and the interpreter's last flush, go nowhere quietly
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
                except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                    pass
        return default

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ReaderMayLeave(sys.stdout), ReaderMayLeave(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    # SIGTERM/Ctrl-C are held from here on (see mapdit.signals): a command that stops gracefully (train)
    # takes a signal that came during start-up over; every other command gets the usual handling back.
    with signals.held():
        from .commands.parsing import check_inputs

        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # a bad option (one line printed) or --help: the exit status, as returned
            return done.code if isinstance(done.code, int) else 2
        try:
            check_inputs(parser, args)  # ranges and named paths, before any work
            if not getattr(args, "graceful_stop", False):
                signals.release()
            args.func(args)
        except UserError as err:
            return _fail(args.command, str(err))
        except Stopped as stop:
            print(f"mapdit {args.command}: {stop}", file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(f"mapdit {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - only errors of the environment; anything else is re-raised
            from .runio import environment_error  # loaded by now (the commands import it); see build_parser

            user = environment_error(err, writing=False)
            if user is None:
                raise
            return _fail(args.command, str(user))
    return 0


def _fail(command: str, message: str) -> int:
    print(f"mapdit {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
