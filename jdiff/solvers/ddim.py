"""DDIM (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, Eq. 12).

    x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z,   c = eta sigma_t sqrt(1 - e^{-2h})

``c`` is DDIM's ``sigma_t(eta)`` written for any process: ``sigma_t^2 (1 - e^{-2h})`` is the
variance of ``q(x_t | x_s, x0)``, so ``eta = 1`` is DDPM's ancestral sampler (Ho et al.
2020) and ``eta = 0`` the deterministic DDIM, which is also DPM-Solver-1 and
DPM-Solver++(1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff.solvers._base import Solver, empty_state, evaluate, grid_curves, row, step_noise

__all__ = ["ddim", "ddpm"]


class _Table(NamedTuple):
    a: jax.Array  # alpha_t
    keep: jax.Array  # sqrt(sigma_t^2 - c^2)
    c: jax.Array  # noise scale


def ddim(eta: float = 0.0) -> Solver:
    """DDIM with stochasticity ``eta`` in [0, 1] (``eta > 0`` needs a PRNG key)."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    stochastic = float(eta) > 0.0
    name = "ddim" if not stochastic else f"ddim(eta={eta:g})"

    def init(x_T, grid, process, *, key=None, nfe=None):
        del nfe
        if stochastic and key is None:
            raise ValueError(f"{name} is stochastic: pass a PRNG key")
        state = empty_state(x_T, grid, key=key if stochastic else None)
        g = grid_curves(process, state.grid).steps
        one_m = -jnp.expm1(-2.0 * jnp.where(g.finite, g.h, jnp.inf))  # 1 - e^{-2h}
        c = eta * g.sigma_t * jnp.sqrt(one_m)
        keep = g.sigma_t * jnp.sqrt(jnp.maximum(1.0 - eta**2 * one_m, 0.0))
        return state._replace(aux=_Table(g.alpha_t, keep, c))

    def step(denoiser, state, cond=None):
        x = state.x
        c = row(state.aux, state.i)
        pred = evaluate(denoiser, x, state.grid[state.i], cond)
        x_next = c.a * pred.x0 + c.keep * pred.eps
        if stochastic:
            x_next = x_next + c.c * step_noise(state)
        return state._replace(x=x_next.astype(x.dtype), i=state.i + 1, pred=pred, nfe=state.nfe + 1)

    return Solver(
        init=init,
        step=step,
        nfe=lambda n, to_data=False, from_noise=False: n,
        num_steps=lambda k, to_data=False, from_noise=False: k,
        order=1,
        stochastic=stochastic,
        name=name,
    )


def ddpm() -> Solver:
    """DDPM ancestral sampling (Ho et al., NeurIPS 2020): DDIM with ``eta = 1``."""
    return ddim(eta=1.0)
