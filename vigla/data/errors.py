"""Errors the data layer raises for bad input; the CLI prints them as one message, without a traceback."""


class DataError(RuntimeError):
    """A data set is missing, empty, inconsistent or unreadable."""
