"""The errors of the run layer: a request about a run that cannot be carried out."""

from __future__ import annotations

__all__ = ["RunError", "ConfigError", "RunLockedError"]


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
