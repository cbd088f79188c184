"""The probability-flow ODE log-likelihood: :func:`log_likelihood`, its checks and its
compiled implementation (the integrators are in :mod:`jdiff.likelihood._integrators`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._grid import time_grid
from jdiff._param import check_cond_batch
from jdiff._process import Process
from jdiff._sample import _jittable, validate_grid
from jdiff.inversion import invertible
from jdiff.likelihood._integrators import (
    _augmented,
    _draw_probes,
    _field,
    _node_weights,
    _solve_adaptive,
    _solve_fixed,
    _solve_solver,
)
from jdiff.likelihood._prior import gaussian_prior_log_prob
from jdiff.solvers._base import Solver

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "TIMES",
    "LikelihoodResult",
    "log_likelihood",
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE_METHODS = ("tsit5", "dopri5", "dopri8")
FIXED_METHODS = ("euler", "heun", "rk4")
TIMES = ("t", "rho")


class LikelihoodResult(NamedTuple):
    """What :func:`log_likelihood` returns.

    Attributes:
      log_prob: ``(B,)`` the estimate of ``log p(x)`` in nats (the mean over probes).
      prior_log_prob: ``(B,)`` ``log p_T(x_T)`` of the prior at the end of the path.
      delta: ``(B,)`` the change of ``log p`` along the path (``log_prob - prior_log_prob``;
        the divergence integral plus, for ``time="rho"`` or a jdiff solver, the
        ``D log alpha`` terms).
      per_probe: ``(B, K)`` one ``log p(x)`` estimate per Hutchinson probe (``K = 1``
        for the exact divergence); independent given ``x``, so their spread gives the
        probe part of the error.
      x_T: the end of the path, ``x``'s shape.
      steps: the number of solver steps taken (diffrax's accepted plus rejected steps
        for adaptive methods, the grid's steps otherwise).
    """

    log_prob: jax.Array
    prior_log_prob: jax.Array
    delta: jax.Array
    per_probe: jax.Array
    x_T: jax.Array
    steps: jax.Array


def _likelihood_impl(
    denoiser,
    x,
    cond,
    key,
    grid,
    *,
    divergence,
    probe,
    num_probes,
    method,
    time,
    t_start,
    t_end,
    rtol,
    atol,
    max_steps,
    prior_log_prob,
):
    process = denoiser.process
    dt = jnp.result_type(x.dtype, jnp.float32)
    x = x.astype(dt)
    B = x.shape[0]
    D = int(np.prod(x.shape[1:]))
    exact = divergence == "exact"
    probes = None if exact else _draw_probes(key, x.shape, num_probes, probe, dt)
    K = 1 if exact else num_probes
    if isinstance(method, Solver):
        # the path by the solver (its states at the grid nodes), d log p/dlambda at the nodes
        ts = grid.astype(dt)[::-1]  # increasing: data to noise
        rhs = _augmented(_field(denoiser, cond, "lambda"), probes, exact)
        zT, divs = _solve_solver(method, denoiser, cond, rhs, x, ts, process)
        # log p_0(x_0) - log p_T(x_T) = Int_{lam_0}^{lam_T} div(dx/dlam) dlam
        #   = D (log alpha_T - log alpha_0) - Int_{lam_0}^{lam_T} sigma div(eps_hat) dlam
        acc = -jnp.einsum("n,nkb->kb", _node_weights(process.lambda_(ts)), divs)
        acc = acc + D * (process.log_alpha(ts[-1]) - process.log_alpha(ts[0]))
        steps = jnp.asarray(ts.shape[0] - 1, jnp.int32)
    else:
        field = _field(denoiser, cond, time)
        rhs = _augmented(field, probes, exact)
        if grid is None:
            ts = jnp.asarray([t_start, t_end], dt)
        else:
            ts = grid.astype(dt)[::-1]  # increasing: data to noise
        if time == "rho":
            ss = process.rho(ts)
            ss = jnp.where(ts == (process.t_data if process.t_data is not None else -1.0), 0.0, ss)
            z0 = x / process.alpha(ts[0])
        else:
            ss = ts
            z0 = x
        state = (z0, jnp.zeros((K, B), dt))
        if grid is None:
            (zT, acc), steps = _solve_adaptive(rhs, state, ss[0], ss[-1], method, rtol, atol, max_steps)
        else:
            (zT, acc), steps = _solve_fixed(rhs, state, ss, method)
    if time == "rho":
        # x = alpha y: log p_x(x) = log p_y(y) - D log alpha at both ends
        a0, aT = process.alpha(ts[0]), process.alpha(ts[-1])
        x_T = zT * aT
        jac = D * (jnp.log(aT) - jnp.log(a0))
    else:
        x_T = zT
        jac = jnp.zeros((), dt)
    prior = prior_log_prob(x_T) if prior_log_prob is not None else gaussian_prior_log_prob(process, x_T)
    prior = jnp.asarray(prior, dt).reshape(B)
    per_probe = (prior[:, None] + acc.T + jac).astype(dt)
    logp = jnp.mean(per_probe, axis=1)
    return LikelihoodResult(logp, prior, logp - prior, per_probe, x_T, steps)


_likelihood_jit = jax.jit(
    _likelihood_impl,
    static_argnames=(
        "divergence",
        "probe",
        "num_probes",
        "method",
        "time",
        "t_start",
        "t_end",
        "rtol",
        "atol",
        "max_steps",
        "prior_log_prob",
    ),
)


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not (v > 0) or v == math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_solver_grid(solver, process, grid, x):
    """The grid of a jdiff solver: enough steps and finite log-SNR at both ends (a
    ``ValueError`` now for a concrete grid, at run time under ``jit``)."""
    N = grid.shape[0] - 1
    if N < max(1, solver.min_steps):
        raise ValueError(f"method={solver.name} needs at least {solver.min_steps} grid steps, the grid has {N}")
    msg = (
        f"method={solver.name} needs finite log-SNR at both grid ends (end the grid at t_min, not at t_data "
        "where sigma = 0, and start where alpha > 0): use jdiff.time_grid(..., final='t_min')"
    )
    ends = jnp.stack([grid[0], grid[-1]]).astype(jnp.result_type(x.dtype, jnp.float32))
    g = concrete(ends)
    if g is not None:
        if not np.all(np.isfinite(np.asarray(process.lambda_(jnp.asarray(g))))):
            raise ValueError(msg)
        return grid
    return error_if(grid, ~jnp.all(jnp.isfinite(process.lambda_(ends))), msg)


def _check_common(denoiser, x, cond):
    process = getattr(denoiser, "process", None)
    if not isinstance(process, Process) or not callable(denoiser):
        raise TypeError("denoiser must be a jdiff Denoiser (see jdiff.denoiser), with a .process")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch axis and at least one feature axis, e.g. (B, d); got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    x = error_if(x, ~jnp.all(jnp.isfinite(x)), f"x of shape {x.shape} has non-finite values (NaN or inf)")
    check_cond_batch(cond, x.shape[0], "x", x.shape)
    return process, x


def log_likelihood(
    denoiser,
    x,
    *,
    cond=None,
    key=None,
    divergence: str = "exact",
    probe: str = "rademacher",
    num_probes: int = 1,
    method: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    grid=None,
    num_steps: int | None = None,
    grid_kind: str = "default",
    time: str = "t",
    t_start: float | None = None,
    t_end: float | None = None,
    prior_log_prob=None,
) -> LikelihoodResult:
    """The log-likelihood ``log p(x)`` of a diffusion model by its probability-flow ODE.

    Integrates ``(x_t, Int div v dt)`` from ``t_start`` (the data end) to ``t_end``
    (the prior) and returns ``log p_T(x_T) + Int div v dt`` (Song et al., ICLR 2021,
    Sec. 4.3 and App. D.2; Grathwohl et al., FFJORD, ICLR 2019). Batched (one ODE for
    the whole batch, so an adaptive step size is shared by the batch) and compiled once
    per shape and setting.

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (or anything with ``.process`` and
        ``__call__(x, t, cond) -> Prediction``).
      x: ``(B, ...)`` data, floating point (float64 under ``jax.enable_x64`` for a
        precise answer).
      cond: conditioning pytree passed to the denoiser (per-sample leaves lead with B).
      key: PRNG key of the Hutchinson probes (required for ``"hutchinson"``); sample
        ``i``'s probes come from ``fold_in(key, i)``, independent of the batch.
      divergence: ``"exact"`` (the trace of the Jacobian through one JVP per dimension:
        cost ``D`` JVPs per evaluation, for small ``D``) or ``"hutchinson"``
        (Hutchinson's estimator ``E[v^T J v] = tr J``; ``num_probes`` JVPs per
        evaluation).
      probe: ``"rademacher"`` (entries +-1, the lower-variance choice) or ``"gaussian"``.
      num_probes: Hutchinson probes per sample (>= 1), each fixed along the path and
        integrated separately (``per_probe``); ``log_prob`` is their mean.
      method: ``"tsit5"``, ``"dopri5"``, ``"dopri8"`` (diffrax, adaptive steps with
        ``rtol``/``atol``; ignored with a grid) or, with ``grid``/``num_steps``, a fixed
        grid method ``"euler"``, ``"heun"`` or ``"rk4"``, or a jdiff solver value for
        which :func:`jdiff.inversion.invertible` holds (``jdiff.solvers.ddim()``,
        ``dpm_solver_pp(2)``, ``unipc(3)``, ``deis(...)``, ``ipndm(...)``).

        With a jdiff solver, the state runs from data to noise on the reversed grid with
        the solver's own steps (exponential integrators in log-SNR ``lambda``, as
        :func:`jdiff.inversion.invert`; Lu et al., "DPM-Solver++", 2022; Zhao et al.,
        "UniPC", NeurIPS 2023), and the log-density along that path follows from
        ``dx/dlambda = (dlog alpha/dlambda) x - sigma eps_hat``:

            log p(x_0) = log p_T(x_T) + D (log alpha_T - log alpha_0)
                         + Int_{lambda_T}^{lambda_0} sigma div(eps_hat)(x_lambda) dlambda,

        the ``alpha`` term exact, the integral by a composite 4-point rule over the
        grid's nodes in ``lambda`` (each interval integrates the cubic through its four
        nearest nodes: error ``O(h^4)``), with ``sigma div(eps_hat)`` evaluated at the
        solver's node states by the ``divergence`` chosen here. The total error is
        therefore the solver's, ``O(h^p)`` for an order-``p`` solver. ``time`` must be
        ``"t"`` and both grid ends need finite log-SNR (start at ``t_min``, not
        ``t_data``). Cost over ``N`` grid steps: ``solver.nfe(N)`` model calls (``N``
        for these solvers) for the path plus ``N + 1`` divergence evaluations, each
        ``D`` JVPs (exact) or ``num_probes`` JVPs (Hutchinson); a fixed Runge-Kutta
        method spends ``N``/``2N``/``4N`` (Euler/Heun/RK4) such evaluations, so for a
        given ``N`` the solver is about as costly as Euler and has its own order.
      rtol, atol: tolerances of the adaptive step-size controller (PID).
      max_steps: the adaptive solver's step budget.
      grid: a decreasing jdiff time grid (``jdiff.time_grid``), traversed from its end
        (data) to its start (prior); or ``num_steps`` to build one of ``grid_kind``
        from ``t_end`` to ``t_start``.
      time: ``"t"`` integrates ``x`` in the process time; ``"rho"`` integrates
        ``y = x / alpha`` against ``rho = sigma / alpha`` (``dy/drho = eps_hat``; the
        ``D log alpha`` Jacobian is added at both ends), smooth down to ``t_data``.
        ``"rho"`` needs ``alpha > 0`` at ``t_end`` (not zero terminal SNR).
      t_start: the data end (default ``t_min``; with ``time="rho"`` it may be
        ``t_data``, the exact data distribution).
      t_end: the prior end (default ``t_max``).
      prior_log_prob: ``x_T -> (B,)`` log-density of the prior at ``t_end``; default
        :func:`gaussian_prior_log_prob` (``N(0, alpha_T^2 + sigma_T^2)``, the prior of
        unit-variance data). Pass the exact marginal when it is known (a testbed).

    Returns:
      A :class:`LikelihoodResult` (``log_prob`` in nats per sample).

    Raises:
      TypeError: a denoiser without a process, non-float ``x``.
      ValueError: an unknown ``divergence``/``probe``/``method``/``time``; a jdiff
        solver that is stochastic or cannot run backward, without a grid, with
        ``time="rho"``, from ``t_data`` or on a grid with an end at infinite log-SNR;
        ``num_probes`` < 1; Hutchinson without a key; bad tolerances; times outside the
        process's range or not ``t_start < t_end``; ``time="t"`` from ``t_data``;
        ``time="rho"`` to ``alpha = 0``; a grid that is not a valid decreasing grid;
        non-finite ``x``; a ``cond`` batch that is not ``x``'s.
    """
    process, x = _check_common(denoiser, x, cond)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    num_probes = int(num_probes)
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' draws random probes: pass key=jax.random.key(seed)")
    if divergence == "exact":
        key, num_probes = None, 1
    if time not in TIMES:
        raise ValueError(f"unknown time {time!r}; expected one of {TIMES}")
    fixed = grid is not None or num_steps is not None
    solver = method if isinstance(method, Solver) else None
    if solver is not None:
        if not invertible(solver):
            raise ValueError(
                f"method={solver.name} cannot integrate the PF-ODE from data to noise: a jdiff solver here "
                "must be deterministic and run backward (jdiff.inversion.invertible): ddim() (eta=0), "
                "dpm_solver_pp(2), unipc(3), deis, ipndm, ..."
            )
        if not fixed:
            raise ValueError(f"method={solver.name} (a jdiff solver) runs on a grid: pass grid= or num_steps=")
        if time != "t":
            raise ValueError(
                f"time={time!r} applies to {FIXED_METHODS + ADAPTIVE_METHODS}; method={solver.name} steps in "
                "log-SNR by itself: leave time='t'"
            )
    elif fixed and method not in FIXED_METHODS:
        if callable(method) and not isinstance(method, str):
            raise ValueError(f"method={method!r} is not a jdiff solver value: call it, e.g. dpm_solver_pp(2)")
        raise ValueError(
            f"with a grid the method must be one of {FIXED_METHODS} (fixed steps) or a deterministic jdiff "
            f"solver (e.g. jdiff.solvers.dpm_solver_pp(2)), got {method!r}"
        )
    if not fixed and solver is None and method not in ADAPTIVE_METHODS:
        raise ValueError(
            f"unknown adaptive method {method!r}; expected one of {ADAPTIVE_METHODS}, "
            f"or pass grid= or num_steps= for {FIXED_METHODS}"
        )
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")

    t_start = float(process.t_min if t_start is None else t_start)
    t_end = float(process.t_max if t_end is None else t_end)
    at_data = process.t_data is not None and t_start == process.t_data
    if not at_data:
        process.check_times(np.asarray([t_start]), allow_data=False, what="t_start")
    process.check_times(np.asarray([t_end]), allow_data=False, what="t_end")
    if not t_start < t_end:
        raise ValueError(f"need t_start < t_end (data to prior), got t_start={t_start}, t_end={t_end}")
    if solver is not None and at_data:
        raise ValueError(
            f"method={solver.name} needs finite log-SNR at both ends: it cannot start at t_data={t_start} "
            "(sigma = 0); start at t_min, or use time='rho' with a Runge-Kutta method"
        )
    if time == "t" and at_data:
        raise ValueError(
            f"time='t' cannot start at t_data={t_start}: sigma'(t) may be infinite there; "
            "use time='rho' (smooth at the data) or start at t_min"
        )
    if time == "rho" and not float(process.alpha(np.float64(t_end))) > 0.0:
        raise ValueError(f"time='rho' needs alpha > 0 at t_end={t_end} (rho is infinite at alpha = 0); use time='t'")

    if fixed:
        if grid is None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
                raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
            grid = time_grid(
                process,
                int(num_steps),
                kind=grid_kind,
                t_start=t_end,
                t_end=t_start if not at_data else process.t_min,
                final="data" if at_data else "t_min",
                dtype=jnp.result_type(x.dtype, jnp.float32),
            )
        else:
            grid = validate_grid(process, grid)
            g = concrete(grid)
            if (
                g is not None
                and solver is None
                and time == "t"
                and process.t_data is not None
                and float(g[-1]) == process.t_data
            ):
                raise ValueError("time='t' cannot integrate from t_data (sigma' may be infinite): use time='rho'")
        if solver is not None:
            grid = _check_solver_grid(solver, process, grid, x)
        t_start = t_end = None  # the grid says

    run = _likelihood_jit if _jittable((denoiser, cond, key)) else _likelihood_impl
    return run(
        denoiser,
        x,
        cond,
        key,
        grid,
        divergence=divergence,
        probe=probe,
        num_probes=num_probes,
        method=method,
        time=time,
        t_start=t_start,
        t_end=t_end,
        rtol=rtol,
        atol=atol,
        max_steps=int(max_steps),
        prior_log_prob=prior_log_prob,
    )
