"""One writer per run directory: an advisory lock the operating system drops with the
process.

Every command that writes a run directory (training; preference or tuning into a run)
holds :func:`lock_run` for as long as it writes. The lock is ``fcntl.flock`` on the file
``<run>/.lock``: the kernel releases it when the holder's file descriptor closes, which
includes every way a process ends (an exception, SIGTERM, ``kill -9``), so nothing is
left behind to clean by hand; the file itself stays (removing it would let two
processes lock two different files). After taking the lock the holder writes its
process id into the file, so a second writer can say who holds it. Readers (``jdiff
sample``, ``jdiff plot``) take no lock: a writer replaces files atomically.

``flock`` is local to a machine (on NFS it may not exclude another host); a multi-host
run takes it on process 0.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

from jdiff.runs._errors import RunIOError, RunLockedError

__all__ = ["LOCK_FILE", "RunLock", "lock_run", "lock_holder", "check_writable"]

LOCK_FILE = ".lock"


def lock_holder(run_dir) -> int | None:
    """The process id written in ``run_dir``'s lock file (``None`` if there is none or
    it is unreadable). The process may have ended: only a failed :func:`lock_run` says
    that it still holds the lock."""
    try:
        with open(os.path.join(os.fspath(run_dir), LOCK_FILE)) as f:
            text = f.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The lock of one run directory (see the module docstring); a context manager.

    Arguments:
      run_dir: the run directory (created, with its parents, if missing: the lock file
        lives inside it).
    """

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; raise :class:`RunLockedError` naming the
        holder's process id if another process holds it (:class:`RunIOError` if the
        directory or the lock file cannot be created)."""
        if self._fd is not None:
            return self
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise RunIOError.of(e, "cannot create run directory", self.run_dir) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunIOError.of(e, "cannot write the lock file of the run", self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = None
            for _ in range(20):  # the holder writes its pid right after locking
                pid = lock_holder(self.run_dir)
                if pid is not None:
                    break
                time.sleep(0.01)
            who = f"process {pid}" if pid is not None else "another process"
            raise RunLockedError(
                f"{self.run_dir} is in use: {who} is writing this run (lock {self.path}); "
                "wait for it to finish or stop it, or use another directory",
                path=self.run_dir,
                pid=pid,
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the pid (a full disk): a second writer then names no pid
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the file stays); a no-op if it is not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run_dir) -> RunLock:
    """Take ``run_dir``'s lock now (see :class:`RunLock`) and return it; use it as a
    context manager or call ``release()``. Raises :class:`RunLockedError` at once if
    another process writes the run.

    Example::

        with jdiff.runs.lock_run("runs/digits"):
            ...  # write the run
    """
    return RunLock(run_dir).acquire()


def check_writable(path, what: str = "folder") -> None:
    """Raise :class:`RunIOError` unless a file can be created in the existing folder
    ``path`` now (by creating and removing an empty folder in it: unlike ``os.access``
    this sees a read-only file system, a full disk and, for root, an immutable folder)."""
    path = os.fspath(path)
    probe = os.path.join(path, f".jdiff-write-check-{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunIOError.of(e, f"cannot write to the {what}", path) from None
    with contextlib.suppress(OSError):
        os.rmdir(probe)
