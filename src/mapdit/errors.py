"""One exception type for user mistakes: the CLI prints its message on one line and exits with 2.

`reading(path, what)` turns a file the user named that cannot be decoded into such a mistake.
"""
import contextlib
import csv
import pickle
import zipfile


def short_path(path, limit: int = 100) -> str:
    """A path for a one-line message: its start and end when it is longer than `limit` characters."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]}"


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


# Errors that mean "this file is not what it should be" when a library decodes it: numpy (ValueError,
# EOFError, zipfile.BadZipFile), torch (RuntimeError, pickle.UnpicklingError), json (ValueError), PIL
# (OSError), csv (csv.Error: a NUL byte), safetensors (SafetensorError, matched by module so this file imports
# nothing heavy).
_DECODE_ERRORS = (ValueError, EOFError, KeyError, IndexError, RuntimeError, OSError, zipfile.BadZipFile,
                  pickle.UnpicklingError, csv.Error)


@contextlib.contextmanager
def reading(path, what: str, hint: str = "is it the right file?"):
    """Decode a file (or folder) the user named: any failure to read or decode it inside this block becomes
    one UserError naming `what` and `path` ("the reference x.npz cannot be read (...): <hint>"). Keep the
    block to the read itself, so that a bug in the code using the result stays a traceback."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path} is a file, not a folder") from None
    except PermissionError:
        raise UserError(f"cannot read {what} {path} (permission denied)") from None
    except Exception as err:
        if not (isinstance(err, _DECODE_ERRORS) or type(err).__module__.split(".")[0] == "safetensors"):
            raise
        lines = str(err).strip().splitlines()
        reason = " ".join(lines[0].split())[:160] if lines else type(err).__name__
        raise UserError(f"{what} {path} cannot be read ({reason}): {hint}") from None
