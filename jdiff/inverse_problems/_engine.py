"""The posterior samplers' one engine.

A posterior sampler is a :class:`~jdiff.solvers.Solver` (a :class:`PosteriorSolver`) run
by :func:`jdiff.sample`'s loop. The measurement travels with the denoiser: a
:class:`Measured` denoiser is the prior's denoiser plus ``(operator, y, sigma_y)`` as
pytree leaves, so the solver stays a hashable settings value while the measurement is
data (a new ``y`` reuses the compiled program, and ``jit``, ``vmap``, ``grad`` and the
gradient strategies of :func:`jdiff.sample` reach it). Each step reads the measurement
with :func:`measurement_of`.

:func:`posterior_sample` is the one place that checks the inputs, builds the grid, draws
the start and calls :func:`jdiff.sample`; the shared keywords of the five samplers are
one :class:`Sampling` value.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._gradient import Backprop, GradientStrategy
from jdiff._grid import time_grid
from jdiff._param import TreeValue
from jdiff._random import _batch_keys, normal_per_sample
from jdiff._sample import sample, validate_grid
from jdiff.inverse_problems._operators import _check_operator, _check_sigma_y
from jdiff.solvers._base import Solver, network_calls

__all__ = ["Measured", "measured", "measurement_of", "PosteriorSolver", "Sampling", "posterior_sample"]


@dataclasses.dataclass(frozen=True, eq=False)
class Measured(TreeValue):
    """A denoiser that carries a measurement ``y = A(x0) + sigma_y n``: calling it is
    calling the prior's denoiser ``inner``; the posterior solvers read ``operator``, ``y``
    and ``sigma_y`` from it (all pytree leaves, so they may be traced)."""

    inner: Any
    operator: Any
    y: Any
    sigma_y: Any

    @property
    def process(self):
        return self.inner.process

    def __call__(self, x, t, cond=None):
        return self.inner(x, t, cond)

    def calls(self, t):
        return network_calls(self.inner, t)


jax.tree_util.register_dataclass(Measured, data_fields=["inner", "operator", "y", "sigma_y"], meta_fields=[])


def measured(denoiser, operator, y, sigma_y, *, who: str = "measured", svd: bool = False, linear: bool = False):
    """The prior's ``denoiser`` with the measurement ``(operator, y, sigma_y)`` attached.

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (or wrapper) of the prior.
      operator: a :class:`~jdiff.inverse_problems.Operator`.
      y: ``(B, *operator.y_shape)`` floating-point measurements.
      sigma_y: their noise std (a finite number >= 0, or a traced scalar).
      who: the name that starts error messages; svd, linear: what the sampler needs of
        the operator.

    Returns:
      :class:`Measured`.

    Raises:
      TypeError: not an operator (or one without what ``svd``/``linear`` ask), not a
        denoiser, ``y`` not floating point. ValueError: ``y`` of the wrong shape,
        ``sigma_y`` negative or not finite.
    """
    _check_operator(operator, who, svd=svd, linear=linear)
    if getattr(denoiser, "process", None) is None or not callable(denoiser):
        raise TypeError(f"{who}: denoiser must be a jdiff Denoiser (see jdiff.denoiser)")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"{who}: y must be floating point, got {y.dtype}")
    operator.check_measurement(y.shape)
    _check_sigma_y(sigma_y)
    return Measured(denoiser, operator, y, jnp.asarray(sigma_y))


def measurement_of(denoiser) -> Measured:
    """The :class:`Measured` denoiser inside ``denoiser`` (``denoiser`` itself, or under
    the dtype wrapper :func:`jdiff.sample` adds).

    Raises:
      TypeError: there is none."""
    d = denoiser
    while d is not None:
        if isinstance(d, Measured):
            return d
        d = getattr(d, "inner", None)
    raise TypeError(
        "a posterior solver needs the measurement: pass jdiff.inverse_problems.measured(denoiser, operator, "
        f"y, sigma_y) as the denoiser, got {type(denoiser).__name__}"
    )


class PosteriorSolver(Solver):
    """Base class of the posterior samplers (:class:`~jdiff.inverse_problems.DPS`,
    ``PiGDM``, ``DDS``, ``DDRM``, ``REDDiff``): a solver whose ``step`` reads the
    measurement from its :class:`Measured` denoiser.

    Class attributes: ``who`` (the sampler's function name, for messages),
    ``default_nfe`` (its usual NFE), ``needs_svd``/``needs_linear`` (what it needs of the
    operator).
    """

    who = "posterior"
    default_nfe = 100
    needs_svd = False
    needs_linear = False

    def start(self, m: Measured, grid, key, shape, dtype):
        """``x_T`` when none is given: a draw from the prior (sample ``i`` from
        ``fold_in(key, i)`` at a step index no step uses)."""
        return _prior(m.process, _batch_keys(key, shape[0]), shape, dtype)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _prior(process, keys, shape, dtype):
    return (normal_per_sample(keys, shape, dtype, step=2**31 - 1) * process.prior_std()).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The keywords every posterior sampler shares, as one value.

    Attributes:
      nfe: model calls (= steps); default: the sampler's usual NFE. Ignored with ``grid``.
      grid: an explicit decreasing time grid (default: ``nfe`` steps of kind ``grid_kind``
        ending at the data where the process reaches it, else at ``t_min``).
      grid_kind: the kind of the default grid (see :func:`jdiff.time_grid`).
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      x_T: optional ``(B, *x_shape)`` start (RED-diff: ``mu``'s start, its ``mu_init``).
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      gradient: the gradient strategy of :func:`jdiff.sample` (``Backprop()``,
        ``Remat()``, ``Truncated(k)``; not ``Adjoint()``, which integrates the
        probability-flow ODE backward and knows nothing of the measurement).
    """

    nfe: int | None = None
    grid: Any = None
    grid_kind: str = "default"
    cond: Any = None
    x_T: Any = None
    return_info: bool = False
    gradient: GradientStrategy = Backprop()


def posterior_sample(solver, denoiser, operator, y, sigma_y, key, settings: Sampling | None = None):
    """Run a posterior solver: check the inputs, build the grid, draw the start and run
    :func:`jdiff.sample` on :func:`measured` ``(denoiser, operator, y, sigma_y)``.

    Args:
      solver: a :class:`PosteriorSolver` (e.g. ``DPS(jdiff.solvers.ddpm(), 1.0)``).
      denoiser: the prior's :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: an :class:`~jdiff.inverse_problems.Operator` acting on samples of shape
        ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; sigma_y: their noise std (>= 0).
      key: PRNG key (one, or one per sample): sample ``i`` draws its noise from
        ``fold_in(key, i)``, so it does not depend on the rest of its batch.
      settings: the shared keywords (:class:`Sampling`).

    Returns:
      ``(B, *x_shape)`` restorations in the compute dtype of ``y`` (and the info).

    Raises:
      ValueError: shapes that do not fit the operator, ``sigma_y`` < 0 or not finite, no
        key, a bad ``nfe`` or grid. TypeError: not an operator (or one without what the
        sampler needs), not a denoiser, not a posterior solver.
    """
    if not isinstance(solver, PosteriorSolver):
        raise TypeError(f"solver must be a jdiff.inverse_problems posterior solver, got {type(solver).__name__}")
    s = Sampling() if settings is None else settings
    who = solver.who
    m = measured(denoiser, operator, y, sigma_y, who=who, svd=solver.needs_svd, linear=solver.needs_linear)
    process, B = m.process, m.y.shape[0]
    shape = (B,) + tuple(operator.x_shape)
    dt = jnp.result_type(m.y.dtype, jnp.float32)
    x_T = s.x_T
    if x_T is not None:
        x_T = jnp.asarray(x_T)
        operator.check_data(x_T.shape, "x_T")
        if x_T.shape[0] != B:
            raise ValueError(f"{who}: x_T has batch {x_T.shape[0]}, y has batch {B}")
    if key is None:
        raise ValueError(f"{who} is stochastic: pass key=jax.random.key(seed)")
    grid = s.grid
    if grid is None:
        nfe = solver.default_nfe if s.nfe is None else s.nfe
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"{who}: nfe must be a positive int, got {nfe!r}")
        final = "data" if process.t_data is not None else "t_min"
        grid = time_grid(process, int(nfe), kind=s.grid_kind, final=final, dtype=dt)
    grid = validate_grid(process, grid)
    solver.check_inputs(process, grid, x_T)
    x_T = solver.start(m, grid, key, shape, dt) if x_T is None else x_T.astype(dt)
    return sample(solver, m, x_T, grid, cond=s.cond, key=key, return_info=s.return_info, gradient=s.gradient)


def sampling_settings(who: str, kw: dict) -> Sampling:
    """The :class:`Sampling` value of a sampler's keywords (``settings=`` or the keywords
    themselves), with a message naming the sampler for an unknown one."""
    if "settings" in kw:
        s = kw.pop("settings")
        if kw:
            raise TypeError(f"{who}: give either settings= or the keywords {sorted(kw)}, not both")
        return s
    fields = {f.name for f in dataclasses.fields(Sampling)}
    bad = sorted(set(kw) - fields)
    if bad:
        raise TypeError(f"{who}() got unexpected keyword arguments {bad}; the shared ones are {sorted(fields)}")
    return Sampling(**kw)
