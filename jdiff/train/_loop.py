"""A minimal, reusable training loop: restore, step, checkpoint, stop on SIGTERM.

:func:`train_iter` is a generator yielding ``(step, metrics, state)`` after every
update, so a CLI can wrap it with a progress bar; :func:`train` drives it with
callbacks (:mod:`jdiff.train._callbacks`). Both resume from the newest good checkpoint in ``checkpoint_dir``, save
every ``save_every`` steps and at the end, and on SIGTERM (or when a callback asks)
save the current step and stop cleanly. All processes of a multi-host run execute the
same loop; only process 0 logs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import optax

from jdiff.train._callbacks import as_callback
from jdiff.train._checkpoint import Checkpointer, SigtermFlag
from jdiff.train._parallel import is_main_process, make_mesh, replicate, shard_batch, sync_flag
from jdiff.train._step import TrainState, init_train_state, make_train_step

__all__ = ["TrainResult", "train", "train_iter", "log_metrics"]


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final (replicated) :class:`~jdiff.train.TrainState`.
      step: the step reached.
      preempted: True if the run stopped early on SIGTERM (a checkpoint of ``step``
        was saved when a ``checkpoint_dir`` was given).
      stopped: True if it stopped early for any reason (SIGTERM or a callback).
      metrics: the last step's metrics as Python floats (``None`` if no step ran).
    """

    state: TrainState
    step: int
    preempted: bool
    stopped: bool
    metrics: dict | None


class _Data:
    """Uniform access to the three supported data sources."""

    def __init__(self, data, start: int, extra: dict):
        self.kind = (
            "callable"
            if callable(data) and not hasattr(data, "__next__")
            else ("stateful" if hasattr(data, "get_state") and hasattr(data, "set_state") else "iterable")
        )
        self.data = data
        if self.kind == "stateful":
            if "data" in extra:
                data.set_state(extra["data"])
            elif start > 0:
                warnings.warn(
                    "the checkpoint has no data iterator state; the iterator starts from its current position",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.it = data
        elif self.kind == "iterable":
            self.it = iter(data)
            if start > 0:
                warnings.warn(
                    f"resuming at step {start} with a plain iterator: skipping {start} batches "
                    "(give an object with get_state/set_state, or a callable step -> batch, to "
                    "resume without replaying)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                for _ in range(start):
                    next(self.it)

    def batch(self, step: int):
        if self.kind == "callable":
            return self.data(step)
        try:
            return next(self.it)
        except StopIteration:
            raise RuntimeError(f"the data iterator ran out at step {step}") from None

    def state(self, step: int) -> dict:
        if self.kind == "stateful":
            return {"data": self.data.get_state()}
        return {"data_step": step}


def _host_metrics(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def log_metrics(every: int = 100, print_fn: Callable = print) -> Callable:
    """A callback that prints ``step`` and the metrics every ``every`` steps, on
    process 0 only."""

    def cb(step, metrics, state):
        if every and step % every == 0 and is_main_process():
            m = _host_metrics(metrics)
            print_fn(f"step {step}: " + " ".join(f"{k}={v:.6g}" for k, v in sorted(m.items())))

    return cb


def train_iter(
    loss_fn: Callable,
    params,
    data,
    num_steps: int,
    *,
    optimizer: optax.GradientTransformation,
    seed=0,
    mesh=None,
    checkpoint_dir=None,
    save_every: int = 1000,
    keep: int | None = 3,
    async_checkpointing: bool = True,
    accum_steps: int = 1,
    ema_decay: float | None = 0.9999,
    ema_warmup: bool = False,
    schedule=None,
    handle_sigterm: bool = True,
    stop_flag: SigtermFlag | None = None,
    frozen=None,
) -> Iterator:
    """Generator form of :func:`train`: yields ``(step, metrics, state)`` after each
    update (``metrics`` are device scalars) and returns a :class:`TrainResult`.
    ``gen.send(True)`` asks it to stop: it saves the current step and returns. Close
    the generator (``gen.close()`` or ``contextlib.closing``) if you abandon it early,
    so pending checkpoint writes finish and the SIGTERM handler is restored.

    The keyword arguments are those of :func:`train`."""
    mesh = make_mesh() if mesh is None else mesh
    state = replicate(init_train_state(params, optimizer, seed, ema=ema_decay is not None, frozen=frozen), mesh)
    ckpt = None
    extra: dict = {}
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, save_every=save_every, keep=keep, async_save=async_checkpointing)
    flag = stop_flag if stop_flag is not None else SigtermFlag()
    installed = handle_sigterm and stop_flag is None
    if installed:
        flag.install()
    try:
        if ckpt is not None:
            restored = ckpt.restore(state)
            if restored is not None:
                state, extra = restored.state, restored.extra
                if is_main_process():
                    print(f"resumed from checkpoint step {restored.step} in {ckpt.directory}", flush=True)
        step = int(np.asarray(state.step))
        source = _Data(data, step, extra)
        step_fn = make_train_step(
            loss_fn,
            optimizer,
            mesh=mesh,
            accum_steps=accum_steps,
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            schedule=schedule,
        )
        metrics = None
        stop_requested = False
        stopped = preempted = False
        while step < num_steps:
            batch = shard_batch(source.batch(step), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            if (yield step, metrics, state):
                stop_requested = True
            sigterm = flag.is_set()
            stop = sync_flag(sigterm or stop_requested)
            if ckpt is not None:
                ckpt.save(step, state, source.state(step), force=stop or step == num_steps)
            if stop:
                stopped = True
                preempted = sync_flag(sigterm)
                if is_main_process():
                    print(
                        f"stopping at step {step}"
                        + (" (SIGTERM)" if preempted else "")
                        + (": checkpoint saved" if ckpt is not None else ""),
                        flush=True,
                    )
                break
        if ckpt is not None and step == num_steps and ckpt.latest_step() != step:
            ckpt.save(step, state, source.state(step), force=True)
        return TrainResult(state, step, preempted, stopped, None if metrics is None else _host_metrics(metrics))
    finally:
        if ckpt is not None:
            ckpt.close()
        if installed:
            flag.uninstall()


def train(
    loss_fn: Callable,
    params,
    data,
    num_steps: int,
    *,
    optimizer: optax.GradientTransformation,
    callbacks: Sequence[Callable] = (),
    log_every: int = 0,
    **kw,
) -> TrainResult:
    """Train for ``num_steps`` optimizer updates (counting from step 0: a resumed run
    does only the remaining ones).

    Arguments:
      loss_fn: ``loss_fn(params, batch, keys) -> (loss, metrics)`` (see
        :func:`~jdiff.train.make_loss_fn`), or with ``frozen`` given
        ``loss_fn(params, batch, keys, frozen=frozen) -> (loss, metrics)``.
      params: initial parameters (ignored when a checkpoint is restored).
      data: this process's batches, one of: a callable ``step -> batch`` (resumes
        exactly by construction); an iterator with ``get_state() -> dict`` and
        ``set_state(dict)`` (its state goes into the checkpoint); or a plain iterable
        (resuming skips the batches already used). A batch is this process's slice
        (:func:`~jdiff.train.process_batch_slice`) as a pytree of arrays.
      num_steps: total number of updates.
      optimizer: an optax transformation (e.g. :func:`~jdiff.train.make_optimizer`).
      callbacks: functions ``cb(step, metrics, state)``, called on every process after
        each step (returning ``True`` stops the run, after saving), or
        :class:`~jdiff.train.Callback` objects, which are also told where the run
        starts (``on_start``) and how it ended (``on_end``): a metrics log
        (:class:`~jdiff.train.MetricsLog`), a progress bar
        (:class:`~jdiff.train.Progress`), stopping on signals
        (:class:`~jdiff.train.StopSignals`) or at a step (:class:`~jdiff.train.StopAt`).
      log_every: print metrics every that many steps on process 0 (0: never).
      frozen: optional pytree of parameters the loss reads but training never updates
        (a DPO reference model, a distillation teacher). They are part of the
        :class:`~jdiff.train.TrainState` (``state.frozen``): replicated over the mesh,
        given no gradient and no optimizer state, and saved in every checkpoint, so a
        resumed run uses the saved values (the ``frozen`` argument then only supplies
        their structure, like ``params``). A checkpoint written with frozen parameters
        does not restore into a run without them, nor the reverse
        (:class:`~jdiff.train.CheckpointMismatchError`).
      seed, mesh, checkpoint_dir, save_every, keep, async_checkpointing, accum_steps,
        ema_decay, ema_warmup, schedule, handle_sigterm, stop_flag: see
        :func:`train_iter`, :class:`~jdiff.train.Checkpointer` and
        :func:`~jdiff.train.make_train_step`.

    Returns:
      a :class:`TrainResult`. On SIGTERM it saves and returns with ``preempted=True``;
      a script then simply exits (status 0).
    """
    cbs = [as_callback(c) for c in callbacks]
    if log_every:
        cbs.append(as_callback(log_metrics(log_every)))
    gen = train_iter(loss_fn, params, data, num_steps, optimizer=optimizer, **kw)
    result = None
    try:
        try:
            item = next(gen)
            for cb in cbs:
                cb.on_start(item[0] - 1)
            while True:
                stop = False
                for cb in cbs:
                    stop = bool(cb.on_step(*item)) or stop
                item = gen.send(stop)
        except StopIteration as e:
            result = e.value
        finally:
            # On an exception (e.g. in a callback) clean up now -- wait for pending saves,
            # restore the signal handler -- not when the generator is garbage collected,
            # which may be at interpreter shutdown when orbax can no longer start threads.
            gen.close()
    finally:
        for cb in cbs:
            cb.on_end(result)  # None when an exception ends the loop
    return result
