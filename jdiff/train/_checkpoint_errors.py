"""Errors and logging of :class:`jdiff.train.Checkpointer`: the error types, one-line
reports of corrupt steps, and orbax's log output kept to what a user needs (read
failures are reported once by the checkpointer, a failed background save is raised
once as :class:`CheckpointWriteError`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading

__all__ = [
    "CheckpointMismatchError",
    "CheckpointCorruptError",
    "NoUsableCheckpointError",
    "CheckpointWriteError",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model or optimizer configuration."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step failed to read back or to verify against its checksums."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a file-size limit, a read-only
    or vanished folder). An ``OSError`` with the ``errno`` and ``strerror`` of the
    failure when it is known and ``filename`` the checkpoint folder; the message names
    the step and the folder. The steps saved before are untouched (orbax commits a step
    by renaming a finished temporary folder), so the run resumes from the last of them.
    """

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone (errno and path are attributes)


def _os_error_code(err: BaseException) -> int | None:
    """The ``errno`` behind a failed write: an ``OSError`` in the exception's chain, or
    the ``os_error_code`` TensorStore puts in its messages."""
    seen = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return int(e.errno)
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _write_error(err: BaseException, directory: str, step) -> CheckpointWriteError | None:
    """``err`` as a :class:`CheckpointWriteError`, or ``None`` when it is not an I/O failure."""
    if isinstance(err, CheckpointWriteError):
        return err
    code = _os_error_code(err)
    if code is None and not isinstance(err, OSError):
        return None
    code = code or errno.EIO
    what = f"step {step}" if step is not None else "a checkpoint"
    e = CheckpointWriteError(code, f"cannot write {what} in {directory}: {os.strerror(code)}", directory)
    e.step = step
    return e


class _DropOrbaxErrors(logging.Filter):
    """Drops orbax's error records (the failure of a background save, logged with a
    traceback per thread: a writing :class:`Checkpointer` raises one
    :class:`CheckpointWriteError` instead) and its warnings about a missing
    ``_CHECKPOINT_METADATA`` file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in (record.pathname or ""):
            return True
        if record.levelno >= logging.ERROR:
            return False
        # a step without orbax's _CHECKPOINT_METADATA (e.g. written by an older orbax) is
        # still restored and verified by its own checksums: not worth a warning line
        return not str(record.msg).startswith("Metadata file does not exist")


_drop_orbax_errors = _DropOrbaxErrors()
_writers = 0  # open writing Checkpointers (the filter is installed while there is one)
_writers_lock = threading.Lock()


def _hold_orbax_errors(on: bool) -> None:
    global _writers
    with _writers_lock:
        _writers += 1 if on else -1
        if on and _writers == 1:
            logging.getLogger("absl").addFilter(_drop_orbax_errors)
        elif not on and _writers == 0:
            logging.getLogger("absl").removeFilter(_drop_orbax_errors)


class NoUsableCheckpointError(CheckpointCorruptError):
    """Checkpoint steps exist but none of them can be restored.

    Attributes:
      directory: the checkpoint directory.
      rejected: ``[(step, reason), ...]``, newest first, one entry per step found.
    """

    def __init__(self, directory: str, rejected: list[tuple[int, str]]):
        self.directory = directory
        self.rejected = list(rejected)
        lines = "".join(f"\n  step {s}: {why}" for s, why in self.rejected)
        super().__init__(
            f"no usable checkpoint in {directory}: all {len(self.rejected)} steps found are unreadable or "
            f"corrupt (nothing was changed):{lines}"
        )


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is emitted (not the
    stream of import time, which a test harness or an application may have replaced)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_logger = logging.getLogger("jdiff.train.checkpoint")
if not _logger.handlers:
    # One plain line on stderr, whatever the root logger's format (JAX and absl may set
    # one up); an application can replace this handler or pass ``report``.
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.addHandler(_handler)
    _logger.propagate = False


def _one_line(err: BaseException, limit: int = 200) -> str:
    """A short single-line description of a restore failure: the error's first line,
    without TensorStore's source locations, cut at a word boundary."""
    if isinstance(err, CheckpointCorruptError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    text = re.sub(r"\[source locations='[^']*'\]", "", text)
    text = " ".join(text.split())
    # orbax appends a pointer to TensorStore's full report (a bound method's repr): not for users
    text = re.sub(r"\.?\s*See full TensorStore details:.*$", "", text)
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit)
        text = text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + " ..."
    return text


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's own log lines (absl) about read-only directories and failed
    reads: :class:`Checkpointer` reports those itself, once, in one line."""
    lg = logging.getLogger("absl")
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)
