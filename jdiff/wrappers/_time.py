"""Wrappers that evaluate the network at another time than the solver's: the time-shift
sampler (Li et al., ICLR 2024) and LD3's decoupled network times (Tong et al., ICLR
2025)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._param import Prediction, broadcast_to_x
from jdiff.wrappers._base import InnerWrapper

__all__ = ["time_shift", "network_time"]


def _anchored(process, x, t, p, keep):
    """The prediction ``p`` (made by the network at another time) used at the solver's
    time ``t``: its ``keep`` part (``"eps"`` or ``"x0"``) as is, the other from
    ``x = alpha(t) x0 + sigma(t) eps`` (the network's own where alpha or sigma is 0)."""
    a = broadcast_to_x(process.alpha(jnp.asarray(t, x.dtype)), x)
    s = broadcast_to_x(process.sigma(jnp.asarray(t, x.dtype)), x)
    if keep == "eps":
        x0 = jnp.where(a > 0, (x - s * p.eps) / jnp.where(a > 0, a, 1.0), p.x0)
        return Prediction(x0.astype(p.x0.dtype), p.eps)
    eps = jnp.where(s > 0, (x - a * p.x0) / jnp.where(s > 0, s, 1.0), p.eps)
    return Prediction(p.x0, eps.astype(p.eps.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class _TimeShift(InnerWrapper):
    inner: Any
    data_var: float
    window: float
    candidates: int
    cutoff: float

    def shifted_time(self, x, t):
        """Per sample, the candidate time in ``[t - window, t + window]`` (clipped to the
        process's range) whose marginal variance ``alpha^2 data_var + sigma^2`` is closest
        to the sample's variance over its entries; ``t`` itself below ``cutoff``."""
        p = self.process
        dt = x.dtype
        t = jnp.broadcast_to(jnp.asarray(t, dt), (x.shape[0],))
        if self.window == 0.0:
            return t
        var = jnp.var(x.reshape(x.shape[0], -1), axis=1)
        offs = jnp.linspace(-self.window, self.window, self.candidates, dtype=dt)
        cand = jnp.clip(t[:, None] + offs[None, :], p.t_min, p.t_max)  # (B, K)
        a, s = p.alpha(cand), p.sigma(cand)
        best = jnp.argmin(jnp.abs(a * a * self.data_var + s * s - var[:, None]), axis=1)
        ts = jnp.take_along_axis(cand, best[:, None], axis=1)[:, 0]
        return jnp.where(t >= self.cutoff, ts, t)

    def __call__(self, x, t, cond=None) -> Prediction:
        ts = self.shifted_time(x, t)
        # the network's noise estimate, used as the prediction at the step's own time
        return _anchored(self.process, x, t, self.inner(x, ts, cond), "eps")


jax.tree_util.register_dataclass(
    _TimeShift, data_fields=["inner"], meta_fields=["data_var", "window", "candidates", "cutoff"]
)


def time_shift(denoiser, data_var: float, *, window: float, candidates: int = 21, cutoff: float | None = None):
    """The time-shift sampler (Li et al., ICLR 2024): evaluate the network at a shifted
    time whose marginal variance matches the current sample's (exposure bias makes
    samples noisier than their nominal time), and use its noise estimate as the
    prediction at the step's time (x0 follows from ``x = alpha x0 + sigma eps``).

    Args:
      denoiser: the denoiser to wrap.
      data_var: the per-entry variance of the data (``alpha^2 data_var + sigma^2`` is the
        marginal variance at a time).
      window: half-width of the window of candidate times around the step's time
        (0 turns the shift off: the wrapper is then the denoiser itself).
      candidates: number of candidate times in the window (odd keeps ``t`` itself).
      cutoff: no shift at times below it (default: shift everywhere).

    Returns:
      A denoiser (a value, like the other wrappers).

    Raises:
      ValueError: ``data_var <= 0``, ``window < 0``, or ``candidates < 1``.
    """
    if not data_var > 0:
        raise ValueError(f"data_var must be positive, got {data_var}")
    if not window >= 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if int(candidates) < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    cut = float(denoiser.process.t_min if cutoff is None else cutoff)
    return _TimeShift(denoiser, float(data_var), float(window), int(candidates), cut)


@dataclasses.dataclass(frozen=True, eq=False)
class _NetworkTime(InnerWrapper):
    inner: Any
    grid: Any
    net_grid: Any
    keep: str

    def network_time(self, t):
        """The network time for solver time ``t``: piecewise linear in t through the
        points ``(grid[i], net_grid[i])``, ``t`` itself outside the grid's span."""
        t = jnp.asarray(t)
        g = jnp.asarray(self.grid).astype(t.dtype)[::-1]
        n = jnp.asarray(self.net_grid).astype(t.dtype)[::-1]
        inside = (t >= g[0]) & (t <= g[-1])
        return jnp.where(inside, jnp.interp(t, g, n), t)

    def __call__(self, x, t, cond=None) -> Prediction:
        return _anchored(self.process, x, t, self.inner(x, self.network_time(t), cond), self.keep)


jax.tree_util.register_dataclass(_NetworkTime, data_fields=["inner", "grid", "net_grid"], meta_fields=["keep"])


def network_time(denoiser, grid, net_grid, *, keep: str = "x0"):
    """Evaluate the network at its own times: when a solver asks for the prediction at
    its grid time ``grid[i]``, the network runs at ``net_grid[i]`` (linear in t in
    between; unchanged outside the grid's span). The kept prediction (``keep``: the
    network's ``"eps"`` or ``"x0"``) is used as the prediction at the solver's time, the
    other follows from ``x = alpha(t) x0 + sigma(t) eps``.

    This is the second set of learned times of LD3 (Tong et al., "Learning to Discretize
    Denoising Diffusion ODEs", ICLR 2025; in its released code the model is fed times
    decoupled from the solver's, each within a window around its grid point): it lets
    the network's time absorb part of the solver's truncation error. Fitted by
    :func:`jdiff.tune.ld3` with ``decouple > 0``. With ``net_grid == grid`` it is the
    denoiser itself (up to the x0/eps round trip).

    Args:
      denoiser: the denoiser to wrap.
      grid: ``(N + 1,)`` the solver's decreasing time grid.
      net_grid: ``(N + 1,)`` the network time for each grid point (arrays: they may be
        traced, e.g. while fitting).
      keep: ``"eps"`` (for noise-prediction solvers such as iPNDM) or ``"x0"``.

    Returns:
      A denoiser (a value, like the other wrappers).

    Raises:
      ValueError: mismatched or non-1-D shapes, an unknown ``keep``, non-finite or
        out-of-range concrete network times.
    """
    if keep not in ("eps", "x0"):
        raise ValueError(f"keep must be 'eps' or 'x0', got {keep!r}")
    if jnp.ndim(grid) != 1 or jnp.shape(grid) != jnp.shape(net_grid) or jnp.shape(grid)[0] < 2:
        raise ValueError(
            f"grid and net_grid must be 1-D of the same length >= 2, got {jnp.shape(grid)} and {jnp.shape(net_grid)}"
        )
    p = denoiser.process
    lo, hi = min(float(p.t_min), float(getattr(p, "t_data", p.t_min))), float(p.t_max)
    n = concrete(net_grid)
    if n is not None:
        n = n.astype(np.float64)
        if not np.all(np.isfinite(n)) or n.min() < lo - 1e-6 or n.max() > hi + 1e-6:
            raise ValueError(f"net_grid must be finite times in [{lo}, {hi}], got {n.tolist()}")
    else:  # traced (e.g. while fitting): the same check at run time
        bad = ~jnp.isfinite(net_grid) | (net_grid < lo - 1e-6) | (net_grid > hi + 1e-6)
        net_grid = error_if(net_grid, bad, f"net_grid must be finite times in [{lo}, {hi}]")
    g = concrete(grid)
    if g is None:  # the solver's grid: NaN there would make the interpolation NaN
        grid = error_if(grid, ~jnp.isfinite(grid), "network_time: the grid has non-finite values")
    elif not np.all(np.isfinite(g)):
        raise ValueError(f"network_time: the grid has non-finite values: {g.tolist()[:8]}")
    return _NetworkTime(denoiser, grid, net_grid, keep)
