"""The inversion records and the input checks shared by every inversion."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import batch_array, error_if
from jdiff._grid import time_grid
from jdiff._param import check_cond_batch
from jdiff._sample import validate_grid
from jdiff.solvers._base import Solver, compute_dtype

__all__ = ["ODEInversion", "EDICTInversion", "BDIAInversion", "DDPMInversion"]


def _record(cls, data, meta=(), eq=True):
    cls = dataclasses.dataclass(frozen=True, eq=eq)(cls)
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
    return cls


def _solver(data, meta):
    """Make ``cls`` a solver that is a pytree (see :class:`~jdiff.solvers.Solver`): its
    ``data`` fields (arrays: traced settings, starting states) are arguments of
    :func:`jdiff.sample`'s compiled program and its ``meta`` fields static settings.
    Compared by identity (arrays have no truth value); the structure is what caches."""
    return lambda cls: _record(cls, data, meta, eq=False)


class ODEInversion:
    """What :func:`invert` returns: the noise ``x_T`` at ``grid[0]``, the sampling grid
    (decreasing) and the solver whose forward pass regenerates the data."""

    x_T: jax.Array
    grid: jax.Array
    solver: Solver
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class EDICTInversion:
    """What :func:`edict_invert` returns: the coupled pair ``(x_T, y_T)`` at ``grid[0]``,
    the grid, the mixing weight ``p`` and whether the step order alternates."""

    x_T: jax.Array
    y_T: jax.Array
    grid: jax.Array
    p: float
    leapfrog: bool
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class BDIAInversion:
    """What :func:`bdia_invert` returns: the states ``x_T`` at ``grid[0]`` and ``x_1`` at
    ``grid[1]`` (BDIA needs two to start), the grid and ``gamma``."""

    x_T: jax.Array
    x_1: jax.Array
    grid: jax.Array
    gamma: float
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class DDPMInversion:
    """What :func:`ddpm_invert` returns: ``x_T`` at ``grid[0]``, the per-step noises
    ``zs`` (``(N, *x.shape)``; step ``i`` goes from ``grid[i]`` to ``grid[i + 1]``), the
    grid and DDIM's ``eta`` of the sampler (1 = DDPM)."""

    x_T: jax.Array
    zs: jax.Array
    grid: jax.Array
    eta: float
    process: Any = None  # the inverting denoiser's (regenerate checks it)


ODEInversion = _record(ODEInversion, ["x_T", "grid"], ["solver", "process"])
EDICTInversion = _record(EDICTInversion, ["x_T", "y_T", "grid", "p"], ["leapfrog", "process"])
BDIAInversion = _record(BDIAInversion, ["x_T", "x_1", "grid", "gamma"], ["process"])
DDPMInversion = _record(DDPMInversion, ["x_T", "zs", "grid", "eta"], ["process"])


def _check_denoiser(denoiser, what="denoiser"):
    process = getattr(denoiser, "process", None)
    if process is None or not callable(denoiser):
        raise TypeError(f"{what} must be a jdiff Denoiser (see jdiff.denoiser), got {type(denoiser).__name__}")
    return process


def _check_unit(name, value):
    """``value`` in (0, 1]: a Python float when concrete (checked now), else the traced
    scalar carrying a runtime check."""
    msg = f"{name} must be a number in (0, 1]"
    if isinstance(value, jax.core.Tracer):
        if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(f"{msg}, got a traced array of shape {jnp.shape(value)}")
        return error_if(value, ~((value > 0) & (value <= 1)), msg)
    ok = isinstance(value, (int, float, np.floating, np.integer, np.ndarray, jax.Array)) and not isinstance(value, bool)
    ok = ok and np.shape(value) == ()
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ValueError(f"{msg}, got {value!r}")
    return v


def _setup(denoiser, x0, grid, cond, *, nfe, grid_kind, calls, min_steps, what):
    """Shared checks; returns ``(process, x0, grid)`` (with runtime checks if traced)."""
    process = _check_denoiser(denoiser)
    x0 = batch_array(x0, "the data", prefix=f"{what}: ")
    if grid is None:
        if nfe is None:
            raise ValueError(f"{what}: give a time grid or a target nfe")
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < calls * min_steps:
            raise ValueError(f"{what}: nfe must be an integer >= {calls * min_steps}, got {nfe!r}")
        if nfe % calls:
            raise ValueError(f"{what} makes {calls} model calls per step: nfe must be a multiple of {calls}, got {nfe}")
        grid = time_grid(process, int(nfe) // calls, kind=grid_kind)
    grid = validate_grid(process, grid)
    N = grid.shape[0] - 1
    if N < min_steps:
        raise ValueError(f"{what} needs at least {min_steps} grid steps, the grid has {N}")
    lam = process.lambda_(jnp.stack([grid[0], grid[-1]]).astype(compute_dtype(x0)))
    grid = error_if(
        grid,
        ~jnp.all(jnp.isfinite(lam)),
        f"{what}: both grid ends need finite log-SNR (the grid must end at t_min, not at t_data where "
        "sigma = 0, and start where alpha > 0); use jdiff.time_grid(..., final='t_min')",
    )
    x0 = error_if(
        x0, ~jnp.all(jnp.isfinite(x0)), f"{what}: the data of shape {x0.shape} has non-finite values (NaN or inf)"
    )
    check_cond_batch(cond, x0.shape[0], "the data", x0.shape)
    return process, x0, grid


def _num(v, x):
    """A setting as an array of the compute dtype: a traced argument, so that one compiled
    program serves every value."""
    return jnp.asarray(v, compute_dtype(jnp.asarray(x)))
