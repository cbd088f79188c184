"""The errors of the run layer: a request about a run that cannot be carried out."""

from __future__ import annotations

import os

__all__ = ["RunError", "ConfigError", "RunLockedError", "RunIOError"]


class RunError(ValueError):
    """A run cannot be built, read or continued as asked: a missing run directory or
    checkpoint, unreadable data, a solver that cannot take the requested NFE, a resume
    that would change settings a run cannot change. The message says what and where.

    ``multiline=True``: the message is a first line, then one indented line per item
    (e.g. each setting that differs); otherwise it reads as one line.
    """

    def __init__(self, message: str, *, multiline: bool = False):
        super().__init__(message)
        self.multiline = multiline


class ConfigError(RunError):
    """A bad preset name, override key or value, or an inconsistent configuration."""


class RunLockedError(RunError):
    """Another process holds the run directory's lock (see :func:`jdiff.runs.lock_run`).

    Attributes:
      path: the run directory; pid: the holder's process id (``None`` if it could not
        be read).
    """

    def __init__(self, message: str, *, path: str, pid: int | None):
        super().__init__(message)
        self.path = path
        self.pid = pid


class RunIOError(OSError):
    """A run directory (or a file in it) cannot be created or written: an ``OSError``
    with the failure's ``errno`` and ``filename`` the path, and a message naming it
    (e.g. ``cannot create run directory runs/x: Permission denied``)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone (errno and path are attributes)

    @classmethod
    def of(cls, err: OSError, what: str, path) -> RunIOError:
        """``err`` (an ``OSError``) restated as ``"{what} {path}: {strerror}"``."""
        code = err.errno or 5
        return cls(code, f"{what} {os.fspath(path)}: {err.strerror or os.strerror(code)}", os.fspath(path))
