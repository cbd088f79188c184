"""Building a run from its configuration: data, process and model
(:func:`build_run`), the solver of its sampling settings, and the trained network as a
:class:`jdiff.Denoiser` (:func:`run_denoiser`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

import jdiff
from jdiff import models as M
from jdiff import train as T
from jdiff.runs._config import RunConfig, validate_config
from jdiff.runs._errors import RunError

__all__ = [
    "Run",
    "build_run",
    "build_model",
    "make_solver",
    "check_solver_nfe",
    "denoiser_apply",
    "run_denoiser",
    "to_host",
    "writable_path",
]


@dataclasses.dataclass
class Run:
    """Everything built from a configuration (see :func:`build_run`).

    Attributes:
      cfg: the configuration, its data-derived fields filled; process: its
        ``objective.process``; model: the NNX model; apply, params: the model as a
        pure function and its parameters (:func:`jdiff.models.functional`);
      data_shape: one example's shape; num_classes: 0 if unconditional;
      x, labels: the training data (``None`` unless built ``with_data``).
    """

    cfg: RunConfig
    process: Any
    model: Any
    apply: Any
    params: Any
    data_shape: tuple
    num_classes: int
    x: Any = None
    labels: Any = None


def build_model(cfg: RunConfig, *, abstract: bool = False):
    """The NNX model of ``cfg.model`` (its data-derived fields filled), or with
    ``abstract`` its shapes and dtypes only. Raises :class:`RunError` if the network
    rejects its settings."""
    m = cfg.model
    cls = {"unet": M.UNet, "mlp": M.MLPResNet, "dit": M.DiT}[m.kind]
    try:
        if abstract:
            return nnx.eval_shape(lambda: cls(m.network, rngs=nnx.Rngs(m.init_seed)))
        return cls(m.network, rngs=nnx.Rngs(m.init_seed))
    except (ValueError, TypeError) as e:
        raise RunError(f"model.kind={m.kind}: {e}") from e


def build_run(
    cfg: RunConfig, *, with_data: bool = True, data_shape=None, num_classes: int | None = None, abstract: bool = False
) -> Run:
    """Data (optional), process and model of ``cfg``.

    Arguments:
      cfg: the run's configuration.
      with_data: load the data (``cfg.data``); otherwise give ``data_shape`` and
        ``num_classes``.
      abstract: parameter shapes only (e.g. as the target of a checkpoint restore).

    Returns:
      a :class:`Run`. Raises :class:`RunError` (data that cannot be read, an
      inconsistent configuration: :class:`ConfigError`).
    """
    x = labels = None
    if with_data:
        try:
            x, labels, num_classes = cfg.data.load()
        except (ValueError, OSError) as e:
            raise RunError(f"data.source={cfg.data.source}: {e}") from e
        data_shape = tuple(x.shape[1:])
    elif data_shape is None or num_classes is None:
        raise ValueError("give with_data=True, or data_shape and num_classes")
    cfg = validate_config(cfg, num_classes=int(num_classes))
    model = build_model(cfg, abstract=abstract)
    apply, params = M.functional(model)
    shape = tuple(int(s) for s in data_shape)
    return Run(cfg, cfg.objective.process, model, apply, params, shape, int(num_classes), x, labels)


def make_solver(cfg_sample):
    """The solver of a :class:`jdiff.SamplingConfig`; :class:`RunError` naming the
    setting if it cannot be built."""
    try:
        return cfg_sample.make_solver()
    except ValueError as e:
        raise RunError(f"sample.solver={cfg_sample.solver}: {e}") from e


def denoiser_apply(run: Run):
    """``(apply_fn, prediction, time_input)`` of the trained network as a denoiser (build
    once per command: the function is part of the compiled program's identity)."""
    o = run.cfg.objective
    if o.precondition == "edm":
        return T.edm_precondition(run.apply, run.process, o.sigma_data), "x0", "t"
    return run.apply, o.prediction, o.time_input


def run_denoiser(parts, run: Run, params, guidance: float = 1.0):
    """The run's network with ``params`` as a :class:`jdiff.Denoiser`.

    Arguments:
      parts: :func:`denoiser_apply` of ``run`` (built once, reused for every
        parameter set so that compiled programs are shared).
      run: the :class:`Run`; params: its parameters (e.g. EMA ones from a checkpoint).
      guidance: classifier-free guidance scale (Ho & Salimans, 2022), applied with
        :func:`jdiff.wrappers.guidance` when the run is class-conditional and the
        scale is not 1.
    """
    apply_fn, prediction, time_input = parts
    den = jdiff.Denoiser(
        apply_fn=apply_fn, params=params, process=run.process, prediction=prediction, time_input=time_input
    )
    if run.num_classes and guidance != 1.0:
        den = jdiff.wrappers.guidance(den, guidance, run.num_classes)
    return den


def check_solver_nfe(run: Run, solver, nfe: int, grid_kind: str) -> None:
    """Raise :class:`RunError` early (and clearly) on a solver / NFE combination that
    cannot work for the run's process."""
    try:
        jdiff.time_grid(run.process, nfe=nfe, solver=solver, kind=grid_kind)
        n = solver.num_steps(nfe)
    except ValueError as e:
        raise RunError(f"{solver.name} at nfe={nfe}: {e}") from e
    if n < solver.min_steps:
        raise RunError(
            f"{solver.name} needs at least {solver.min_steps} steps; nfe={nfe} gives {n}: raise --nfe or lower --order"
        )


def to_host(tree):
    """A replicated (possibly multi-host) pytree as local numpy arrays."""

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)


def writable_path(path: str, what: str, *, directory: bool) -> None:
    """Raise :class:`RunError` unless ``path`` can be created or written as a directory
    (``directory``) or a file, without creating anything (``what`` names it in the
    message, e.g. ``"--out"``)."""
    if not os.fspath(path):
        raise RunError(f"{what} is empty: give a {'directory' if directory else 'file'} name")
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p):
        if directory and not os.path.isdir(p):
            raise RunError(f"{what} {path} exists and is not a directory")
        if not directory and os.path.isdir(p):
            raise RunError(f"{what} {path} is a directory")
        if not os.access(p if directory else os.path.dirname(p), os.W_OK):
            raise RunError(f"{what} {path} is not writable")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunError(f"{what} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise RunError(f"{what} {path} cannot be created: {parent} is not writable")
