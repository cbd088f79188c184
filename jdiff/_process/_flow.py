"""Flows: rectified flow / flow matching (``alpha = 1 - t``, ``sigma = t``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdiff._process._base import Process, _as_float, _register

__all__ = ["RectifiedFlow", "rectified_flow"]


@dataclasses.dataclass(frozen=True, repr=False)
class RectifiedFlow(Process):
    """Rectified flow / flow matching with the linear path ``alpha = 1 - t``,
    ``sigma = t`` (Liu et al., "Flow Straight and Fast", ICLR 2023; Lipman et al.,
    "Flow Matching for Generative Modeling", ICLR 2023). ``alpha(1) = 0``: the
    terminal SNR is zero, so models are parameterized by velocity, x0 or v."""

    t_min: float = 1e-3
    t_max: float = 1.0
    t_data: float | None = 0.0
    name: str = "rectified_flow"

    default_grid = "uniform"

    def log_alpha(self, t):
        return jnp.log1p(-_as_float(t))

    def log_sigma(self, t):
        return jnp.log(_as_float(t))

    def alpha(self, t):
        return 1.0 - _as_float(t)

    def sigma(self, t):
        return _as_float(t)

    def t_of_lambda(self, lam):
        # (1 - t) / t = e^lam  =>  t = sigmoid(-lam)
        return jax.nn.sigmoid(-_as_float(lam))


_register(RectifiedFlow)


def rectified_flow(t_min: float = 1e-3, t_max: float = 1.0) -> RectifiedFlow:
    """Rectified flow / linear flow matching (see :class:`RectifiedFlow`)."""
    return RectifiedFlow(t_min=t_min, t_max=t_max)
