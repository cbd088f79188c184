"""The run directory, in one place: its files, reading its configuration and
checkpoints, and which settings may change when a run is resumed.

A run directory holds ``config.json`` (the resolved :class:`~jdiff.runs.RunConfig`),
``run.json`` (derived facts: data shape, classes, parameter count, devices),
``history.jsonl`` (one line per event of each ``jdiff train`` invocation that trains,
only ever appended to), ``metrics.jsonl`` (one JSON object per logged step),
``loss.png``, ``samples/``, ``checkpoints/`` (orbax, see
:class:`jdiff.train.Checkpointer`) and ``.lock`` (held by the process writing the run,
see :func:`jdiff.runs.lock_run`). The record itself (config, history, metrics files)
is :mod:`jdiff.train._run`'s; this module reads a run back as a :class:`Run` and
raises :class:`RunError` saying what is missing.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from jax.sharding import SingleDeviceSharding

from jdiff import train as T
from jdiff.runs._build import Run, build_run
from jdiff.runs._config import DERIVED_KEYS, RunConfig, config_from_dict, config_to_dict
from jdiff.runs._errors import ConfigError, RunError
from jdiff.train import _run as record

__all__ = [
    "CONFIG_FILE",
    "RUN_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "LOSS_PLOT",
    "CKPT_DIR",
    "SAMPLES_DIR",
    "RESUMABLE_KEYS",
    "read_json",
    "read_config_dict",
    "config_of",
    "load_config_file",
    "checkpoint_steps",
    "check_resumable",
    "append_metrics",
    "load_run",
    "train_state_target",
    "load_run_state",
    "restorable_step",
]

CONFIG_FILE = record.CONFIG_FILE
RUN_FILE = "run.json"
HISTORY_FILE = record.HISTORY_FILE
METRICS_FILE = record.METRICS_FILE
LOSS_PLOT = "loss.png"
CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"

# Keys that may differ between a run's saved configuration and the one requested on
# resume: the library's (step count, logging / checkpoint / grid intervals, checkpoints
# kept, sample.*) and the fields filled from the data, which follow from data.*.
RESUMABLE_KEYS = tuple(record.RESUMABLE_KEYS) + tuple(sorted(DERIVED_KEYS))


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {what} {path}: {e}") from e


def read_config_dict(run_dir: str, *, replacement: dict | None = None) -> tuple[dict, bool]:
    """``(configuration dict, replaced)`` of a run: its ``config.json``, or, when that
    is missing or unreadable and the user gave the full configuration again
    (``replacement``), that one (``replaced=True``). Raises :class:`RunError` saying
    what is wrong otherwise."""
    if not os.path.isdir(run_dir):
        raise RunError(f"run directory not found: {run_dir}")
    try:
        return record.read_config(run_dir), False
    except record.RunRecordError as e:
        if replacement is not None:
            return dict(replacement), True
        raise RunError(str(e)) from None


def config_of(d: dict, where: str) -> RunConfig:
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config_file(run_dir: str) -> RunConfig:
    d, _ = read_config_dict(run_dir)
    return config_of(d, os.path.join(run_dir, CONFIG_FILE))


def checkpoint_steps(run_dir: str) -> list[int]:
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def check_resumable(saved: dict, cfg: RunConfig, out: str) -> dict:
    """Raise unless ``cfg`` differs from the run's ``saved`` configuration only in keys
    that may change on resume (one line per forbidden difference); return the allowed
    changes ``{key: (saved, requested)}`` (data-derived keys left out)."""
    try:
        changes = record.check_resume_config(saved, config_to_dict(cfg), allowed=RESUMABLE_KEYS)
    except record.ResumeConfigError as e:
        lines = "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in e.forbidden.items())
        raise RunError(
            f"{out} holds a run with a different configuration; resuming cannot change "
            f"{len(e.forbidden)} of its settings (use another --out, or resume with the run's own settings: "
            f"jdiff train --out {out} --resume):{lines}",
            multiline=True,
        ) from None
    return {k: v for k, v in changes.items() if k not in DERIVED_KEYS}


def append_metrics(out: str, row: dict) -> None:
    with open(os.path.join(out, METRICS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def load_run(run_dir: str) -> tuple[RunConfig, dict, Run]:
    """``(config, run.json dict, Run)`` of a run directory, without loading its data
    when ``run.json`` records the data shape. ``Run.params`` are abstract (shapes
    only): restore values with :func:`load_run_state`."""
    cfg = load_config_file(run_dir)
    info_path = os.path.join(run_dir, RUN_FILE)
    info = read_json(info_path, "run info") if os.path.exists(info_path) else {}
    if "data_shape" in info and "num_classes" in info:
        run = build_run(
            cfg, with_data=False, data_shape=info["data_shape"], num_classes=info["num_classes"], abstract=True
        )
    else:
        run = build_run(cfg, abstract=True)
    return run.cfg, info, run


def train_state_target(run: Run):
    """The shapes, dtypes and (first local device) placement of the run's TrainState."""
    tx, _ = run.cfg.optim.build(run.cfg.train.steps)
    shapes = jax.eval_shape(
        lambda p: T.init_train_state(p, tx, run.cfg.train.seed, ema=run.cfg.ema.decay is not None), run.params
    )
    dev = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def report_line(line: str) -> None:
    """Print a checkpoint report (a corrupt step skipped) as one line on stderr."""
    print(line, file=sys.stderr, flush=True)


def load_run_state(run_dir: str, step: int | None = None, *, report=report_line):
    """``(config, run.json dict, Run, TrainState, step)`` from a run's newest usable (or
    the given) checkpoint, opened read-only: nothing in the run changes, corrupt steps
    are skipped and reported in one line each (``report``). Raises :class:`RunError` if
    there is no checkpoint, :class:`jdiff.train.NoUsableCheckpointError` if none is
    usable and :class:`jdiff.train.CheckpointMismatchError` if it belongs to another
    model."""
    cfg, info, run = load_run(run_dir)
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunError(f"no checkpoint found in {ckpt_dir}")
    if step is not None and step not in steps:
        raise RunError(f"no checkpoint of step {step} in {ckpt_dir}; available steps: {steps}")
    target = train_state_target(run)
    with T.Checkpointer(ckpt_dir, read_only=True, report=report) as ck:
        restored = ck.restore(target, step=step)
    if restored is None:
        raise RunError(f"no checkpoint found in {ckpt_dir}")
    return cfg, info, run, restored.state, restored.step


def restorable_step(ckpt_dir: str, target) -> int | None:
    """The step :func:`jdiff.train.train_iter` will restore from ``ckpt_dir`` into
    ``target`` (abstract arrays with their shardings): the newest usable one, found
    read-only (nothing is moved, nothing is reported: the loop's own restore reports
    corrupt steps, once). ``None`` if there is no checkpoint at all. Raises
    :class:`jdiff.train.NoUsableCheckpointError` (each step with the reason it was
    rejected) if steps exist but none is usable, and
    :class:`jdiff.train.CheckpointMismatchError` for another model."""
    with T.Checkpointer(ckpt_dir, read_only=True, report=lambda line: None) as ck:
        restored = ck.restore(target)
    return None if restored is None else int(restored.step)
