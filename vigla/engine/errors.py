"""Errors that end a run with one clear message (printed by the CLI without a traceback) and an exit code."""
from vigla.data.errors import DataError


class UserError(RuntimeError):
    """Bad flags, config file, checkpoint or output folder."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this model / run."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before the bad step touched the weights."""

    exit_code = 3


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory; the message suggests a smaller batch."""

    exit_code = 4


#: what the CLI catches and prints as ``error: <message>``
RUN_ERRORS = (UserError, DataError, NonFiniteLossError, OutOfMemory)


def exit_code(err: BaseException) -> int:
    return getattr(err, "exit_code", 2)
