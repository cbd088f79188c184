"""Training a student and shipping it: what ``jdiff distill`` does, as library calls.

:func:`distill_run` trains a method of :data:`jdiff.distill.METHODS` on a teacher in a
folder, the way :func:`jdiff.runs.train_run` trains a run: it holds the folder's lock
(:func:`jdiff.runs.lock_run`), records what was asked (``distill.json``) and every
invocation (``history.jsonl``), logs ``metrics.jsonl`` and ``loss.png``, checkpoints
under ``checkpoints/`` and resumes exactly (the same final parameters as a run never
stopped), stops cleanly on SIGTERM / Ctrl-C. At the end it writes the **student
folder** in the same place, shipped like the digits model
(:func:`jdiff.runs.export_pretrained`):

- ``params.npz``: the student's parameters, float32 arrays named by their path
  (:func:`jdiff.runs.flatten_params`), read without pickle;
- ``student.json``: the method, its options, the student's step count, the teacher's
  source, configuration and process (the network is rebuilt from it: the teacher's
  parameters are not needed to sample), how it was trained;
- ``metrics.jsonl``, ``history.jsonl``, ``loss.png`` and ``TRAINED.md`` (the command,
  the machine, the wall time). ``checkpoints/`` only serves to continue training: a
  shipped copy leaves it out.

:func:`load_student` reads a student folder back and :func:`sample_student` draws from
it with the method's own sampler (``jdiff sample --student DIR``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jdiff import data as D
from jdiff import models as M
from jdiff import plotting
from jdiff import train as T
from jdiff.distill._student import (
    DISTILL_FILE,
    FORMAT,
    STUDENT_FILE,
    _build_target,
    _json_safe,
    _layout,
    _recipe,
    _teacher_record,
    _write_student,
    resolve_options,
)
from jdiff.distill._teacher import DistillError, Recipe, Teacher, load_teacher
from jdiff.runs import _dir as R
from jdiff.runs._lock import check_writable, lock_run
from jdiff.runs._pretrained import PRETRAINED
from jdiff.runs._train import _optimizer, _StartCheck
from jdiff.train import _run as record
from jdiff.train._config import OptimizerConfig

__all__ = ["DistillOutcome", "distill_run", "parse_options", "recipe_options"]

RESUMABLE = ("train.steps", "train.log_every", "train.save_every", "train.keep", "teacher.source")


# ------------------------------------------------------------------------ options
def recipe_options(recipe: Recipe) -> dict[str, Any]:
    """``{name: default}`` of the options a recipe declares: the keyword parameters of its
    ``build`` with a default, and its ``defaults`` dict if it has one (empty when it
    takes ``**options`` and declares nothing)."""
    sig = inspect.signature(recipe.build)
    out = {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "teacher" and p.default is not p.empty
    }
    declared = getattr(recipe, "defaults", None)
    return {**declared, **out} if isinstance(declared, Mapping) else out


def _declares_all(recipe: Recipe) -> bool:
    """Whether :func:`recipe_options` lists every option ``build`` accepts."""
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(recipe.build).parameters.values())
    return not takes_any or isinstance(getattr(recipe, "defaults", None), Mapping)


def _literal(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _typed(text: str, default, key: str):
    if isinstance(default, bool):
        v = _literal(text)
        if not isinstance(v, bool):
            raise DistillError(f"option {key}: expected true or false, got {text!r}")
        return v
    if isinstance(default, (list, tuple)):
        items = [_literal(t) for t in text.split(",") if t.strip()]
        return type(default)(items)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        v = _literal(text)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (isinstance(default, int) and v != int(v)):
            raise DistillError(
                f"option {key}: expected a{'n integer' if isinstance(default, int) else ' number'}, got {text!r}"
            )
        return int(v) if isinstance(default, int) else float(v)
    if isinstance(default, str):
        return None if text.strip().lower() in ("none", "null") and default != "none" else text
    return _literal(text)


def parse_options(method: str, texts: Sequence[str]) -> dict[str, Any]:
    """``{key: value}`` of ``key=value`` texts for ``method``'s recipe: a value is read
    by the type of the option's default (:func:`recipe_options`; a comma list for a
    tuple option), or as a JSON literal (else a string) for an option without one. An
    option the recipe does not declare (when it declares its options) is refused, naming
    them. A value naming a student folder stands for that student's parameters (see
    :func:`distill_run`).

    Raises:
      DistillError: unknown method or option, malformed text, a value of the wrong type.
    """
    recipe = _recipe(method)
    known = recipe_options(recipe)
    takes_any = not _declares_all(recipe)
    out: dict[str, Any] = {}
    for text in texts:
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise DistillError(f"option {text!r} is not of the form key=value")
        key, value = (s.strip() for s in text.split("=", 1))
        if key in known:
            out[key] = _typed(value, known[key], key)
        elif takes_any:
            out[key] = _literal(value)
        else:
            raise DistillError(
                f"unknown option {key!r} for method {method}; options: "
                + (", ".join(f"{k}={v!r}" for k, v in known.items()) or "(none)")
            )
    return out


# ------------------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class DistillOutcome:
    """What :func:`distill_run` did.

    Attributes:
      out: the folder; step: the step reached; total_steps: the steps asked for.
      finished: the student is trained and written (``student``: the folder).
      stopped: why it stopped early (``"SIGTERM"``, ``"interrupted (SIGINT)"``,
        ``"stop_at N"``, ``"stop requested"``), else ``None``.
      nothing_to_do: why no step was trained, else ``None``.
      loss: the last logged loss; wall_time: the training's wall time so far (seconds).
    """

    out: str
    step: int
    total_steps: int
    finished: bool = False
    stopped: str | None = None
    nothing_to_do: str | None = None
    loss: float = float("nan")
    wall_time: float = 0.0
    student: str | None = None


class _Batches:
    """The teacher's training data as the loss's batches (``batch_fn``), resumable
    (its position goes into the checkpoints)."""

    def __init__(self, loader, batch_fn):
        self.loader, self.batch_fn = loader, batch_fn

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.loader)
        return self.batch_fn(b["x"], b.get("label"))

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise DistillError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, DISTILL_FILE)):
        if set(os.listdir(out)) - {".lock"}:
            raise DistillError(
                f"{out} holds something other than a distillation (no {DISTILL_FILE}): use another --out"
            )


def distill_run(
    method: str,
    teacher,
    out,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    seed: int = 0,
    options: Mapping | None = None,
    warmup_steps: int = 0,
    schedule: str = "constant",
    final_lr: float = 0.0,
    clip_norm: float | None = 1.0,
    ema_decay: float | None = None,
    log_every: int = 10,
    save_every: int = 500,
    keep: int = 2,
    stop_at: int | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence = (),
) -> DistillOutcome:
    """Train ``method``'s student of ``teacher`` in the folder ``out`` and write it there.

    Args:
      method: a key of :data:`jdiff.distill.METHODS`.
      teacher: a :class:`Teacher`, or what :func:`load_teacher` reads (``"digits"``, a
        model folder, a ``jdiff train`` run directory). Its run's training data are the
        distillation's data (``teacher.run.cfg.data.load()``).
      out: the folder (created; a folder of an earlier call with the same settings is
        continued from its newest checkpoint, exactly; ``steps`` may be raised).
      steps: optimizer steps in total; batch_size, lr, seed: the batch, AdamW's peak
        learning rate (``warmup_steps`` of linear warmup, then ``schedule``
        ``"constant"`` or ``"cosine"`` to ``final_lr``; gradients clipped to
        ``clip_norm``), the seed of the data order and of the loss's keys.
      options: the recipe's options (``Recipe.build(teacher, **options)``). A string
        value naming a student folder (``student.json``) is replaced by that student's
        parameters (:func:`load_student`): the next round of a method that chains
        students (``teacher_params=DIR``, ``flow=DIR``); the record keeps the folder. An
        option ``total_steps`` the recipe declares (a curriculum over training) and the
        caller leaves out is set to ``steps``.
      ema_decay: keep an exponential moving average of the student's parameters and ship
        it (``None``: ship the trained parameters). A method whose loss reads an EMA
        target sets the decay itself (``Setup.notes["ema_decay"]``): the train step keeps
        that EMA, the trained parameters are shipped, and ``ema_decay`` must be ``None``.
      log_every, save_every, keep: metrics lines, checkpoint interval, checkpoints kept.
      stop_at: save a checkpoint and stop after this step (continue with another call).
      progress: a progress bar on stderr; argv: the command recorded in
        ``history.jsonl`` (default ``sys.argv``); log: called with informational lines
        (default: print); callbacks: more :func:`jdiff.train.train` callbacks.

    Returns:
      a :class:`DistillOutcome`.

    Raises:
      DistillError: unknown method, a teacher the method refuses (another process, ...),
        bad options, ``out`` holding something else or a distillation with other
        settings (each differing setting on its own line); :class:`jdiff.runs.RunLockedError`:
        another process writes ``out``; the checkpoint errors of :mod:`jdiff.train`.
    """
    t_start = time.perf_counter()
    out = os.fspath(out)
    say = log or (lambda line: print(line, flush=True))
    recipe = _recipe(method)
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0), ("keep", keep, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise DistillError(f"{name} must be an integer >= {lo}, got {v!r}")
    try:
        optim = OptimizerConfig(
            lr=lr, warmup_steps=warmup_steps, schedule=schedule, final_lr=final_lr, clip_norm=clip_norm
        )
    except (ValueError, TypeError) as e:
        raise DistillError(f"optimizer: {e}") from None
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise DistillError(f"ema_decay must be in (0, 1) or None, got {ema_decay!r}")
    options = dict(options or {})
    _check_out(out)
    with lock_run(out):
        _check_out(out)
        if not isinstance(teacher, Teacher):
            spec = os.fspath(teacher)
            source = spec if spec in PRETRAINED else os.path.abspath(spec)  # the command that reproduces it
            teacher = dataclasses.replace(load_teacher(spec), source=source)
        cfg = {
            "format": FORMAT,
            "method": method,
            "options": _json_safe(options),
            "teacher": _teacher_record(teacher),
            "out": out,
            "train": {
                "steps": int(steps),
                "batch_size": int(batch_size),
                "lr": float(lr),
                "warmup_steps": int(warmup_steps),
                "schedule": schedule,
                "final_lr": float(final_lr),
                "clip_norm": clip_norm,
                "seed": int(seed),
                "ema_decay": ema_decay,
                "log_every": int(log_every),
                "save_every": int(save_every),
                "keep": int(keep),
            },
        }
        saved_path = os.path.join(out, DISTILL_FILE)
        saved = R.read_json(saved_path, "distillation record") if os.path.exists(saved_path) else None
        if "total_steps" in recipe_options(recipe) and "total_steps" not in options:
            # the curriculum spans the training (the first call's steps: raising steps keeps it)
            options["total_steps"] = int((saved or {}).get("options", {}).get("total_steps", steps))
            cfg["options"]["total_steps"] = options["total_steps"]
        if saved is not None:
            compare = {k: v for k, v in saved.items() if k != "out"}
            try:
                record.check_resume_config(compare, {k: v for k, v in cfg.items() if k != "out"}, allowed=RESUMABLE)
            except record.ResumeConfigError as e:
                lines = "".join(f"\n  {k}: {a!r} -> {b!r}" for k, (a, b) in e.forbidden.items())
                err = DistillError(
                    f"{out} holds a distillation with other settings; continuing it cannot change "
                    f"{len(e.forbidden)} of them (use another --out):{lines}"
                )
                err.multiline = True
                raise err from None
        try:
            setup = recipe.build(teacher, **resolve_options(options))
        except TypeError as e:
            raise DistillError(f"method {method}: {e}") from None
        target_ema = setup.notes.get("ema_decay")
        if target_ema is not None and ema_decay is not None and float(ema_decay) != float(target_ema):
            raise DistillError(
                f"method {method} keeps an EMA of the student as its target (decay {target_ema:g}, from its "
                f"options): ema_decay does not apply"
            )
        ema = (ema_decay if target_ema is None else float(target_ema), target_ema is None and ema_decay is not None)
        layout = _layout(setup.params, teacher.params)
        if layout is None:
            _build_target(recipe, teacher, options)  # raises if the student could not be read back
        args = (recipe, teacher, setup, cfg, layout, ema, optim, out, stop_at, progress, argv, say, callbacks)
        return _train(*args, t_start)


def _train(recipe, teacher, setup, cfg, layout, ema, optim, out, stop_at, progress, argv, say, callbacks, t_start):
    """Train under the lock. ``ema``: ``(decay of the train state's EMA or None, ship
    the EMA)``."""
    tr = cfg["train"]
    steps, ckpt_dir = tr["steps"], os.path.join(out, R.CKPT_DIR)
    try:
        x, labels, _ = teacher.run.cfg.data.load()
    except (ValueError, OSError) as e:
        raise DistillError(f"the teacher's data ({teacher.run.cfg.data.source}): {e}") from e
    if tuple(x.shape[1:]) != tuple(teacher.shape):
        raise DistillError(f"the teacher's data have shape {tuple(x.shape[1:])}, its network {teacher.shape}")
    if tr["batch_size"] > x.shape[0]:
        raise DistillError(f"batch_size {tr['batch_size']} is larger than the teacher's data ({x.shape[0]} examples)")
    mesh = T.make_mesh()
    if tr["batch_size"] % mesh.devices.size:
        raise DistillError(f"batch_size {tr['batch_size']} must be divisible by the {mesh.devices.size} devices")
    arrays = {"x": x} if labels is None else {"x": x, "label": labels}
    batch_fn = setup.batch_fn or (lambda x, labels: {"x": x, "label": labels})
    data = _Batches(D.Loader(arrays, tr["batch_size"], tr["seed"]), batch_fn)

    ema_decay, ship_ema = ema
    tx0, _ = optim.build(steps)  # the state's structure does not depend on the schedule
    shapes = jax.eval_shape(
        lambda p, f: T.init_train_state(p, tx0, tr["seed"], ema=ema_decay is not None, frozen=f),
        setup.params,
        setup.frozen,
    )
    sharding = T.replicated_sharding(mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    restored = R.restorable_step(ckpt_dir, target)
    start = restored or 0
    if restored is not None and (restored >= steps or (stop_at is not None and stop_at <= restored)):
        why = f"stop_at {stop_at}" if restored < steps else f"steps={steps} (raise it to continue)"
        student = _student_from_checkpoint(
            recipe, teacher, setup, cfg, layout, ship_ema, out, ckpt_dir, target, restored
        )
        return DistillOutcome(out, restored, steps, finished=restored >= steps, nothing_to_do=why, student=student)

    history = record.read_history(out)
    argv = list(argv if argv is not None else sys.argv)
    what = f"distilled from step {start} to {steps}" if restored is None else f"resumed at step {start}"
    entry = record.history_entry("started", argv=argv, start_step=start, total_steps=steps, stop_at=stop_at, what=what)
    base_total, extensions = record.schedule_plan(history + [entry])
    tx, sched = _optimizer(optim, base_total or steps, extensions)
    for folder, name in ((out, "student folder"), (ckpt_dir, "checkpoint folder")):
        if os.path.isdir(folder):
            check_writable(folder, name)
    record.write_json_atomic(os.path.join(out, DISTILL_FILE), cfg)
    record.append_history(out, entry)
    wall_offset = record.trim_metrics(os.path.join(out, R.METRICS_FILE), start)
    say(
        f"jdiff distill: {cfg['method']} from {teacher.source}, {M.count_params(setup.params):,} trained "
        f"parameters, student steps {setup.steps}, data {tuple(x.shape)} -> {out}"
    )
    metrics_log = T.MetricsLog(
        os.path.join(out, R.METRICS_FILE),
        tr["log_every"],
        steps,
        tr["batch_size"],
        t_start=t_start,
        wall_offset=wall_offset,
    )
    signals = T.StopSignals()
    cbs = [
        _StartCheck(start, ckpt_dir),
        metrics_log,
        T.Progress(steps, desc=cfg["method"], log=metrics_log, disable=not progress),
        T.StopAt(stop_at),
        signals,
        *callbacks,
    ]
    with signals:
        result = T.train(
            _with_loss(setup.loss_fn),
            setup.params,
            data,
            steps,
            optimizer=tx,
            callbacks=cbs,
            seed=tr["seed"],
            mesh=mesh,
            checkpoint_dir=ckpt_dir,
            save_every=tr["save_every"],
            keep=tr["keep"],
            ema_decay=ema_decay,
            schedule=sched,
            stop_flag=signals.flag,
            frozen=setup.frozen,
        )
    _plot_loss(out, cfg["method"])
    loss = (metrics_log.last_row or {}).get("loss", float("nan"))
    wall = wall_offset + (time.perf_counter() - t_start)
    finished = result.step >= steps and not result.stopped
    why = None
    if not finished:
        why = "SIGTERM" if result.preempted else "interrupted (SIGINT)" if signals.interrupted else None
        why = why or (f"stop_at {stop_at}" if stop_at is not None and result.step >= stop_at else "stop requested")
    student = None
    if finished:
        student = _write_student(recipe, teacher, setup, cfg, layout, ship_ema, out, result.state, result.step, wall)
    event = "finished" if finished else "stopped"
    done = f"trained {start}->{result.step}" + ("" if finished else f" ({why})")
    record.append_history(
        out,
        record.history_entry(event, argv=argv, start_step=start, end_step=result.step, total_steps=steps, what=done),
    )
    return DistillOutcome(out, result.step, steps, finished, why, None, loss, wall, student)


def _with_loss(loss_fn):
    """``loss_fn`` whose metrics always hold ``loss`` (the metrics log and the loss curve
    read it); its attributes (``reads_ema``, ...) are kept."""

    @functools.wraps(loss_fn)
    def wrapped(params, batch, keys, **kw):
        loss, metrics = loss_fn(params, batch, keys, **kw)
        return loss, {"loss": loss, **dict(metrics or {})}

    return wrapped


def _plot_loss(out: str, method: str) -> None:
    rows = [r for r in plotting.read_metrics(os.path.join(out, R.METRICS_FILE)) if "loss" in r]
    if rows:
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        plotting.plot_loss(steps, losses, os.path.join(out, R.LOSS_PLOT), f"distillation loss: {method}")


def _student_from_checkpoint(recipe, teacher, setup, cfg, layout, ship_ema, out, ckpt_dir, target, step):
    """The student of a finished distillation whose folder lacks it (stopped between its
    last checkpoint and writing it): restored and written now. ``None`` if not finished."""
    if step < cfg["train"]["steps"]:
        return None
    path = os.path.join(out, STUDENT_FILE)
    if os.path.exists(path) and R.read_json(path, "student record").get("training", {}).get("step") == step:
        return out
    with T.Checkpointer(ckpt_dir, read_only=True) as ck:
        restored = ck.restore(target, step=step)
    wall = next(
        (r.get("wall_time", 0.0) for r in reversed(plotting.read_metrics(os.path.join(out, R.METRICS_FILE)))), 0.0
    )
    return _write_student(recipe, teacher, setup, cfg, layout, ship_ema, out, restored.state, step, wall)
