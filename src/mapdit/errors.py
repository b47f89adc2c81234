"""One exception type for user mistakes: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """A problem with what the user asked for (bad flag, missing file, wrong shape). Never a bug."""


class Stopped(Exception):
    """A SIGTERM/Ctrl-C stopped the command before it had done anything to keep: nothing was written (or
    what was written is whole). The CLI prints the message and exits with code 0, as for a stop mid-run."""
