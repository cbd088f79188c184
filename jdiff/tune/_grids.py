"""The grid a tuner returns (:class:`GridFit`), its parameterization by free logits, the
checks every tuner shares, and the measures of a grid (:func:`grid_error`,
:func:`teacher_solve`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import solvers as S
from jdiff._grid import time_grid
from jdiff._sample import sample
from jdiff.solvers._base import Solver
from jdiff.wrappers import network_time


@dataclasses.dataclass
class GridFit:
    """What a grid optimizer returns.

    Attributes:
      grid: ``(N + 1,)`` numpy float64, strictly decreasing.
      method: ``"ld3"``, ``"gits"`` or ``"dmn"``.
      history: the objective along the fit (LD3: training loss per step; DMN: the bound
        per step; GITS: the DP's total cost, one value).
      seconds: wall time of the fit.
      net_grid: ``(N + 1,)`` the network's times (LD3 with ``decouple > 0``; use them with
        :func:`jdiff.wrappers.network_time`), else None.
      keep: the prediction :func:`jdiff.wrappers.network_time` keeps (with ``net_grid``).
    """

    grid: np.ndarray
    method: str
    history: list
    seconds: float
    net_grid: np.ndarray | None = None
    keep: str = "x0"

    def denoiser(self, denoiser):
        """``denoiser`` as the fitted configuration uses it: wrapped by
        :func:`jdiff.wrappers.network_time` when the fit has network times."""
        if self.net_grid is None:
            return denoiser
        return network_time(
            denoiser, jnp.asarray(self.grid, jnp.float32), jnp.asarray(self.net_grid, jnp.float32), keep=self.keep
        )


# ------------------------------------------------------------------ parameterization
def _lam(process, t):
    return process.lambda_(jnp.asarray(t, jnp.float32))


def grid_space(process, t_start: float, t_end: float) -> str:
    """``"logsnr"`` when the log-SNR is finite at both ends, else ``"t"``."""
    lam = np.asarray(process.lambda_(jnp.asarray([t_start, t_end], jnp.float32)), np.float64)
    return "logsnr" if np.all(np.isfinite(lam)) else "t"


def grid_from_logits(process, logits, t_start: float, t_end: float, space: str = "logsnr"):
    """The grid of ``len(logits)`` intervals whose fractions of the span are ``softmax(logits)``.

    ``t_0 = t_start``, ``t_N = t_end`` exactly; interior point ``i`` sits at the
    fraction ``sum_{k < i} softmax(logits)_k`` of the way from start to end, in log-SNR
    (``space="logsnr"``) or in t (``space="t"``). Every fraction is positive, so the
    grid is strictly decreasing for any finite logits (LD3, Tong et al., ICLR 2025).
    Differentiable in ``logits``.
    """
    logits = jnp.asarray(logits)
    dt = jnp.result_type(logits.dtype, jnp.float32)
    c = jnp.cumsum(jax.nn.softmax(logits.astype(dt)))[:-1]
    if space == "logsnr":
        l0, l1 = process.lambda_(jnp.asarray(t_start, dt)), process.lambda_(jnp.asarray(t_end, dt))
        inner = process.t_of_lambda(l0 + (l1 - l0) * c)
    elif space == "t":
        inner = t_start + (t_end - t_start) * c
    else:
        raise ValueError(f"space must be 'logsnr' or 't', got {space!r}")
    return jnp.concatenate([jnp.asarray([t_start], dt), inner.astype(dt), jnp.asarray([t_end], dt)])


def logits_from_grid(process, grid, space: str = "logsnr"):
    """Logits whose :func:`grid_from_logits` is ``grid`` (up to rounding): the logs of
    its interval fractions in ``space``."""
    g = np.asarray(grid, np.float64)
    if space == "logsnr":
        u = np.asarray(process.lambda_(jnp.asarray(g, jnp.float32)), np.float64)
    else:
        u = g
    d = np.diff(u) / (u[-1] - u[0])
    if not np.all(d > 0):
        raise ValueError(f"the initial grid must be strictly monotone in {space}, got {g.tolist()}")
    return jnp.asarray(np.log(d), jnp.float32)


def net_grid_from(process, grid, z, window: float, space: str = "logsnr"):
    """Network times around ``grid`` (LD3's decoupled times, Tong et al., ICLR 2025): the
    interior point ``i`` moves by ``window * tanh(z[i-1])`` times the smaller of its two
    intervals, in log-SNR (``space="logsnr"``) or in t; the end points stay. With
    ``window <= 0.5`` the network times stay strictly ordered. Differentiable in ``grid``
    and ``z`` (``(N - 1,)``)."""
    grid = jnp.asarray(grid)
    z = jnp.asarray(z, grid.dtype)
    full = process.lambda_(grid) if space == "logsnr" else grid
    u = full[1:-1]
    gap = jnp.abs(jnp.diff(full))
    m = jnp.minimum(gap[:-1], gap[1:])
    u2 = u + window * jnp.tanh(z) * m
    inner = process.t_of_lambda(u2) if space == "logsnr" else u2
    return jnp.concatenate([grid[:1], inner.astype(grid.dtype), grid[-1:]])


# ------------------------------------------------------------------------- checks
def _check_steps(solver, nfe, what="nfe"):
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    if solver.stochastic:
        raise ValueError(f"{solver.name} is stochastic: grids are tuned for deterministic solvers")
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"{what} must be a positive int, got {nfe!r}")
    n = int(solver.num_steps(int(nfe)))
    if n < max(1, solver.min_steps) or (_nfe_arg(solver, nfe) is None and solver.nfe(n) > nfe):
        raise ValueError(
            f"{solver.name} cannot run with nfe={nfe}: it needs at least {solver.min_steps} steps "
            f"(nfe {solver.nfe(max(1, solver.min_steps))})"
        )
    return n


def _nfe_arg(solver, nfe):
    """The ``nfe`` target a singlestep solver spends exactly on its grid; None for the others."""
    return int(nfe) if solver.init_uses_nfe else None


def _check_noise(x, what):
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty batch (n, ...) with n >= 1, got shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} of shape {x.shape} has non-finite values")
    return x


def _ends(process, t_start, t_end):
    t0 = float(process.t_max if t_start is None else t_start)
    t1 = float(process.t_min if t_end is None else t_end)
    if not t0 > t1:
        raise ValueError(f"t_start ({t0}) must be larger than t_end ({t1})")
    process.check_times(np.array([t0]), allow_data=False, what="t_start")
    process.check_times(np.array([t1]), allow_data=True, what="t_end")
    return t0, t1


def _per_sample_l2(a, b):
    d = (a - b).reshape(a.shape[0], -1)
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


def grid_error(solver, denoiser, x_T, x_ref, grid, *, nfe=None, cond=None) -> float:
    """Mean L2 distance (per sample) between ``jdiff.sample(solver, denoiser, x_T, grid)``
    and ``x_ref``."""
    x = sample(solver, denoiser, jnp.asarray(x_T), jnp.asarray(grid, jnp.float32), nfe=nfe, cond=cond)
    return float(jnp.mean(_per_sample_l2(x.astype(jnp.float32), jnp.asarray(x_ref, jnp.float32))))


def teacher_solve(denoiser, x_T, t_start=None, t_end=None, *, solver=None, steps: int = 200, cond=None):
    """A high-accuracy solve of the probability-flow ODE: ``solver`` (default
    DPM-Solver++(3M)) over a log-SNR grid of ``steps`` intervals (a t grid where the
    log-SNR is infinite), from ``t_start`` to ``t_end`` (default ``t_max``, ``t_min``)."""
    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    solver = S.dpm_solver_pp(3) if solver is None else solver
    if grid_space(process, t0, t1) == "logsnr":
        grid = time_grid(process, steps, kind="logsnr", t_start=t0, t_end=t1)
    else:
        grid = jnp.asarray(np.linspace(t0, t1, steps + 1), jnp.float32)
    return sample(solver, denoiser, jnp.asarray(x_T), grid, cond=cond)
