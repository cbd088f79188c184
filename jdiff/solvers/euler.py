"""Euler and Heun on the probability-flow ODE, Euler-Maruyama on the reverse SDE.

The probability-flow ODE of ``x_t = alpha x0 + sigma eps`` is ``dx/dt = alpha'(t) x0 +
sigma'(t) eps`` (Song et al., ICLR 2021, Eq. 13, rewritten with the denoiser), which
for rectified flow is the flow-matching velocity ``eps - x0``.

``time="t"`` steps in the process's own time (k-diffusion's samplers for the EDM
process, the flow-matching Euler sampler for rectified flow). ``time="rho"`` steps in
EDM's scaled variables ``x / alpha`` against ``rho = sigma / alpha`` (Karras et al.,
NeurIPS 2022, Sec. 3 and Algorithm 1), where Euler is exactly DDIM. Heun skips its
correction on a step into ``sigma = 0`` (Algorithm 1, line 9), spending one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff._core import ei_step
from jdiff.solvers._base import Solver, empty_state, evaluate, step_geometry, step_noise

__all__ = ["euler", "heun", "euler_maruyama"]


def _check_time(time):
    if time not in ("t", "rho"):
        raise ValueError(f"time must be 't' or 'rho', got {time!r}")


def _velocity(process, t, pred):
    return process.d_alpha(t) * pred.x0 + process.d_sigma(t) * pred.eps


def euler(time: str = "t") -> Solver:
    """Euler's method on the probability-flow ODE (first order, one call per step)."""
    _check_time(time)

    def init(x_T, grid, key=None, nfe=None):
        return empty_state(x_T, grid)

    def step(denoiser, state, cond=None):
        x = state.x
        s, t, g = step_geometry(denoiser, state)
        pred = evaluate(denoiser, x, s, cond)
        if time == "t":
            x_next = x + ((t - s) * _velocity(denoiser.process, s, pred)).astype(x.dtype)
            # a step into sigma = 0 is exactly x0 (the Euler step's own limit for linear paths)
            x_next = jnp.where(g.finite, x_next, ei_step(x, g, pred.x0))
        else:
            x_next = ei_step(x, g, pred.eps, mode="noise", x0=pred.x0)
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=state.nfe + 1)

    return Solver(init=init, step=step, nfe=lambda n, to_data=False: n, num_steps=lambda k, to_data=False: k,
                  order=1, stochastic=False, name=f"euler({time})")


def heun(time: str = "t") -> Solver:
    """Heun's second-order method (EDM's deterministic sampler): two calls per step, one
    on a step into ``sigma = 0``."""
    _check_time(time)

    def init(x_T, grid, key=None, nfe=None):
        return empty_state(x_T, grid)

    def step(denoiser, state, cond=None):
        process = denoiser.process
        x = state.x
        s, t, g = step_geometry(denoiser, state)
        pred = evaluate(denoiser, x, s, cond)
        if time == "t":
            d_s = _velocity(process, s, pred)
            x_e = x + ((t - s) * d_s).astype(x.dtype)

            def correct():
                p2 = evaluate(denoiser, x_e, t, cond)
                return x + ((t - s) * 0.5 * (d_s + _velocity(process, t, p2))).astype(x.dtype), jnp.int32(1)

            def final():
                return ei_step(x, g, pred.x0), jnp.int32(0)
        else:
            x_e = ei_step(x, g, pred.eps, mode="noise", x0=pred.x0)

            def correct():
                p2 = evaluate(denoiser, x_e, t, cond)
                eps_avg = 0.5 * (pred.eps + p2.eps)
                return ei_step(x, g, eps_avg, mode="noise", x0=pred.x0), jnp.int32(1)

            def final():
                return ei_step(x, g, pred.x0), jnp.int32(0)

        # no correction into sigma = 0 (or out of alpha = 0): one model call there
        x_next, extra = jax.lax.cond(g.finite, correct, final)
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=state.nfe + 1 + extra)

    def nfe(num_steps, to_data=False):
        return 2 * num_steps - (1 if to_data else 0)

    def num_steps(nfe, to_data=False):
        return max(1, (nfe + (1 if to_data else 0)) // 2)

    return Solver(init=init, step=step, nfe=nfe, num_steps=num_steps, order=2, stochastic=False,
                  name=f"heun({time})")


def euler_maruyama() -> Solver:
    """Euler-Maruyama on the reverse-time SDE ``dx = [f x - g^2 score] dt + g dW``
    (Anderson 1982; Song et al., ICLR 2021), with ``f = d log alpha/dt``,
    ``g^2 = -2 sigma^2 d lambda/dt`` and ``score = -eps / sigma``. Strong order 1/2.

    A step with infinite log-SNR increment (out of ``alpha = 0`` or into ``sigma = 0``)
    takes the exact first-order limit ``alpha_t x0 + sigma_t z``, so zero-terminal-SNR
    processes are finite and the last step into the data adds no noise.
    """

    def init(x_T, grid, key=None, nfe=None):
        if key is None:
            raise ValueError("euler_maruyama is stochastic: pass a PRNG key")
        return empty_state(x_T, grid, key=key)

    def step(denoiser, state, cond=None):
        process = denoiser.process
        x = state.x
        dt = x.dtype
        s, t, g = step_geometry(denoiser, state)
        pred = evaluate(denoiser, x, s, cond)
        z = step_noise(state)
        fin = g.finite
        s_safe = jnp.where(fin, s, state.grid[0] * 0 + process.t_min)
        f = process.drift_coef(s_safe)
        g2 = process.diffusion2(s_safe)
        sig_s = process.sigma(s_safe)
        dtime = t - s
        drift = f * x + (g2 / sig_s) * pred.eps
        x_em = x + (dtime * drift).astype(dt) + (jnp.sqrt(jnp.maximum(g2 * -dtime, 0.0))).astype(dt) * z
        x_lim = ei_step(x, g, pred.x0, mode="sde_data") + g.sigma_t.astype(dt) * z
        x_next = jnp.where(fin, x_em, x_lim)
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=state.nfe + 1)

    return Solver(init=init, step=step, nfe=lambda n, to_data=False: n, num_steps=lambda k, to_data=False: k,
                  order=1, stochastic=True, name="euler_maruyama")
