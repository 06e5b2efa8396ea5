"""Errors the data layer raises for bad input, and its warnings; the CLI prints each as one line, without a traceback
or a source line."""
from vigla.notices import ViglaWarning


class DataError(RuntimeError):
    """A data set is missing, empty, inconsistent or unreadable."""


class DataWarning(ViglaWarning):
    """A data set the run can use, with something to know about it (a class without validation images, unreadable
    files left out); the CLI prints it as one ``warning:`` line."""
