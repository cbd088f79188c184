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
import hashlib
import inspect
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import data as D
from jdiff import models as M
from jdiff import plotting
from jdiff import train as T
from jdiff.distill._teacher import DistillError, Recipe, Teacher, load_teacher
from jdiff.runs import _dir as R
from jdiff.runs._build import denoiser_apply, to_host
from jdiff.runs._config import config_from_dict, config_to_dict
from jdiff.runs._lock import check_writable, lock_run
from jdiff.runs._pretrained import PRETRAINED, _abstract_run, flatten_params, unflatten_params
from jdiff.runs._train import _optimizer, _StartCheck
from jdiff.train import _run as record
from jdiff.train._config import OptimizerConfig

__all__ = [
    "DistillOutcome",
    "Student",
    "distill_run",
    "load_student",
    "sample_student",
    "parse_options",
    "recipe_options",
    "STUDENT_FILE",
    "DISTILL_FILE",
]

STUDENT_FILE = "student.json"
DISTILL_FILE = "distill.json"
PARAMS_FILE = "params.npz"
TRAINED_FILE = "TRAINED.md"
FORMAT = 1
# settings of distill.json that may change when a distillation is continued
RESUMABLE = ("train.steps", "train.log_every", "train.save_every", "train.keep", "teacher.source")


def _methods() -> dict[str, Recipe]:
    from jdiff.distill import METHODS  # the registry is filled by the package's __init__

    return METHODS


def _recipe(method: str) -> Recipe:
    methods = _methods()
    if method not in methods:
        raise DistillError(f"unknown method {method!r}; methods: {', '.join(sorted(methods)) or '(none registered)'}")
    return methods[method]


# ------------------------------------------------------------------------ options
def recipe_options(recipe: Recipe) -> dict[str, Any]:
    """``{name: default}`` of the keyword options a recipe's ``build`` declares (empty
    when it takes only ``**options``)."""
    sig = inspect.signature(recipe.build)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "teacher" and p.default is not p.empty
    }


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
    by the type of the option's default in ``build`` (a comma list for a tuple option),
    or as a JSON literal (else a string) for an option without one. An option the
    recipe does not declare (when it declares its options) is refused, naming them.

    Raises:
      DistillError: unknown method or option, malformed text, a value of the wrong type.
    """
    recipe = _recipe(method)
    known = recipe_options(recipe)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(recipe.build).parameters.values())
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


# ------------------------------------------------------------------------ records
def _json_safe(obj):
    """``obj`` as plain JSON values (tuples as lists, numpy scalars as numbers,
    anything else as its ``repr``)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.generic, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _teacher_record(teacher: Teacher) -> dict:
    if teacher.run is None:
        raise DistillError(
            f"teacher {teacher.source or '(built in code)'}: a student needs the teacher's configuration "
            "(load it with load_teacher from a shipped model, a model folder or a run)"
        )
    cfg = config_to_dict(teacher.run.cfg)
    digest = hashlib.sha256()
    for k, a in sorted(flatten_params(to_host(teacher.params)).items()):
        digest.update(k.encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return {
        "source": str(teacher.source),
        "config": cfg,
        "data_shape": list(teacher.shape),
        "num_classes": int(teacher.num_classes),
        "process": cfg["objective"]["process"],
        "prediction": teacher.prediction,
        "time_input": teacher.time_input,
        "params_sha256": digest.hexdigest(),
    }


def _layout(tree, teacher_struct):
    """A JSON description of a parameter pytree from which :func:`_target` rebuilds its
    structure: subtrees of the teacher's structure (``"teacher"``), dicts, lists,
    tuples, ``None`` and arrays. ``None`` if a part cannot be described."""
    if jax.tree.structure(tree) == teacher_struct and not isinstance(tree, (list, tuple, type(None))):
        return "teacher"
    if type(tree) is dict and all(isinstance(k, str) for k in tree):
        parts = {k: _layout(v, teacher_struct) for k, v in tree.items()}
        return None if any(v is None for v in parts.values()) else {"dict": parts}
    if type(tree) in (list, tuple):
        parts = [_layout(v, teacher_struct) for v in tree]
        return None if any(v is None for v in parts) else {type(tree).__name__: parts}
    if tree is None:
        return {"none": True}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"array": [list(tree.shape), str(np.dtype(tree.dtype))]}
    return None


def _target(layout, teacher_params):
    if layout == "teacher":
        return teacher_params
    ((kind, v),) = layout.items()
    if kind == "dict":
        return {k: _target(s, teacher_params) for k, s in v.items()}
    if kind in ("list", "tuple"):
        parts = [_target(s, teacher_params) for s in v]
        return parts if kind == "list" else tuple(parts)
    if kind == "none":
        return None
    return jax.ShapeDtypeStruct(tuple(v[0]), np.dtype(v[1]))


def _abstract_teacher(rec: dict, where: str) -> Teacher:
    """The teacher of a record (``student.json``'s ``teacher``), its parameters as
    shapes only."""
    try:
        cfg = config_from_dict(rec["config"])
        shape, ncls = tuple(int(s) for s in rec["data_shape"]), int(rec["num_classes"])
        run = _abstract_run(json.dumps(config_to_dict(cfg), sort_keys=True), shape, ncls)
    except (KeyError, TypeError, ValueError) as e:
        raise DistillError(f"{where}: cannot rebuild the teacher's network: {e}") from e
    process = config_to_dict(run.cfg)["objective"]["process"]
    if rec.get("process") != process:
        raise DistillError(
            f"{where}: the student records a teacher process {rec.get('process')} but the teacher's "
            f"configuration gives {process}: the folder is inconsistent"
        )
    apply, prediction, time_input = denoiser_apply(run)
    return Teacher(apply, run.params, run.process, prediction, time_input, shape, ncls, run, rec.get("source", ""))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on {dev.platform} ({dev.device_kind})"


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


def _command(cfg: dict) -> str:
    t = cfg["train"]
    parts = ["jdiff", "distill", "--method", cfg["method"], "--teacher", cfg["teacher"]["source"]]
    parts += ["--out", cfg["out"], "--steps", str(t["steps"]), "--batch-size", str(t["batch_size"])]
    parts += ["--lr", f"{t['lr']:g}", "--seed", str(t["seed"])]
    if t["warmup_steps"]:
        parts += ["--warmup-steps", str(t["warmup_steps"])]
    if t["schedule"] != "constant":
        parts += ["--schedule", t["schedule"], "--final-lr", f"{t['final_lr']:g}"]
    if t["ema_decay"] is not None:
        parts += ["--ema-decay", f"{t['ema_decay']:g}"]
    for k, v in cfg["options"].items():
        v = ",".join(map(str, v)) if isinstance(v, list) else v
        parts += ["--set", f"{k}={v}"]
    return " ".join(shlex.quote(str(p)) for p in parts)


def distill_run(
    method: str,
    teacher,
    out,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-4,
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
      options: the recipe's options (``Recipe.build(teacher, **options)``).
      ema_decay: keep an exponential moving average of the student's parameters and ship
        it (``None``: ship the trained parameters).
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
            setup = recipe.build(teacher, **options)
        except TypeError as e:
            raise DistillError(f"method {method}: {e}") from None
        layout = _layout(setup.params, jax.tree.structure(teacher.params))
        if layout is None:
            _build_target(recipe, teacher, options)  # raises if the student could not be read back
        return _train(recipe, teacher, setup, cfg, layout, optim, out, stop_at, progress, argv, say, callbacks, t_start)


def _build_target(recipe, teacher: Teacher, options: dict):
    """The student's parameter shapes from ``recipe.build`` on the teacher's shapes (for
    a student whose parameters are not made of the teacher's structure)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), teacher.params)
    try:
        return jax.eval_shape(
            lambda p: recipe.build(dataclasses.replace(teacher, params=p), **options).params, abstract
        )
    except Exception as e:  # any failure of tracing: the student could not be read back
        raise DistillError(
            f"method {recipe.name}: the student's parameters are neither made of the teacher's network's nor "
            f"traceable from build() ({type(e).__name__}: {e}); a student folder could not be read back"
        ) from e


def _train(recipe, teacher, setup, cfg, layout, optim, out, stop_at, progress, argv, say, callbacks, t_start):
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

    ema = tr["ema_decay"] is not None
    tx0, _ = optim.build(steps)  # the state's structure does not depend on the schedule
    shapes = jax.eval_shape(
        lambda p, f: T.init_train_state(p, tx0, tr["seed"], ema=ema, frozen=f), setup.params, setup.frozen
    )
    sharding = T.replicated_sharding(mesh)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    restored = R.restorable_step(ckpt_dir, target)
    start = restored or 0
    if restored is not None and (restored >= steps or (stop_at is not None and stop_at <= restored)):
        why = f"stop_at {stop_at}" if restored < steps else f"steps={steps} (raise it to continue)"
        student = _student_from_checkpoint(recipe, teacher, setup, cfg, layout, out, ckpt_dir, target, restored)
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
            setup.loss_fn,
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
            ema_decay=tr["ema_decay"],
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
        student = _write_student(recipe, teacher, setup, cfg, layout, out, result.state, result.step, wall)
    event = "finished" if finished else "stopped"
    done = f"trained {start}->{result.step}" + ("" if finished else f" ({why})")
    record.append_history(
        out,
        record.history_entry(event, argv=argv, start_step=start, end_step=result.step, total_steps=steps, what=done),
    )
    return DistillOutcome(out, result.step, steps, finished, why, None, loss, wall, student)


def _plot_loss(out: str, method: str) -> None:
    rows = [r for r in plotting.read_metrics(os.path.join(out, R.METRICS_FILE)) if "loss" in r]
    if rows:
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        plotting.plot_loss(steps, losses, os.path.join(out, R.LOSS_PLOT), f"distillation loss: {method}")


def _student_from_checkpoint(recipe, teacher, setup, cfg, layout, out, ckpt_dir, target, step) -> str | None:
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
    return _write_student(recipe, teacher, setup, cfg, layout, out, restored.state, step, wall)


def _write_student(recipe, teacher, setup, cfg, layout, out, state, step, wall) -> str:
    """Write ``params.npz``, ``student.json`` (last: it marks the student complete) and
    ``TRAINED.md``; returns ``out``."""
    ema = cfg["train"]["ema_decay"] is not None
    params = to_host(state.ema_params if ema else state.params)
    arrays = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    if not all(np.all(np.isfinite(a)) for a in arrays.values() if np.issubdtype(a.dtype, np.floating)):
        raise DistillError(f"the student's parameters hold non-finite values at step {step}: not written")
    tmp = os.path.join(out, f".{PARAMS_FILE}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(out, PARAMS_FILE))
    n = sum(int(a.size) for a in arrays.values())
    info = {
        "format": FORMAT,
        "method": cfg["method"],
        "paper": recipe.paper,
        "options": cfg["options"],
        "steps": int(setup.steps),
        "notes": _json_safe(setup.notes),
        "params": {"file": PARAMS_FILE, "kind": "ema" if ema else "trained", "count": n, "layout": layout or "build"},
        "teacher": {k: v for k, v in cfg["teacher"].items()},
        "process": cfg["teacher"]["process"],
        "training": dict(cfg["train"], step=int(step), wall_time=round(float(wall), 1)),
        "command": _command(cfg),
        "machine": _machine(),
        "jax_version": jax.__version__,
        "jdiff_version": jdiff.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    invocations = [" ".join(shlex.quote(a) for a in e["argv"]) for e in record.read_history(out) if e.get("argv")]
    invocations = list(dict.fromkeys(invocations))
    lines = [
        f"# {cfg['method']}: a {setup.steps}-step student of {cfg['teacher']['source']}",
        "",
        f"Method: {cfg['method']} ({recipe.paper or 'see docs/distill.md'}); options {json.dumps(cfg['options'])}.",
        f"Parameters: {'EMA' if ema else 'trained'} weights of step {step}, {n:,} values ({PARAMS_FILE}, float32).",
        "",
        "Trained with:",
        "",
        f"    {info['command']}",
        "",
        f"Machine: {info['machine']}. Wall time: {wall:.1f} s for {step:,} steps "
        f"(batch {cfg['train']['batch_size']}); {info['created']}, jdiff {jdiff.__version__}.",
        "",
    ]
    if invocations:
        lines += ["Invocations (history.jsonl):", "", *[f"    {c}" for c in invocations], ""]
    lines += [
        "Loss history: metrics.jsonl (one line per logged step), history.jsonl, loss.png. checkpoints/ only",
        "serves to continue training: a shipped copy of the student leaves it out.",
        f"Sample with `jdiff sample --student {out}` or `jdiff.distill.load_student` + `sample_student`.",
        "",
    ]
    with open(os.path.join(out, TRAINED_FILE), "w") as f:
        f.write("\n".join(lines))
    record.write_json_atomic(os.path.join(out, STUDENT_FILE), info)
    return out


# ------------------------------------------------------------------------ students
@dataclasses.dataclass(frozen=True)
class Student:
    """A trained student read from its folder (:func:`load_student`).

    Attributes:
      folder: where it was read from; method, recipe: its method and
        :class:`Recipe`; options: the options it was built with.
      teacher: its teacher's network (the :class:`Teacher` given to :func:`load_student`,
        else rebuilt from the record with parameter shapes only: the teacher's
        parameters are not part of a student folder).
      params: the student's parameters; steps: the step count it was trained for.
      info: ``student.json``.
    """

    folder: str
    method: str
    recipe: Recipe
    options: dict
    teacher: Teacher
    params: Any
    steps: int
    info: dict


def load_student(folder, *, teacher=None) -> Student:
    """The student in ``folder`` (written by :func:`distill_run`).

    Args:
      folder: a student folder (``student.json`` and ``params.npz``).
      teacher: optionally the teacher to sample with (a :class:`Teacher` or what
        :func:`load_teacher` reads): it must have the student's process and network.

    Raises:
      DistillError: not a student folder, a method this jdiff lacks, files that do not
        fit the recorded network, a teacher of another process or network.
    """
    folder = os.fspath(folder)
    where = f"student {folder!r}"
    path = os.path.join(folder, STUDENT_FILE)
    if not os.path.isfile(path):
        what = "a distillation not finished yet" if os.path.exists(os.path.join(folder, DISTILL_FILE)) else "no student"
        raise DistillError(f"{where}: {what} (no {STUDENT_FILE}); train one with jdiff distill")
    try:
        info = R.read_json(path, "student record")
        method = info["method"]
        rec = info["teacher"]
        if info["process"] != rec["process"]:
            raise DistillError(f"{where}: student.json records two processes, {info['process']} and {rec['process']}")
    except (ValueError, KeyError, TypeError) as e:
        raise DistillError(f"{where}: cannot read {STUDENT_FILE}: {e}") from e
    recipe = _recipe(method)
    abstract = _abstract_teacher(rec, where)
    if teacher is not None:
        if not isinstance(teacher, Teacher):
            teacher = load_teacher(teacher)
        if teacher.run is None:
            raise DistillError(f"{where}: the teacher given has no configuration to compare with the student's")
        given = config_to_dict(teacher.run.cfg)
        if given["objective"]["process"] != rec["process"]:
            raise DistillError(
                f"{where} was distilled from a teacher of process {rec['process']['name']}; the teacher given "
                f"({teacher.source}) has process {given['objective']['process']['name']}"
            )
        if given["model"] != config_to_dict(abstract.run.cfg)["model"] or tuple(teacher.shape) != abstract.shape:
            raise DistillError(f"{where}: the teacher given ({teacher.source}) has another network than the student's")
    else:
        teacher = abstract
    layout = info.get("params", {}).get("layout", "build")
    if layout == "build":
        target = _build_target(recipe, teacher, dict(info.get("options", {})))
    else:
        target = _target(layout, abstract.params)
    try:
        with np.load(os.path.join(folder, PARAMS_FILE), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        params = unflatten_params(arrays, target, where=where)
    except (OSError, ValueError) as e:
        raise DistillError(f"{where}: {PARAMS_FILE}: {e}") from e
    params = jax.tree.map(jnp.asarray, params)
    return Student(folder, method, recipe, dict(info.get("options", {})), teacher, params, int(info["steps"]), info)


def sample_student(student: Student, n: int, key, *, steps: int | None = None, cond=None, **kw):
    """``n`` samples of ``student`` with ``steps`` network calls (default: the steps it
    was trained for), through its method's sampler.

    Args:
      student: a :class:`Student`; n: the number of samples; key: a PRNG key (the
        starting noise, then any noise the sampler draws).
      steps: the student's step count (a recipe refuses more than it was trained for).
      cond: int labels of shape ``(n,)`` for a class-conditional teacher.
      **kw: passed to the recipe's ``sample``.

    Returns:
      samples of shape ``(n,) + teacher.shape``.

    Raises:
      DistillError: too many steps (the recipe's message), labels for an unconditional
        student, labels of the wrong shape or range.
    """
    steps = student.steps if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise DistillError(f"steps must be an integer >= 1, got {steps!r}")
    t = student.teacher
    if cond is not None:
        if not t.num_classes:
            raise DistillError(f"student {student.folder!r} is unconditional: no labels apply")
        cond = jnp.asarray(cond, jnp.int32)
        if cond.shape != (n,):
            raise DistillError(f"labels must have shape ({n},), got {tuple(cond.shape)}")
    k_noise, k_rest = jax.random.split(key)
    noise = jax.random.normal(k_noise, (n, *t.shape), jnp.float32)
    return student.recipe.sample(
        t, student.params, noise, steps=int(steps), trained_steps=student.steps, cond=cond, key=k_rest, **kw
    )
