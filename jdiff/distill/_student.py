"""A student folder: writing it at the end of :func:`jdiff.distill.distill_run`,
reading it back (:func:`load_student`) and drawing from it (:func:`sample_student`).

The folder (see :mod:`jdiff.distill._run`) holds ``params.npz`` (the student's
parameters by path, :func:`jdiff.runs.flatten_params`), ``student.json`` (method,
options, step count, the teacher's source, configuration and process, the parameters'
layout, how it was trained) and ``TRAINED.md``. The network is rebuilt from the
teacher's configuration: the teacher's parameters are not part of a student folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import inspect
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import plotting
from jdiff.distill._teacher import DistillError, Recipe, Teacher, load_teacher
from jdiff.runs import _dir as R
from jdiff.runs._build import denoiser_apply, to_host
from jdiff.runs._config import config_from_dict, config_to_dict
from jdiff.runs._pretrained import _abstract_run, flatten_params, unflatten_params
from jdiff.train import _run as record

__all__ = [
    "Student",
    "load_student",
    "sample_student",
    "export_student",
    "shipped_students",
    "student_dir",
    "STUDENT_FILE",
    "DISTILL_FILE",
]

STUDENT_FILE = "student.json"
DISTILL_FILE = "distill.json"
PARAMS_FILE = "params.npz"
TRAINED_FILE = "TRAINED.md"
FORMAT = 1
SHIPPED_PREFIX = "student_"  # jdiff/assets/student_<name>/: a shipped student
SAMPLES_FILE, SAMPLES_NUM = "samples.png", 100
SHIPPED_FILES = (PARAMS_FILE, STUDENT_FILE, TRAINED_FILE, SAMPLES_FILE, "metrics.jsonl", "history.jsonl", "loss.png")
_SAMPLE_ARGS = ("steps", "trained_steps", "cond", "key")


def _methods() -> dict[str, Recipe]:
    from jdiff.distill import METHODS  # the registry is filled by the package's __init__

    return METHODS


def _recipe(method: str) -> Recipe:
    methods = _methods()
    if method not in methods:
        raise DistillError(f"unknown method {method!r}; methods: {', '.join(sorted(methods)) or '(none registered)'}")
    return methods[method]


# ------------------------------------------------------------------------ records
def _json_safe(obj):
    """``obj`` as plain JSON values: tuples as lists, numpy scalars as numbers, arrays and
    parameter pytrees described by their shapes (never their values), anything else as
    its ``repr``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        if np.ndim(obj) == 0:
            return np.asarray(obj).item()
        return f"<array {list(np.shape(obj))} {np.dtype(obj.dtype)}>"
    if type(obj) is dict:
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return [_json_safe(v) for v in obj]
    leaves = jax.tree.leaves(obj)
    if leaves and all(hasattr(a, "shape") for a in leaves):
        n = sum(int(np.prod(np.shape(a))) for a in leaves)
        return f"<{type(obj).__name__} of {len(leaves)} arrays, {n:,} values>"
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


def _shapes(tree) -> list:
    return [[list(np.shape(a)), str(np.dtype(a.dtype))] for a in jax.tree.leaves(tree)]


def _layout(tree, teacher_params):
    """A JSON description of a parameter pytree from which :func:`_target` rebuilds its
    structure: subtrees that are the teacher's network (``"teacher"``), or of its
    structure with other shapes (``{"teacher_tree": [[shape, dtype], ...]}``: a smaller
    network of the same architecture), dicts, lists, tuples, ``None`` and arrays.
    ``None`` if a part cannot be described."""
    if not isinstance(tree, (list, tuple, type(None))) and jax.tree.structure(tree) == jax.tree.structure(
        teacher_params
    ):
        shapes = _shapes(tree)
        return "teacher" if shapes == _shapes(teacher_params) else {"teacher_tree": shapes}
    if type(tree) is dict and all(isinstance(k, str) for k in tree):
        parts = {k: _layout(v, teacher_params) for k, v in tree.items()}
        return None if any(v is None for v in parts.values()) else {"dict": parts}
    if type(tree) in (list, tuple):
        parts = [_layout(v, teacher_params) for v in tree]
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
    if kind == "teacher_tree":
        leaves = [jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for shape, dtype in v]
        return jax.tree.unflatten(jax.tree.structure(teacher_params), leaves)
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


def resolve_options(options: Mapping) -> dict:
    """``options`` with every string value that names a student folder replaced by that
    student's parameters (chaining students: the next round's teacher, a reflow flow)."""
    out = dict(options)
    for k, v in options.items():
        if isinstance(v, str) and v and os.path.isfile(os.path.join(v, STUDENT_FILE)):
            out[k] = load_student(v).params
    return out


def _build_target(recipe, teacher: Teacher, options: dict):
    """The student's parameter shapes from ``recipe.build`` on the teacher's shapes (for
    a student whose parameters are not made of the teacher's structure)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), teacher.params)
    try:
        options = resolve_options(options)
        return jax.eval_shape(
            lambda p: recipe.build(dataclasses.replace(teacher, params=p), **options).params, abstract
        )
    except Exception as e:  # any failure of tracing: the student could not be read back
        raise DistillError(
            f"method {recipe.name}: the student's parameters are neither made of the teacher's network's nor "
            f"traceable from build() ({type(e).__name__}: {e}); a student folder could not be read back"
        ) from e


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


def _write_student(recipe, teacher, setup, cfg, layout, ema, out, state, step, wall) -> str:
    """Write ``params.npz`` (the EMA parameters if ``ema``), ``student.json`` (last: it
    marks the student complete) and ``TRAINED.md``; returns ``out``."""
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
        f"{SAMPLES_FILE}: {SAMPLES_NUM} samples of the student read back from this folder, {setup.steps} step(s), "
        "seed 0" + (", labels cycling through the classes." if teacher.num_classes else "."),
        "",
    ]
    with open(os.path.join(out, TRAINED_FILE), "w") as f:
        f.write("\n".join(lines))
    record.write_json_atomic(os.path.join(out, STUDENT_FILE), info)
    _sample_grid(out, cfg["method"])
    return out


def _sample_grid(out: str, method: str) -> None:
    """``samples.png``: the student read back from ``out`` (a check that the folder
    loads) and sampled at its steps; a failure is reported, the student stays."""
    try:
        s = load_student(out)
        nc = s.teacher.num_classes
        labels = (np.arange(SAMPLES_NUM) % nc).astype(np.int32) if nc else None
        x = np.asarray(sample_student(s, SAMPLES_NUM, jax.random.key(0), cond=labels))
        title = f"{method} student, {s.steps} step(s)"
        plotting.save_samples(x, os.path.join(out, SAMPLES_FILE), nrow=nc or None, title=title)
    except Exception as e:  # noqa: BLE001 - the student is written; its picture is not essential
        print(f"warning: {SAMPLES_FILE} not written ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


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


def _assets() -> str:
    return os.fspath(importlib.resources.files("jdiff").joinpath("assets"))


def shipped_students() -> dict[str, str]:
    """``{name: folder}`` of the students shipped with jdiff: the folders
    ``jdiff/assets/student_<name>/`` (written by :func:`export_student`)."""
    root = _assets()
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return {
        d[len(SHIPPED_PREFIX) :]: os.path.join(root, d)
        for d in names
        if d.startswith(SHIPPED_PREFIX) and os.path.isfile(os.path.join(root, d, STUDENT_FILE))
    }


def student_dir(spec) -> str:
    """The folder of ``spec``: a folder as it is, or a shipped student's name."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return spec
    return shipped_students().get(spec, spec)


def export_student(folder, out_dir) -> str:
    """Copy the shippable files of a student folder (``params.npz``, ``student.json``,
    ``TRAINED.md``, ``metrics.jsonl``, ``history.jsonl``, ``loss.png``; not its
    checkpoints) to ``out_dir`` (created), e.g. ``jdiff/assets/student_<name>`` to ship
    it with jdiff. Returns ``out_dir``. Raises :class:`DistillError` for a folder
    without a student."""
    folder = os.fspath(folder)
    load_student(folder)  # a readable, complete student
    os.makedirs(out_dir, exist_ok=True)
    for name in SHIPPED_FILES:
        src = os.path.join(folder, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return os.fspath(out_dir)


def load_student(folder, *, teacher=None) -> Student:
    """The student in ``folder`` (written by :func:`distill_run`).

    Args:
      folder: a student folder (``student.json`` and ``params.npz``), or the name of a
        student shipped with jdiff (:func:`shipped_students`).
      teacher: optionally the teacher to sample with (a :class:`Teacher` or what
        :func:`load_teacher` reads): it must have the student's process and network.

    Raises:
      DistillError: not a student folder, a method this jdiff lacks, files that do not
        fit the recorded network, a teacher of another process or network.
    """
    folder = student_dir(folder)
    where = f"student {folder!r}"
    path = os.path.join(folder, STUDENT_FILE)
    if not os.path.isfile(path):
        what = "a distillation not finished yet" if os.path.exists(os.path.join(folder, DISTILL_FILE)) else "no student"
        shipped = ", ".join(shipped_students()) or "none"
        raise DistillError(
            f"{where}: {what} (no {STUDENT_FILE}); train one with jdiff distill (shipped students: {shipped})"
        )
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
      **kw: passed to the recipe's ``sample``; a keyword option of ``sample`` left out
        here that the student was built with (``student.options``, e.g. the grid it was
        distilled on) is passed as built.

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
    params = inspect.signature(student.recipe.sample).parameters
    for name, p in params.items():
        if p.kind == p.KEYWORD_ONLY and name not in kw and name in student.options and name not in _SAMPLE_ARGS:
            kw[name] = student.options[name]
    k_noise, k_rest = jax.random.split(key)
    noise = jax.random.normal(k_noise, (n, *t.shape), jnp.float32)
    return student.recipe.sample(
        t, student.params, noise, steps=int(steps), trained_steps=student.steps, cond=cond, key=k_rest, **kw
    )
