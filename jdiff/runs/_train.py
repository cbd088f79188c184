"""Training a run (:func:`train_run`): what ``jdiff train`` does, as one library call.

It holds the run directory's lock (:func:`jdiff.runs.lock_run`) before anything in it is
written, plans the request again under it, builds data, model and optimizer (the
learning-rate plan follows from the run's history), records the start in
``history.jsonl``, and drives :func:`jdiff.train.train` with callbacks: the metrics
log, a progress bar, sample grids, stopping on SIGTERM / Ctrl-C or at a step. The end
(finished or stopped, and why) is recorded and returned.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

import jdiff
from jdiff import data as D
from jdiff import models as M
from jdiff import plotting
from jdiff import train as T
from jdiff.runs import _dir as R
from jdiff.runs._build import build_run, check_solver_nfe, denoiser_apply, make_solver, run_denoiser, to_host
from jdiff.runs._config import RunConfig, config_to_dict
from jdiff.runs._errors import RunError
from jdiff.runs._lock import check_writable, lock_run
from jdiff.runs._plan import TrainRequest, _no_checkpoint_yet
from jdiff.train import _run as record

__all__ = ["TrainOutcome", "train_run"]


@dataclasses.dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train_run` did.

    Attributes:
      out: the run directory; step: the step reached; total_steps: ``train.steps``.
      finished: the run reached ``total_steps``.
      stopped: why it stopped early (``"SIGTERM"``, ``"interrupted (SIGINT)"``,
        ``"--stop-at N"``, ``"stop requested"``), else ``None``.
      nothing_to_do: why no step was trained (the run is already at ``step``), else ``None``.
      loss: the last logged loss; wall_time: the run's wall time so far (seconds).
      samples: the sample grid written at the end (``None`` if none); checkpoints: the
        checkpoint folder.
    """

    out: str
    step: int
    total_steps: int
    finished: bool = False
    stopped: str | None = None
    nothing_to_do: str | None = None
    loss: float = float("nan")
    wall_time: float = 0.0
    samples: str | None = None
    checkpoints: str = ""


def _state_target(run_, cfg: RunConfig, mesh):
    """Shapes, dtypes and (replicated) shardings of the state the loop trains, as the
    target of a restore."""
    tx, _ = cfg.optim.build(cfg.train.steps)  # the state's structure does not depend on the schedule
    shapes = jax.eval_shape(
        lambda p: T.init_train_state(p, tx, cfg.train.seed, ema=cfg.ema.decay is not None), run_.params
    )
    sharding = T.replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _optimizer(o, total: int, extensions):
    """``(optax transformation, schedule)`` of :meth:`OptimizerConfig.build` for a run
    planned for ``total`` steps whose total was changed at the given steps
    (``extensions``, see :func:`jdiff.train.lr_schedule`): without extensions exactly
    ``o.build(total)``."""
    if not extensions:
        return o.build(total)
    warmup = min(o.warmup_steps, max(total - 1, 0))  # as OptimizerConfig.schedule_fn
    sched = T.lr_schedule(
        o.lr,
        warmup_steps=warmup,
        total_steps=total if o.schedule == "cosine" else None,
        final_lr=o.final_lr,
        extensions=extensions,
    )
    tx = T.make_optimizer(sched, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)
    return tx, sched


def _print(line: str) -> None:
    print(line, flush=True)


class _Grids(T.Callback):
    """Sample grids every ``train.grid_every`` steps (process 0, on its first local
    device, from host copies of the parameters), and the loss plot with them."""

    def __init__(self, run_, out: str, log: T.MetricsLog):
        cfg, s = run_.cfg, run_.cfg.sample
        self.run, self.out, self.cfg, self.s, self.log = run_, out, cfg, s, log
        self.solver = make_solver(s)
        self.parts = denoiser_apply(run_)
        self.mesh = Mesh(
            np.array(jax.local_devices()[:1], dtype=object), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        self.labels = np.arange(s.num) % run_.num_classes if run_.num_classes else None
        self.reference = run_.x[:5000] if run_.x.ndim == 2 else None
        self.main = jax.process_index() == 0

    def write(self, step, state) -> str:
        s, run_ = self.s, self.run
        params = state.ema_params if (s.ema and state.ema_params is not None) else state.params
        den = run_denoiser(self.parts, run_, to_host(params), s.guidance)
        x = jdiff.generate(
            self.solver,
            den,
            s.num,
            run_.data_shape,
            nfe=s.nfe,
            seed=s.seed,
            cond=self.labels,
            mesh=self.mesh,
            grid_kind=s.grid_kind,
        )
        path = os.path.join(self.out, R.SAMPLES_DIR, f"step_{step:07d}.png")
        nrow = run_.num_classes if (run_.num_classes and s.num % run_.num_classes == 0) else None
        title = f"{self.cfg.name} step {step} ({s.solver}, nfe {s.nfe})"
        plotting.save_samples(x, path, nrow=nrow, reference=self.reference, title=title)
        return path

    def plot_loss(self) -> None:
        rows = [r for r in plotting.read_metrics(os.path.join(self.out, R.METRICS_FILE)) if "loss" in r]
        if rows:
            steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
            plotting.plot_loss(steps, losses, os.path.join(self.out, R.LOSS_PLOT), f"training loss: {self.cfg.name}")

    def on_step(self, step, metrics, state):
        every, total = self.cfg.train.grid_every, self.cfg.train.steps
        if self.main and every and step % every == 0 and step != total:
            self.write(step, state)
            self.plot_loss()
            self.log.restart_interval()  # grids are not training time


class _StartCheck(T.Callback):
    """The loop must restore the step that was planned (checkpoints changed meanwhile otherwise)."""

    def __init__(self, start: int, ckpt_dir: str):
        self.start, self.ckpt_dir = start, ckpt_dir

    def on_start(self, step):
        if step != self.start:
            raise RunError(
                f"the checkpoints in {self.ckpt_dir} changed while starting (expected to resume at "
                f"step {self.start}, the loop restored step {step}); run the command again"
            )


def train_run(
    request: TrainRequest,
    *,
    stop_at: int | None = None,
    argv: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence = (),
    lock: bool = True,
) -> TrainOutcome:
    """Train the run of ``request`` (:func:`jdiff.runs.plan_training`) in its directory.

    Arguments:
      request: what to train where (a new run, or the resumption of the run there).
      stop_at: save a checkpoint and stop after this step.
      argv: the command recorded in ``history.jsonl`` (default ``sys.argv``).
      progress: draw a progress bar on stderr.
      log: called with the run's informational lines (process 0; default: print them
        on stdout).
      callbacks: more :func:`jdiff.train.train` callbacks, after the run's own.
      lock: hold the run directory's lock while writing it (on process 0).

    Example::

        req = jdiff.runs.plan_training("toy2d", ["train.steps=500"], out="runs/toy")
        outcome = jdiff.runs.train_run(req, progress=False)
        print(outcome.step, outcome.loss)

    Returns:
      a :class:`TrainOutcome`. Raises :class:`RunError` (another process holds the
      run: :class:`RunLockedError`), :class:`RunIOError` (the run directory or its
      checkpoint folder cannot be written: checked before the first step),
      :class:`jdiff.train.CheckpointWriteError` (a checkpoint write failed: the
      checkpoints saved before are intact) and the other checkpoint errors of
      :mod:`jdiff.train`.
    """
    t_start = time.perf_counter()  # wall_time in metrics.jsonl counts from here (data, init, compile included)
    if not lock or jax.process_index() != 0:
        return _train(request, stop_at, argv, progress, log, callbacks, t_start)
    # One writer per run directory: the lock comes before anything in it is written (the
    # OS drops it when this process ends, however it ends), and the request is planned
    # again under it (another writer may have changed the run since it was planned).
    with lock_run(request.out):
        return _train(request.replan(), stop_at, argv, progress, log, callbacks, t_start)


def _train(req: TrainRequest, stop_at, argv, progress, log, callbacks, t_start) -> TrainOutcome:
    cfg, out = req.cfg, req.out
    main_proc = jax.process_index() == 0
    say = (log or _print) if main_proc else (lambda line: None)
    ckpt_dir = os.path.join(out, R.CKPT_DIR)
    run_ = build_run(cfg)
    cfg = run_.cfg  # with the data-derived fields filled
    t = cfg.train
    n = int(run_.x.shape[0])
    if t.batch_size > n:
        raise RunError(f"train.batch_size ({t.batch_size}) is larger than the data set ({n} examples)")
    mesh = T.make_mesh()
    n_dev = mesh.devices.size
    if t.batch_size % n_dev or (t.batch_size // cfg.optim.accum_steps) % n_dev:
        raise RunError(
            f"train.batch_size {t.batch_size} (and each of optim.accum_steps={cfg.optim.accum_steps} "
            f"micro-batches) must be divisible by the {n_dev} devices"
        )
    s = cfg.sample
    check_solver_nfe(run_, make_solver(s), s.nfe, s.grid_kind)
    arrays = {"x": run_.x} if run_.labels is None else {"x": run_.x, "label": run_.labels}
    try:
        loader = D.Loader(arrays, t.batch_size, cfg.data.shuffle_seed)
    except ValueError as e:
        raise RunError(str(e)) from e
    loss_fn = T.make_loss_fn(run_.apply, cfg.objective)

    # Which step the loop will restore (read-only: nothing is moved or reported here), so
    # that a command with nothing to do changes nothing and the optimizer is built with
    # the run's learning-rate plan before training starts.
    restored = R.restorable_step(ckpt_dir, _state_target(run_, cfg, mesh))
    if restored is None and req.resume:
        raise _no_checkpoint_yet(out)
    start = 0 if restored is None else restored
    if restored is not None and (restored >= t.steps or (stop_at is not None and stop_at <= restored)):
        why = f"--stop-at {stop_at}"
        if restored >= t.steps:
            why = f"train.steps={t.steps} (raise it with --steps to continue)"
        return TrainOutcome(out, restored, t.steps, nothing_to_do=why, checkpoints=ckpt_dir)

    # The run's record: the learning-rate plan follows from the history (the totals in force
    # at each start), extended by this invocation's entry; process 0 writes.
    history = record.read_history(out) if os.path.isdir(out) else []
    argv = list(argv if argv is not None else sys.argv)
    before: list = []
    if restored is not None and not any(e.get("event") == "started" for e in history):
        # A run without a history (written before history.jsonl existed, or with it deleted):
        # its schedule was planned for the total recorded in its configuration.
        saved_total = int((req.saved or {}).get("train", {}).get("steps", t.steps))
        before.append(
            record.history_entry(
                "started",
                start_step=0,
                total_steps=saved_total,
                what=f"reconstructed at step {restored}: no history; the total recorded in config.json",
            )
        )
    in_force = record.schedule_plan(history + before)
    old_total = (in_force[1][-1][1] if in_force[1] else in_force[0]) if in_force[0] is not None else None
    what = f"trained from step {start} to {t.steps}" if restored is None else f"resumed at step {start}"
    if restored is not None and old_total is not None and old_total != t.steps:
        what += f"; train.steps {old_total} -> {t.steps}: schedule extended at {start} to {t.steps}"
    if req.replaced:
        what += "; config.json was missing or unreadable: replaced by the configuration given (--replace-config)"
    changed = {k: v for k, v in req.changes.items() if k != "train.steps"}
    if changed:
        what += "; changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    entry = record.history_entry(
        "started", argv=argv, start_step=start, total_steps=t.steps, stop_at=stop_at, what=what
    )
    base_total, extensions = record.schedule_plan(history + before + [entry])
    tx, sched = _optimizer(cfg.optim, base_total or t.steps, extensions)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # multi-host runs only

        multihost_utils.sync_global_devices("jdiff_train_plan")  # every process has read the history

    wall_offset = 0.0
    if main_proc:
        # Before the first step: a folder that cannot take a checkpoint fails now, not at the first save.
        for folder, what in ((out, "run directory"), (ckpt_dir, "checkpoint folder")):
            if os.path.isdir(folder):
                check_writable(folder, what)
        wall_offset = _write_start(req, run_, cfg, out, n, before + [entry], start)
        say(
            f"jdiff train: preset {cfg.name}, {M.count_params(run_.params):,} parameters, data "
            f"{tuple(run_.x.shape)}{f', {run_.num_classes} classes' if run_.num_classes else ''}, "
            f"{jax.device_count()} device(s) on {jax.process_count()} process(es) -> {out}"
        )
        if extensions and restored is not None and extensions[-1][0] == start:
            say(
                f"train.steps {old_total} -> {t.steps}: the learning-rate schedule continues from step {start} "
                f"(lr {float(sched(start)):.4g}) and reaches optim.final_lr at step {t.steps}"
            )

    metrics_log = T.MetricsLog(
        os.path.join(out, R.METRICS_FILE), t.log_every, t.steps, t.batch_size, t_start=t_start, wall_offset=wall_offset
    )
    grids = _Grids(run_, out, metrics_log)
    signals = T.StopSignals()
    cbs = [
        _StartCheck(start, ckpt_dir),
        metrics_log,
        T.Progress(t.steps, desc=cfg.name, log=metrics_log, disable=not progress),
        grids,
        T.StopAt(stop_at),
        signals,
        *callbacks,
    ]
    with signals:
        result = T.train(
            loss_fn,
            run_.params,
            loader,
            t.steps,
            optimizer=tx,
            callbacks=cbs,
            seed=t.seed,
            mesh=mesh,
            checkpoint_dir=ckpt_dir,
            save_every=t.checkpoint_every,
            keep=t.keep,
            async_checkpointing=t.async_checkpointing,
            accum_steps=cfg.optim.accum_steps,
            ema_decay=cfg.ema.decay,
            ema_warmup=cfg.ema.warmup,
            schedule=sched,
            stop_flag=signals.flag,
        )
    last_loss = (metrics_log.last_row or {}).get("loss", float("nan"))
    if result is None:  # the loop ran no step (checked above; kept for safety)
        return TrainOutcome(out, start, t.steps, nothing_to_do=f"train.steps={t.steps}", checkpoints=ckpt_dir)
    finished = result.step >= t.steps and not result.stopped
    why = path = None
    if not finished:
        if result.preempted:
            why = "SIGTERM"
        elif signals.interrupted:
            why = "interrupted (SIGINT)"
        elif stop_at is not None and result.step >= stop_at:
            why = f"--stop-at {stop_at}"
        else:
            why = "stop requested"
    if main_proc:
        if finished:
            path = grids.write(result.step, result.state)
        grids.plot_loss()
        record.append_history(
            out,
            record.history_entry(
                "finished" if finished else "stopped",
                argv=argv,
                start_step=start,
                end_step=result.step,
                total_steps=t.steps,
                what=f"trained {start}->{result.step}" + ("" if finished else f" ({why})"),
            ),
        )
    wall = wall_offset + (time.perf_counter() - t_start)
    return TrainOutcome(out, result.step, t.steps, finished, why, None, last_loss, wall, path, ckpt_dir)


def _write_start(req: TrainRequest, run_, cfg: RunConfig, out: str, n: int, entries: list, start: int) -> float:
    """Write the run's configuration, facts (``run.json``, once) and start entries, and
    drop the metrics lines past ``start`` (that work is redone; a fresh start redoes
    everything). Returns the wall time the run had reached at ``start``."""
    os.makedirs(os.path.join(out, R.SAMPLES_DIR), exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    if req.saved is None or req.replaced or cfg_dict != req.saved:
        record.write_config(out, cfg_dict)
    if not os.path.exists(os.path.join(out, R.RUN_FILE)):
        record.write_json_atomic(
            os.path.join(out, R.RUN_FILE),
            {
                "preset": cfg.name,
                "data_shape": list(run_.data_shape),
                "num_classes": run_.num_classes,
                "num_examples": n,
                "num_params": M.count_params(run_.params),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "devices": str(jax.devices()[0].device_kind),
                "platform": jax.default_backend(),
                "jax_version": jax.__version__,
                "jdiff_version": jdiff.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
    for e in entries:
        record.append_history(out, e)
    return record.trim_metrics(os.path.join(out, R.METRICS_FILE), start)
