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


def _to_data(process, t_end) -> bool:
    """Whether ``t_end`` is the data end: ``t_data`` (sigma = 0), below ``t_min``."""
    td = process.t_data
    return td is not None and float(t_end) == float(td) and float(td) < float(process.t_min)


def _span_end(process, t_end) -> float:
    """The last time an interior grid point may take: ``t_min`` for a grid that ends at
    the data (the interior stays in the process's valid range), else ``t_end``."""
    return float(process.t_min) if _to_data(process, t_end) else float(t_end)


def grid_space(process, t_start: float, t_end: float) -> str:
    """``"logsnr"`` when the log-SNR is finite over the span of the interior points (from
    ``t_start`` to ``t_end``, or to ``t_min`` when ``t_end`` is the data end ``t_data``),
    else ``"t"``."""
    ts = [t_start, _span_end(process, t_end)]
    lam = np.asarray(process.lambda_(jnp.asarray(ts, jnp.float32)), np.float64)
    return "logsnr" if np.all(np.isfinite(lam)) else "t"


def grid_from_logits(process, logits, t_start: float, t_end: float, space: str = "logsnr"):
    """The grid of ``len(logits)`` intervals whose fractions of the span are ``softmax(logits)``.

    ``t_0 = t_start``, ``t_N = t_end`` exactly; interior point ``i`` sits at the
    fraction ``sum_{k < i} softmax(logits)_k`` of the way from start to end, in log-SNR
    (``space="logsnr"``) or in t (``space="t"``). Every fraction is positive, so the
    grid is strictly decreasing for any finite logits (LD3, Tong et al., ICLR 2025).
    Differentiable in ``logits``.

    A grid that ends at the data (``t_end`` is the process's ``t_data``, below
    ``t_min``) keeps its interior in the valid range: the span of the fractions is then
    ``t_start`` to ``t_min`` (the last fraction is the gap between ``t_{N-1}`` and
    ``t_min``), and ``t_N = t_data``. The interior points are clipped to the span, so
    float32 rounding never moves one past ``t_min`` (or ``t_end``).
    """
    logits = jnp.asarray(logits)
    dt = jnp.result_type(logits.dtype, jnp.float32)
    c = jnp.cumsum(jax.nn.softmax(logits.astype(dt)))[:-1]
    te = _span_end(process, t_end)
    if space == "logsnr":
        l0, l1 = process.lambda_(jnp.asarray(t_start, dt)), process.lambda_(jnp.asarray(te, dt))
        inner = process.t_of_lambda(l0 + (l1 - l0) * c)
    elif space == "t":
        inner = t_start + (te - t_start) * c
    else:
        raise ValueError(f"space must be 'logsnr' or 't', got {space!r}")
    npdt = np.dtype(dt)
    lo, hi = npdt.type(te), npdt.type(t_start)
    if float(lo) < te:  # the end rounded below itself in this dtype
        lo = np.nextafter(lo, hi)
    inner = jnp.clip(inner.astype(dt), lo, hi)
    return jnp.concatenate([jnp.asarray([t_start], dt), inner, jnp.asarray([t_end], dt)])


# the smallest fraction of the span logits_from_grid gives the gap between a data-ending
# grid's last interior point and t_min (time_grid(final="data") puts that point on t_min)
_MIN_GAP = 1e-3


def logits_from_grid(process, grid, space: str = "logsnr"):
    """Logits whose :func:`grid_from_logits` is ``grid`` (up to rounding): the logs of
    its interval fractions in ``space``.

    For a grid that ends at the data (last point ``t_data``, below ``t_min``), the
    fractions are those of ``t_0 .. t_{N-1}, t_min`` (see :func:`grid_from_logits`);
    when ``t_{N-1}`` is within ``0.1%`` of the span from ``t_min`` (as in
    ``jdiff.time_grid(..., final="data")``), it starts at ``0.1%`` of the span above
    ``t_min``, so that a fit can move it.

    Raises:
      ValueError: a grid that is not strictly decreasing in ``space``, or (ending at the
        data) with interior points below ``t_min``.
    """
    g = np.asarray(grid, np.float64)
    pts = g
    if g.size >= 2 and _to_data(process, g[-1]):
        process.check_times(g[:-1], allow_data=False, what="initial grid times")
        pts = np.concatenate([g[:-1], [process.t_min]])
    if space == "logsnr":
        u = np.asarray(process.lambda_(jnp.asarray(pts, jnp.float32)), np.float64)
    else:
        u = pts
    d = np.diff(u) / (u[-1] - u[0])
    if pts is not g and d.size >= 2 and d[-1] < _MIN_GAP:
        d[-2] -= _MIN_GAP - d[-1]
        d[-1] = _MIN_GAP
    if not np.all(d > 0):
        raise ValueError(f"the initial grid must be strictly monotone in {space}, got {g.tolist()}")
    return jnp.asarray(np.log(d), jnp.float32)


def net_grid_from(process, grid, z, window: float, space: str = "logsnr"):
    """Network times around ``grid`` (LD3's decoupled times, Tong et al., ICLR 2025): the
    interior point ``i`` moves by ``window * tanh(z[i-1])`` times the smaller of its two
    intervals, in log-SNR (``space="logsnr"``) or in t; the end points stay. With
    ``window <= 0.5`` the network times stay strictly ordered. For a grid that ends at
    the data, the last interior point's lower interval is the one down to ``t_min``, so
    the network times stay in the valid range. Differentiable in ``grid`` and ``z``
    (``(N - 1,)``)."""
    grid = jnp.asarray(grid)
    z = jnp.asarray(z, grid.dtype)
    ref = jnp.maximum(grid, jnp.asarray(process.t_min, grid.dtype))  # a data end counts as t_min
    full = process.lambda_(ref) if space == "logsnr" else ref
    u = full[1:-1]
    gap = jnp.abs(jnp.diff(full))
    m = jnp.minimum(gap[:-1], gap[1:])
    u2 = u + window * jnp.tanh(z) * m
    inner = process.t_of_lambda(u2) if space == "logsnr" else u2
    return jnp.concatenate([grid[:1], inner.astype(grid.dtype), grid[-1:]])


# ------------------------------------------------------------------------- checks
def _flags(process, t0, t1):
    """``(to_data, from_noise)`` of a grid from ``t0`` to ``t1`` (as ``solver.num_steps``
    takes them)."""
    from_noise = float(process.alpha(jnp.asarray(t0, jnp.float32))) == 0.0
    return _to_data(process, t1), from_noise


def _check_steps(solver, nfe, what="nfe", *, to_data=False, from_noise=False):
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    if solver.stochastic:
        raise ValueError(f"{solver.name} is stochastic: grids are tuned for deterministic solvers")
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"{what} must be a positive int, got {nfe!r}")
    n = int(solver.num_steps(int(nfe), to_data, from_noise))
    if n < max(1, solver.min_steps) or (_nfe_arg(solver, nfe) is None and solver.nfe(n, to_data, from_noise) > nfe):
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


def default_keep(solver) -> str:
    """The prediction LD3's decoupled network call keeps by default for ``solver``
    (:func:`jdiff.wrappers.network_time`): ``"eps"`` for the noise-prediction family (a
    solver with ``mode == "noise"``: DPM-Solver, DEIS, iPNDM as a multistep; and iPNDM),
    whose update integrates the noise prediction; ``"x0"`` for the others (data
    prediction: DPM-Solver++, UniPC; DDIM, Euler, Heun). Measured on a 64-D mixture at
    NFE 5, iPNDM with ``"eps"`` reached 0.077 against 0.240 with ``"x0"``."""
    noise = getattr(solver, "mode", None) == "noise" or solver.name.startswith("ipndm")
    return "eps" if noise else "x0"


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
    log-SNR is infinite), from ``t_start`` to ``t_end`` (default ``t_max``, ``t_min``;
    ``t_end`` at the data, e.g. ``0.0``: the grid's last step goes from ``t_min`` to it)."""
    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    solver = S.dpm_solver_pp(3) if solver is None else solver
    kind = "logsnr" if grid_space(process, t0, t1) == "logsnr" else "uniform"
    if _to_data(process, t1):  # the last step from t_min to the data
        grid = time_grid(process, steps, kind=kind, t_start=t0, final="data")
    elif kind == "logsnr":
        grid = time_grid(process, steps, kind="logsnr", t_start=t0, t_end=t1)
    else:
        grid = jnp.asarray(np.linspace(t0, t1, steps + 1), jnp.float32)
    return sample(solver, denoiser, jnp.asarray(x_T), grid, cond=cond)
