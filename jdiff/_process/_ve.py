"""Variance-exploding processes: the VE-SDE and EDM (``alpha = 1``)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jdiff._process._base import Process, _as_float, _register

__all__ = ["VE", "EDM", "ve", "edm"]


@dataclasses.dataclass(frozen=True, repr=False)
class VE(Process):
    """Variance-exploding process ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max /
    sigma_min)^t`` (Song et al., ICLR 2021). It never reaches ``sigma = 0``, so
    ``t_data`` is ``None``: finish with ``denoise_to_zero=True`` to jump to x0."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0
    t_data: float | None = None
    name: str = "ve"

    default_grid = "karras"

    def log_alpha(self, t):
        return jnp.zeros_like(_as_float(t))

    def log_sigma(self, t):
        t = _as_float(t)
        return math.log(self.sigma_min) + t * math.log(self.sigma_max / self.sigma_min)

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        return (-lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True, repr=False)
class EDM(Process):
    """The EDM / Karras process ``alpha = 1``, ``sigma = t`` (Karras et al.,
    "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022),
    on ``[sigma_min, sigma_max] = [0.002, 80]``; ``t = 0`` is the data."""

    t_min: float = 0.002
    t_max: float = 80.0
    t_data: float | None = 0.0
    sigma_data: float = 0.5
    name: str = "edm"

    default_grid = "karras"

    def log_alpha(self, t):
        return jnp.zeros_like(_as_float(t))

    def log_sigma(self, t):
        return jnp.log(_as_float(t))

    def alpha(self, t):
        return jnp.ones_like(_as_float(t))

    def sigma(self, t):
        return _as_float(t)

    def t_of_lambda(self, lam):
        return jnp.exp(-_as_float(lam))


_register(VE)
_register(EDM)


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> VE:
    """The VE-SDE (see :class:`VE`)."""
    return VE(sigma_min=sigma_min, sigma_max=sigma_max)


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> EDM:
    """The EDM process ``sigma = t`` (see :class:`EDM`)."""
    return EDM(t_min=sigma_min, t_max=sigma_max, sigma_data=sigma_data)
