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

from jdiff._param import Prediction, broadcast_to_x
from jdiff.guidance import APG, InnerWrapper, autoguidance, classifier_guidance, guidance, schedule

__all__ = [
    "time_shift",
    "static_threshold",
    "dynamic_threshold",
    "guidance",
    "autoguidance",
    "classifier_guidance",
    "schedule",
    "APG",
]


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
        p = self.inner(x, ts, cond)
        # the network's noise estimate, used as the prediction at the step's own time
        a = broadcast_to_x(self.process.alpha(jnp.asarray(t, x.dtype)), x)
        s = broadcast_to_x(self.process.sigma(jnp.asarray(t, x.dtype)), x)
        x0 = jnp.where(a > 0, (x - s * p.eps) / jnp.where(a > 0, a, 1.0), p.x0)
        return Prediction(x0.astype(p.x0.dtype), p.eps)


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
