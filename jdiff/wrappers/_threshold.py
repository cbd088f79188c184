"""Thresholding of the x0 prediction: static (Ho et al., 2020) and dynamic (Imagen,
Saharia et al., NeurIPS 2022, Sec. 2.3). eps is recomputed from the clipped x0 so that
``x = alpha x0 + sigma eps`` still holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jdiff._param import Prediction, broadcast_to_x
from jdiff.wrappers._base import InnerWrapper

__all__ = ["static_threshold", "dynamic_threshold"]


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
