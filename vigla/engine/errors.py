"""Errors that end a run with one clear message (printed by the CLI without a traceback) and an exit code."""
import contextlib
import os
import sys
import warnings

from vigla.data.errors import DataError
from vigla.notices import ViglaWarning

from .ranks import env_rank, tell_once


class UserError(RuntimeError):
    """Bad flags, config file, checkpoint or output folder."""

    exit_code = 2


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used for this model / run (a ``ValueError`` too, as timm's checkpoint
    filters raise for weights that do not fit)."""


class OutputError(UserError):
    """A file or folder that cannot be written: a full disk, a read-only folder, a file in the way, or a
    folder another run is writing."""

    def __init__(self, message: str, cause: OSError | None = None):
        super().__init__(message)
        self.errno = cause.errno if cause is not None else None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving the weights that followed."""

    exit_code = 3


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message suggests a smaller batch."""

    exit_code = 4


class PeerEnded(RuntimeError):
    """Another process of a ``torchrun`` job ended first (it printed its own error): this one's next collective
    failed. Told as such, not as the network error it met."""

    exit_code = 1


#: what the CLI catches and prints as ``vigla <command>: error: <message>``
RUN_ERRORS = (UserError, DataError, NonFiniteLossError, OutOfMemory, PeerEnded)

#: the exit code of an error nobody anticipated (printed in one line; ``--debug`` shows the traceback)
UNEXPECTED_EXIT = 1


def exit_code(err: BaseException) -> int:
    return getattr(err, "exit_code", 2)


def report(err: BaseException, command: str, note: str = "") -> int:
    """Print ``err`` as one line on stderr (``vigla <command>: error: ...``) -> its exit code.

    Errors of :data:`RUN_ERRORS` are printed as they are; any other exception as its type and first line,
    with a pointer to ``--debug``."""
    if isinstance(err, RUN_ERRORS):
        text, code = str(err), exit_code(err)
    else:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if len(lines) > 1 and lines[1].startswith("Original Traceback"):  # raised in a loader worker
            lines = [f"{lines[0]} {lines[-1]}"]
        text = (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__) + \
            " (unexpected: run again with --debug for the traceback)"
        code = UNEXPECTED_EXIT
    print(f"vigla {command}: error{note}: {' '.join(text.split(chr(10)))}", file=sys.stderr, flush=True)
    return code


def run_command(command: str, main, args, note: str = "") -> int:
    """``main(args)`` -> its exit code; every exception ends as one line (:func:`report`), or, with
    ``args.debug``, propagates with its traceback. Ctrl-C that escapes the command exits with 130, told in one line
    (with the interruption's message, if it has one) by rank 0 of a ``torchrun`` job (:func:`tell_once`). vigla's
    warnings (:class:`~vigla.notices.ViglaWarning`: the data's among them) are printed as one line each
    (:func:`warning_lines`)."""
    try:
        with warning_lines(note):
            return int(main(args) or 0)
    except KeyboardInterrupt as e:
        if getattr(args, "debug", False):
            raise
        tell_once(f"vigla {command}: interrupted" + (f": {e}" if str(e) else ""))
        return 130
    except BrokenPipeError:  # the reader went away (`vigla info | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as e:  # noqa: BLE001  (the point: no raw traceback unless --debug)
        if getattr(args, "debug", False):
            raise
        return report(e, command, note)


@contextlib.contextmanager
def warning_lines(note: str = ""):
    """Inside: a :class:`~vigla.notices.ViglaWarning` (the data's, a resume's, a CPU kernel's, a layer's) is printed
    as ``warning: <message>`` on stderr, on a line of its own above a progress bar, by the processes of a
    ``torchrun`` job that :func:`shows_warning` picks, not as Python's ``file:line: UserWarning: ...`` with the
    source line; other warnings are shown as before."""
    from tqdm import tqdm

    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ViglaWarning):
                if not shows_warning(category):
                    return
                tqdm.write(f"warning{note}: {message}", file=sys.stderr)  # clears a bar first, then redraws it
                sys.stderr.flush()
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def shows_warning(category: type[ViglaWarning]) -> bool:
    """Whether this process prints a warning of ``category``: without torchrun, yes; under it, rank 0 (each rank
    meets the same data and model: N processes printed N copies), or each machine's local rank 0 for a
    ``per_machine`` category (a missing C compiler)."""
    return env_rank(local=category.per_machine) == 0
