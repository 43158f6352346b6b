"""Errors raised by the data loaders."""
from __future__ import annotations

__all__ = ["MissingDataError", "DataFormatError"]


class MissingDataError(FileNotFoundError):
    """The files of a dataset are not where they were looked for (gradmeta never downloads).

    The message names the directory searched and the file names expected.
    """


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format; the message names the file."""
