"""The run directory, in one place: its files, reading its configuration and
checkpoints, and which settings may change when a run is resumed.

A run directory holds ``config.json`` (the resolved :class:`~jdiff.cli.RunConfig`),
``run.json`` (derived facts: data shape, classes, parameter count, devices),
``metrics.jsonl`` (one JSON object per logged step), ``loss.png``, ``samples/`` and
``checkpoints/`` (orbax, see :class:`jdiff.train.Checkpointer`).
"""

from __future__ import annotations

import json
import os

from jdiff.cli._common import CLIError, Run, build_run
from jdiff.cli._config import ConfigError, RunConfig, config_diff, config_from_dict, config_to_dict
from jdiff.plotting import read_metrics

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"

# Keys that may change when a run is resumed (besides sample.*): they do not alter what
# the next step computes, except that a new train.steps stretches the cosine schedule.
RESUMABLE_KEYS = (
    "name",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.grid_every",
    "train.async_checkpointing",
)


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read {what} {path}: {e}") from e


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def load_config_file(run_dir: str) -> RunConfig:
    if not os.path.isdir(run_dir):
        raise CLIError(f"run directory not found: {run_dir}")
    d = read_json(os.path.join(run_dir, CONFIG_FILE), f"run config (is {run_dir} a jdiff run directory?)")
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise CLIError(f"{os.path.join(run_dir, CONFIG_FILE)}: {e}") from e


def checkpoint_steps(run_dir: str) -> list[int]:
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def check_resumable(saved: RunConfig, cfg: RunConfig, out: str) -> None:
    """Raise unless ``cfg`` differs from the checkpoints' ``saved`` configuration only in
    keys that may change on resume."""
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in RESUMABLE_KEYS and not k.startswith("sample.")}
    if diff:
        lines = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise CLIError(
            f"{out} has checkpoints of a run with a different configuration ({lines}); "
            "use another --out, or the run's settings (jdiff train --out DIR --resume)"
        )


def write_run_record(out: str, cfg: RunConfig, info: dict) -> None:
    """``config.json`` and ``run.json`` of a (re)started run."""
    os.makedirs(os.path.join(out, SAMPLES_DIR), exist_ok=True)
    write_json(os.path.join(out, CONFIG_FILE), config_to_dict(cfg))
    write_json(os.path.join(out, RUN_FILE), info)


def append_metrics(out: str, row: dict) -> None:
    with open(os.path.join(out, METRICS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(out: str, step: int) -> float:
    """Drop logged lines past ``step`` (a resumed run redoes those steps); return the
    wall time of the last line kept (the run's time before this invocation)."""
    path = os.path.join(out, METRICS_FILE)
    rows = read_metrics(path)
    if not rows:
        return 0.0
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(keep) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return float(keep[-1].get("wall_time", 0.0)) if keep else 0.0


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
    import jax
    from jax.sharding import SingleDeviceSharding

    from jdiff import train as T

    tx, _ = run.cfg.optim.build(run.cfg.train.steps)
    shapes = jax.eval_shape(
        lambda p: T.init_train_state(p, tx, run.cfg.train.seed, ema=run.cfg.ema.decay is not None), run.params
    )
    dev = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def load_run_state(run_dir: str, step: int | None = None):
    """``(config, run.json dict, Run, TrainState, step)`` from a run's newest (or the
    given) checkpoint. Raises :class:`CLIError` if there is none and
    :class:`jdiff.train.CheckpointMismatchError` if it belongs to another model."""
    from jdiff import train as T

    cfg, info, run = load_run(run_dir)
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise CLIError(f"no checkpoint found in {ckpt_dir}")
    if step is not None and step not in steps:
        raise CLIError(f"no checkpoint of step {step} in {ckpt_dir}; available steps: {steps}")
    target = train_state_target(run)
    with T.Checkpointer(ckpt_dir, async_save=False, keep=None) as ck:
        restored = ck.restore(target, step=step)
    if restored is None:
        raise CLIError(f"no usable checkpoint in {ckpt_dir}")
    return cfg, info, run, restored.state, restored.step
