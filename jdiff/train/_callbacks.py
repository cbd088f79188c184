"""Callbacks of the training loop (:func:`jdiff.train.train`): a metrics log, a
progress bar, stopping on signals or at a step.

A callback is a plain function ``cb(step, metrics, state) -> stop`` or an object with
the methods of :class:`Callback`: ``on_start(step)`` before the first update (``step``
is where the run starts: 0, or the restored checkpoint's step), ``on_step(step, metrics,
state)`` after each update (a true return asks the loop to save and stop), and
``on_end(result)`` once the loop has returned (``result`` is the
:class:`~jdiff.train.TrainResult`, or ``None`` when an exception ends the loop, so that
a callback can release what it holds). Callbacks run on every process; the ones here
write and print on process 0 only.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jdiff.train._checkpoint import SigtermFlag
from jdiff.train._parallel import is_main_process

__all__ = ["Callback", "as_callback", "MetricsLog", "Progress", "StopSignals", "StopAt", "metrics_row"]


class Callback:
    """Base class of loop callbacks: every method does nothing (override the ones you
    need)."""

    def on_start(self, step: int) -> None:
        """Before the first update of this invocation; ``step`` is the step it starts from."""

    def on_step(self, step: int, metrics, state) -> bool | None:
        """After update ``step`` (1-based), with its metrics (device scalars) and the
        state; return ``True`` to save and stop."""

    def on_end(self, result) -> None:
        """After the loop: its :class:`~jdiff.train.TrainResult`, or ``None`` on an exception."""


class _FunctionCallback(Callback):
    def __init__(self, fn: Callable):
        self.fn = fn

    def on_step(self, step, metrics, state):
        return self.fn(step, metrics, state)


def as_callback(cb) -> Callback:
    """``cb`` as a :class:`Callback` (a plain function becomes its ``on_step``)."""
    if isinstance(cb, Callback):
        return cb
    if all(hasattr(cb, m) for m in ("on_start", "on_step", "on_end")):
        return cb
    if callable(cb):
        return _FunctionCallback(cb)
    raise TypeError(f"a callback is a function (step, metrics, state) -> stop or a Callback, got {cb!r}")


def metrics_row(step: int, host: list, steps: int, seconds: float, batch_size: int, wall: float) -> dict:
    """One metrics line: the interval means of the step metrics in ``host`` (``lr``: the
    last value), ``steps_per_sec`` / ``samples_per_sec`` over ``steps`` updates in
    ``seconds`` (``None`` without either), and ``wall_time``."""
    row: dict[str, Any] = {"step": int(step)}
    for k in sorted(host[0]) if host else ():
        vals = [float(np.asarray(m[k])) for m in host]
        row[k] = vals[-1] if k == "lr" else float(np.mean(vals))
    rate = steps / seconds if steps and seconds > 0 else None
    row["steps_per_sec"] = rate
    row["samples_per_sec"] = None if rate is None else rate * batch_size
    row["wall_time"] = wall
    return row


class MetricsLog(Callback):
    """Append one JSON line of :func:`metrics_row` to ``path`` every ``every`` steps, at
    ``total_steps`` and at the step the loop stops (process 0).

    The first update of an invocation includes compilation: it is logged but left out
    of ``steps_per_sec``. ``wall_time`` counts from ``t_start`` (``time.perf_counter()``,
    default: construction) plus ``wall_offset`` (the wall time of a resumed run so far).

    Attributes:
      last_row: the last line written (``None`` before the first).
    """

    def __init__(
        self,
        path,
        every: int,
        total_steps: int,
        batch_size: int,
        *,
        t_start: float | None = None,
        wall_offset: float = 0.0,
    ):
        self.path, self.every, self.total, self.batch_size = path, int(every), int(total_steps), int(batch_size)
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.wall_offset = float(wall_offset)
        self.last_row: dict | None = None
        self._main = is_main_process()
        self._pending: list = []
        self._t0, self._steps, self._first = self.t_start, 0, True

    def restart_interval(self) -> None:
        """Start the steps/s interval now (call after work that is not training, such
        as writing a sample grid)."""
        self._t0, self._steps = time.perf_counter(), 0

    def _write(self, step: int) -> None:
        host = jax.device_get(self._pending)  # waits for the steps dispatched so far
        now = time.perf_counter()
        wall = self.wall_offset + (now - self.t_start)
        row = metrics_row(step, host, self._steps, now - self._t0, self.batch_size, wall)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last_row = row
        self._pending.clear()
        self._t0, self._steps = now, 0

    def on_step(self, step, metrics, state):
        if self._first:
            jax.block_until_ready(metrics)
            self._first = False
            self.restart_interval()
        else:
            self._steps += 1
        if not self._main:
            return None
        self._pending.append(metrics)
        if (self.every and step % self.every == 0) or step == self.total:
            self._write(step)
        return None

    def on_end(self, result):
        if self._main and result is not None and self._pending:
            self._write(result.step)  # the steps since the last line (a run stopped between log steps)


class Progress(Callback):
    """A tqdm progress bar on stderr (process 0), showing the loss of ``log``'s last line
    (a :class:`MetricsLog`) when given."""

    def __init__(self, total_steps: int, *, desc: str = "", log: MetricsLog | None = None, disable: bool = False):
        self.total, self.desc, self.log, self.disable = int(total_steps), desc, log, disable
        self.bar = None
        self._row = None

    def on_step(self, step, metrics, state):
        if not is_main_process():
            return None
        if self.bar is None:
            from tqdm.auto import tqdm  # only when a bar is drawn

            self.bar = tqdm(
                total=self.total,
                initial=step - 1,
                unit="step",
                dynamic_ncols=True,
                desc=self.desc,
                smoothing=0.1,
                file=sys.stderr,
                disable=self.disable,
            )
        self.bar.update(1)
        row = None if self.log is None else self.log.last_row
        if row is not None and row is not self._row and "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
            self._row = row
        return None

    def on_end(self, result):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopAt(Callback):
    """Save and stop once step ``step`` is reached (``None``: never)."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step(self, step, metrics, state):
        return self.step is not None and step >= self.step


class StopSignals(Callback):
    """Stop cleanly on signals, as a context manager around the loop: SIGTERM sets
    ``flag`` (pass it as :func:`jdiff.train.train`'s ``stop_flag``: the run was
    preempted); a first Ctrl-C (SIGINT) asks the loop to save and stop
    (``interrupted``); a second one raises ``KeyboardInterrupt`` at once. Handlers are
    installed on entering (SIGINT only from the main thread) and restored on exit.

    Arguments:
      message: printed on stderr at the first Ctrl-C (process 0; ``None``: nothing).
    """

    def __init__(self, message: str | None = "interrupt: saving a checkpoint and stopping (Ctrl-C again to abort)"):
        self.flag = SigtermFlag(signals=(signal.SIGTERM,))
        self.interrupted = False
        self.message = message
        self._previous = None

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        if self.message and is_main_process():
            print("\n" + self.message, file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        self.flag.install()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        self.flag.uninstall()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_step(self, step, metrics, state):
        return self.interrupted
