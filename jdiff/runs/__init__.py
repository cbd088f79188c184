"""Runs: a training run's configuration, directory, record and trained model, as a
library (the ``jdiff`` command line is a thin layer over it).

- :mod:`~jdiff.runs._config` (with :mod:`~jdiff.runs._values`): :class:`RunConfig`, the
  library's config dataclasses in one tree; ``key=value`` overrides
  (:func:`apply_overrides`), a JSON round trip, :func:`validate_config`.
- :mod:`~jdiff.runs._presets`: named configurations (:func:`get_preset`).
- :mod:`~jdiff.runs._build`: data, process and model of a configuration
  (:func:`build_run`), its solver, the trained network as a denoiser
  (:func:`run_denoiser`).
- :mod:`~jdiff.runs._dir`: a run directory read back (:func:`load_run`,
  :func:`load_run_state`), checkpoints, which settings may change on resume.
- :mod:`~jdiff.runs._plan`, :mod:`~jdiff.runs._train`: training a run, as ``jdiff
  train`` does (:func:`plan_training`, then :func:`train_run`).
- :mod:`~jdiff.runs._lock`: one writer per run directory (:func:`lock_run`).
- :mod:`~jdiff.runs._pretrained`: trained models shipped with the package
  (:func:`pretrained`, :func:`export_pretrained`).

Errors are :class:`RunError` (a ``ValueError``; :class:`ConfigError` for the
configuration), with messages in the user's terms.
"""

from __future__ import annotations

from jdiff.runs import _dir as rundir
from jdiff.runs._build import (
    Run,
    build_model,
    build_run,
    check_solver_nfe,
    denoiser_apply,
    make_solver,
    run_denoiser,
    to_host,
    writable_path,
)
from jdiff.runs._config import (
    DERIVED_KEYS,
    ModelConfig,
    RunConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    describe_keys,
    fill_from_data,
    flatten_config,
    parse_override,
    set_value,
    unchecked,
    validate_config,
)
from jdiff.runs._dir import load_run, load_run_state, restorable_step
from jdiff.runs._errors import ConfigError, RunError, RunIOError, RunLockedError
from jdiff.runs._lock import LOCK_FILE, RunLock, check_writable, lock_holder, lock_run
from jdiff.runs._plan import TrainRequest, plan_training
from jdiff.runs._presets import PRESETS, get_preset, preset_names, preset_summaries
from jdiff.runs._pretrained import (
    PRETRAINED,
    export_pretrained,
    flatten_params,
    pretrained,
    pretrained_dir,
    unflatten_params,
)
from jdiff.runs._train import TrainOutcome, train_run
from jdiff.runs._values import PROCESSES, make_process

__all__ = [
    "RunError",
    "ConfigError",
    "RunLockedError",
    "RunIOError",
    "check_writable",
    "LOCK_FILE",
    "RunLock",
    "lock_run",
    "lock_holder",
    "RunConfig",
    "ModelConfig",
    "DERIVED_KEYS",
    "PROCESSES",
    "make_process",
    "apply_overrides",
    "parse_override",
    "set_value",
    "config_to_dict",
    "config_from_dict",
    "flatten_config",
    "config_diff",
    "describe_keys",
    "validate_config",
    "fill_from_data",
    "unchecked",
    "PRESETS",
    "preset_names",
    "preset_summaries",
    "get_preset",
    "Run",
    "build_run",
    "build_model",
    "make_solver",
    "check_solver_nfe",
    "denoiser_apply",
    "run_denoiser",
    "to_host",
    "writable_path",
    "rundir",
    "load_run",
    "load_run_state",
    "restorable_step",
    "TrainRequest",
    "plan_training",
    "TrainOutcome",
    "train_run",
    "PRETRAINED",
    "pretrained",
    "pretrained_dir",
    "export_pretrained",
    "flatten_params",
    "unflatten_params",
]
