"""Errors that mean "the user gave us something wrong".

Command-line entry points catch :class:`UserError` (see :mod:`userllm.cli`) and print its message with
a non-zero exit status and no traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A mistake in the user's input: a bad option, a missing file, a malformed row.

    ``exit_code``: the status the command line exits with (see :func:`userllm.cli.run_cli`).
    """

    exit_code = 2


class DataError(UserError):
    """A problem with an input data file, located by path and (1-based) line when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)
