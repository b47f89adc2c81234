"""One exception type for user mistakes: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """A problem with what the user asked for (bad flag, missing file, wrong shape). Never a bug."""
