"""How a command's failure reaches the user: one line on stderr and an exit status.

:func:`jdiff.cli.main` hands every exception a command raises to :func:`report`:

- exit status 2, an error in what the user asked for: ``ValueError`` and its subclasses
  (the commands' ``CLIError`` and ``ConfigError``, the library's checks, a refused
  weights file), and a check that failed inside a compiled program (``JaxRuntimeError``
  carrying the check's message, reduced to that message);
- exit status 1, the environment: ``OSError`` (a full disk, a read-only folder, a
  missing file), and anything unexpected (named by its type).

The message is one line (an exception may set ``multiline = True``: a first line, then
one line per item). ``--debug`` or ``JDIFF_DEBUG=1`` prints the traceback before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import traceback

from jdiff._checks import check_message

__all__ = ["USER_ERROR", "IO_ERROR", "debug_requested", "exit_status", "one_line", "report", "quiet_libraries"]

USER_ERROR = 2
IO_ERROR = 1
_LIMIT = 1000  # characters of a message before it is cut (a library's report can be pages)
# "<Type>: message" as the last line of a traceback inside a message (a callback that
# raised in a compiled program): JAX reports it as "INTERNAL: CpuCallback error ...".
_RAISED = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?(_?[A-Za-z]\w*(?:Error|Exception)): (.*\S)\s*$")
_CHECK_FAILED = re.compile(r"\s*\(`check` failed\)$")  # jax.experimental.checkify's suffix
# The loggers that repeat, as a traceback, an error that also reaches the caller (JAX's
# callbacks), or warn about what jdiff reports itself (orbax through absl).
_NOISY = {"jax._src.callback": logging.CRITICAL, "jax._src.debugging": logging.CRITICAL, "absl": logging.ERROR}


def debug_requested(argv) -> bool:
    """Whether ``--debug`` is among ``argv`` or ``JDIFF_DEBUG`` is set (not ``0``/``false``)."""
    env = os.environ.get("JDIFF_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no", "off")


def _raised_inside(text: str) -> tuple[str, str] | None:
    """``(type name, message)`` of the error a compiled program's callback raised, found
    in a runtime error's text (the last ``Type: message`` line of its traceback)."""
    if "Traceback (most recent call last)" not in text and "EquinoxRuntimeError: " not in text:
        return None
    found = None
    for line in text.splitlines():
        m = _RAISED.match(line)
        if m and not line.startswith((" ", "\t")):
            found = (m.group(1), m.group(2))
    return found


def _is_check(e: BaseException, user_errors: tuple) -> bool:
    if isinstance(e, user_errors) or check_message(e) is not None:
        return True
    inner = _raised_inside(str(e)) if isinstance(e, RuntimeError) else None
    return inner is not None and (inner[0].endswith("EquinoxRuntimeError") or inner[0] == "ValueError")


def exit_status(e: BaseException, user_errors: tuple = (ValueError,)) -> int:
    """2 for an error in the user's input (``user_errors``, or a check that failed
    inside a compiled program), 1 for anything else (``OSError`` included)."""
    if isinstance(e, OSError):
        return IO_ERROR
    return USER_ERROR if _is_check(e, user_errors) else IO_ERROR


def _cut(text: str, limit: int = _LIMIT) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + " ..."


def one_line(e: BaseException, user_errors: tuple = (ValueError,)) -> str:
    """The message of ``e`` in one line, in the user's terms: a runtime error's inner
    check message without the compiled program's context, an ``OSError`` as ``what:
    path``, an unexpected error prefixed with its type."""
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        # a library's I/O error (RunIOError, CheckpointWriteError) names its path already
        return f"{e.strerror}: {where}" if where and where not in e.strerror else e.strerror
    text = str(e)
    inner = _raised_inside(text) if isinstance(e, RuntimeError) else None
    if (checked := check_message(e)) is not None:
        msg = checked
    elif inner is not None:
        msg = inner[1]
    else:
        msg = " ".join(text.split()) or type(e).__name__
    msg = _cut(_CHECK_FAILED.sub("", msg))
    if not _is_check(e, user_errors) and not isinstance(e, OSError):
        msg = f"{type(e).__name__}: {msg} (--debug shows the traceback)"
    return msg


def report(command: str, e: BaseException, *, debug: bool, user_errors: tuple = (ValueError,)) -> int:
    """Print the failure of ``jdiff <command>`` (the traceback first under ``debug``) on
    stderr; returns the exit status."""
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    if getattr(e, "multiline", False):
        # a first line, then one line per item (a differing setting, a rejected step)
        msg = "\n".join(line.rstrip() for line in str(e).splitlines() if line.strip())
    else:
        msg = one_line(e, user_errors)
    print(f"jdiff {command}: error: {msg}", file=sys.stderr, flush=True)
    return exit_status(e, user_errors)


@contextlib.contextmanager
def quiet_libraries(debug: bool):
    """Within a command, silence the library loggers that would print a second copy of
    an error as a traceback (JAX's callbacks) or absl warnings orbax emits about what
    jdiff reports itself (for instance a checkpoint without ``_CHECKPOINT_METADATA``).
    ``debug`` leaves them as they are. The levels are restored afterwards."""
    if debug:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in _NOISY}
    for name, level in _NOISY.items():
        lg = logging.getLogger(name)
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    stderr, sys.stderr = sys.stderr, DropTracebacks(sys.stderr)
    try:
        yield
    finally:
        sys.stderr = stderr
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class DropTracebacks:
    """A text stream in front of ``stream`` that drops the tracebacks whose error line
    is one of ``errors``, passing everything else through line by line.

    An asynchronous checkpoint save abandoned after a failed write (a full disk) leaves
    TensorStore callbacks that post to orbax's closed event loop; the C++ side prints
    each resulting ``RuntimeError: Event loop is closed`` as a bare traceback on
    ``sys.stderr``, dozens of them, after the failure has been reported in its line."""

    def __init__(self, stream, errors=("RuntimeError: Event loop is closed",)):
        self._stream, self._errors = stream, tuple(errors)
        self._lock = threading.Lock()
        # per writing thread: the incomplete line and the traceback being read. A
        # traceback printed by a background thread while the main thread reports the
        # failure must not take the report's line as its own last line.
        self._pending: dict[int, str] = {}
        self._block: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        who = threading.get_ident()
        with self._lock:
            pending = self._pending.pop(who, "") + text
            *lines, rest = pending.split("\n")
            if rest:
                self._pending[who] = rest
            for line in lines:
                self._line(who, line + "\n")
        return len(text)

    def _line(self, who: int, line: str) -> None:
        block = self._block.get(who)
        if block is None:
            if line.startswith("Traceback (most recent call last):"):
                self._block[who] = [line]
            else:
                self._stream.write(line)
            return
        block.append(line)
        # the error line (not indented, not blank) ends the traceback. A blank line does
        # not: a traceback printed at interpreter exit was seen to stop after its first
        # line and a blank one (CI), and such a fragment is never written.
        if line[:1] not in (" ", "\t") and line.strip():
            del self._block[who]
            if line.strip() not in self._errors:
                self._stream.write("".join(block))

    def flush(self) -> None:
        who = threading.get_ident()
        with self._lock:
            if who not in self._block and who in self._pending:
                self._stream.write(self._pending.pop(who))
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)
