"""Denoiser wrappers that compose like ``optax.chain``: each takes a denoiser and
returns one, acting on the ``(x0, eps)`` prediction at the boundary.

- :func:`static_threshold`: clip x0 to the data range (Ho et al., "Denoising Diffusion
  Probabilistic Models", 2020, sampling code; Saharia et al. 2022, Sec. 2.3).
- :func:`dynamic_threshold`: per sample, ``s = max(1, quantile(|x0|, p))`` and
  ``x0 <- clip(x0, -s, s) / s`` (Saharia et al., "Photorealistic Text-to-Image
  Diffusion Models with Deep Language Understanding" (Imagen), NeurIPS 2022, Sec. 2.3).
- :func:`time_shift`: the time-shift sampler's variance-matched model time (Li et al.,
  "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
  Steps", ICLR 2024): the network is evaluated at the time, within a window around the
  step's time, whose marginal variance best matches the current sample's.
- :func:`network_time`: decoupled network times (Tong et al., "Learning to Discretize
  Denoising Diffusion ODEs", ICLR 2025, the released code's second set of learned
  times): at the solver's grid time ``t_i`` the network is evaluated at ``s_i``.
- :func:`guidance`: classifier-free guidance ``p_u + w (p_c - p_u)`` (Ho & Salimans,
  "Classifier-Free Diffusion Guidance", 2021), with both passes in one batched call, and
  its variants (CFG rescale, guidance interval, APG), :func:`autoguidance`,
  :func:`classifier_guidance` and time-varying scales (:func:`schedule`): defined in
  :mod:`jdiff.guidance` and re-exported here.

After thresholding, eps is recomputed from x0 so that ``x = alpha x0 + sigma eps``
still holds; guidance combines x0 and eps alike, which keeps it too.

Wrappers are values: frozen dataclasses registered as pytrees whose static settings
(thresholds, quantiles) are metadata and whose arrays (the wrapped denoiser's
parameters, the guidance scale, the null conditioning) are leaves. Two wrappers built
with equal settings around equal denoisers are equal and hash alike (the hash covers
only the static part), and share one compiled sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import Prediction, broadcast_to_x
from jdiff.guidance import APG, InnerWrapper, autoguidance, classifier_guidance, guidance, schedule

__all__ = [
    "time_shift",
    "network_time",
    "static_threshold",
    "dynamic_threshold",
    "guidance",
    "autoguidance",
    "classifier_guidance",
    "schedule",
    "APG",
]


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


def _eps_from_x0(process, x, t, x0):
    a = broadcast_to_x(process.alpha(jnp.asarray(t, x.dtype)), x)
    s = broadcast_to_x(process.sigma(jnp.asarray(t, x.dtype)), x)
    return (x - a * x0) / s


@dataclasses.dataclass(frozen=True, eq=False)
class _Threshold(InnerWrapper):
    inner: Any
    kind: str
    lo: float = -1.0
    hi: float = 1.0
    quantile: float = 0.995
    max_value: float = float("inf")

    def __call__(self, x, t, cond=None) -> Prediction:
        p = self.inner(x, t, cond)
        if self.kind == "static":
            x0 = jnp.clip(p.x0, self.lo, self.hi)
        else:
            flat = jnp.abs(p.x0.reshape(p.x0.shape[0], -1))
            s = jnp.quantile(flat, self.quantile, axis=1)
            s = jnp.clip(s, 1.0, self.max_value).astype(p.x0.dtype)
            s = broadcast_to_x(s, p.x0)
            x0 = jnp.clip(p.x0, -s, s) / s
        return Prediction(x0, _eps_from_x0(self.process, x, t, x0).astype(p.eps.dtype))


jax.tree_util.register_dataclass(
    _Threshold, data_fields=["inner"], meta_fields=["kind", "lo", "hi", "quantile", "max_value"]
)


def static_threshold(denoiser, lo: float = -1.0, hi: float = 1.0):
    """Clip the x0 prediction to ``[lo, hi]``."""
    if not lo < hi:
        raise ValueError(f"need lo < hi, got {lo}, {hi}")
    return _Threshold(denoiser, "static", lo=float(lo), hi=float(hi))


def dynamic_threshold(denoiser, quantile: float = 0.995, max_value: float = float("inf")):
    """Imagen's dynamic thresholding with percentile ``quantile`` (``s`` clipped to
    ``[1, max_value]``; diffusers' ``sample_max_value``)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if not max_value >= 1.0:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    return _Threshold(denoiser, "dynamic", quantile=float(quantile), max_value=float(max_value))


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
    if not isinstance(net_grid, jax.core.Tracer):
        n = np.asarray(net_grid, np.float64)
        p = denoiser.process
        lo, hi = min(float(p.t_min), float(getattr(p, "t_data", p.t_min))), float(p.t_max)
        if not np.all(np.isfinite(n)) or n.min() < lo - 1e-6 or n.max() > hi + 1e-6:
            raise ValueError(f"net_grid must be finite times in [{lo}, {hi}], got {n.tolist()}")
    return _NetworkTime(denoiser, grid, net_grid, keep)
