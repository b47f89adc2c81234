"""One exception type for user mistakes: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """A problem with what the user asked for (bad flag, missing file, wrong shape). Never a bug."""


class Diverged(UserError):
    """Training met a non-finite loss, gradient or weight at `step` and stopped. Experiments record it as a
    result (a rate too high for the config) instead of stopping."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # picklable with its step (a worker process raising it to the study)
        return type(self), (str(self), self.step)


class Stopped(Exception):
    """A SIGTERM/Ctrl-C stopped the command before it had done anything to keep: nothing was written (or
    what was written is whole). The CLI prints the message and exits with code 0, as for a stop mid-run."""
