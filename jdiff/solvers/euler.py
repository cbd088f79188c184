"""Euler and Heun on the probability-flow ODE, Euler-Maruyama on the reverse SDE.

The probability-flow ODE of ``x_t = alpha x0 + sigma eps`` is ``dx/dt = alpha'(t) x0 +
sigma'(t) eps`` (Song et al., ICLR 2021, Eq. 13, rewritten with the denoiser), which
for rectified flow is the flow-matching velocity ``eps - x0``.

``time="t"`` steps in the process's own time (k-diffusion's samplers for the EDM
process, the flow-matching Euler sampler for rectified flow). ``time="rho"`` steps in
EDM's scaled variables ``x / alpha`` against ``rho = sigma / alpha`` (Karras et al.,
NeurIPS 2022, Sec. 3 and Algorithm 1), where Euler is exactly DDIM. Heun skips its
correction on a step into ``sigma = 0`` (Algorithm 1, line 9), spending one call.

In ``t`` the velocity is finite wherever the model is evaluated (``sigma > 0``), also at
``alpha = 0`` (zero terminal SNR), so Euler and Heun need no special case there; the
``rho`` forms divide by ``alpha`` and take the shared exact first-order limit on steps
with infinite log-SNR increment (see :mod:`jdiff._core`).

Euler takes the guidance options of :class:`~jdiff.solvers.ddim.DDIM`: with
``cfgpp=True`` (CFG++, Chung et al., 2024) the step starts from the renoised point
``alpha_s x0_guided + sigma_s eps_uncond`` and moves along ``alpha' x0_guided + sigma'
eps_uncond``, i.e. it lands on ``(alpha_s + dt alpha'_s) x0_guided + (sigma_s + dt
sigma'_s) eps_uncond`` (in ``rho`` on ``alpha_t x0_guided + sigma_t eps_uncond``, the
paper's Euler/EDM form); ``guidance_memory=True`` carries APG's momentum.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff._core import EICoef, ei_apply, ei_coefficients
from jdiff.solvers._base import (
    Solver,
    check_key,
    empty_state,
    evaluate,
    grid_curves,
    guided_evaluate,
    network_calls,
    row,
    settings_name,
    step_noise,
)

__all__ = ["Euler", "Heun", "EulerMaruyama", "euler", "heun", "euler_maruyama"]


class _TTable(NamedTuple):
    dt: jax.Array  # t - s
    da_s: jax.Array
    ds_s: jax.Array
    da_t: jax.Array
    ds_t: jax.Array
    finite: jax.Array  # finite log-SNR increment (rho forms)
    correct: jax.Array  # sigma_t > 0: Heun may evaluate the model at t
    first: EICoef  # the first-order exponential step (the rho forms, via noise mode)
    a_s: jax.Array  # alpha(s), sigma(s): CFG++ renoising
    s_s: jax.Array


def _check_time(time):
    if time not in ("t", "rho"):
        raise ValueError(f"time must be 't' or 'rho', got {time!r}")


def _t_table(process, grid):
    g = grid_curves(process, grid).steps
    s, t = grid[:-1], grid[1:]
    first = jax.vmap(lambda gi: ei_coefficients(gi, mode="noise", K=0))(g)
    t_safe = jnp.where(g.log_sigma_t > -jnp.inf, t, s)  # sigma'(t) may be infinite at sigma = 0 (VP)
    return _TTable(
        t - s,
        process.d_alpha(s),
        process.d_sigma(s),
        process.d_alpha(t_safe),
        process.d_sigma(t_safe),
        g.finite,
        g.log_sigma_t > -jnp.inf,
        first,
        jnp.exp(g.log_alpha_s),
        jnp.exp(g.log_sigma_s),
    )


@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    """Euler's method on the probability-flow ODE (first order, one call per step);
    ``cfgpp`` and ``guidance_memory`` as in :class:`~jdiff.solvers.ddim.DDIM`."""

    time: str = "t"
    cfgpp: bool = False
    guidance_memory: bool = False

    order = 1
    padded_tables = True  # every row reads its own step s -> t only
    supports_adjoint = True  # (with cfgpp / guidance_memory Adjoint refuses the path)

    def __post_init__(self):
        _check_time(self.time)
        for k in ("cfgpp", "guidance_memory"):
            if not isinstance(getattr(self, k), bool):
                raise TypeError(f"{k} must be True or False, got {getattr(self, k)!r}")

    @property
    def name(self) -> str:
        flags = {k: True for k in ("cfgpp", "guidance_memory") if getattr(self, k)}
        return settings_name("euler" if self.time == "t" else f"euler-{self.time}", **flags)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = empty_state(x_T, grid, hist_size=int(self.guidance_memory), process=process)
        return state._replace(aux=_t_table(process, state.grid))

    def step(self, denoiser, state, cond=None):
        x = state.x
        c = row(state.aux, state.i)
        t = state.grid[state.i]
        pred, eps, hist = guided_evaluate(self, denoiser, state, t, cond)
        if self.cfgpp:  # CFG++: move from the point renoised with the unguided eps
            x = (c.a_s * pred.x0 + c.s_s * eps).astype(x.dtype)
        if self.time == "t":
            x_next = x + c.dt * (c.da_s * pred.x0 + c.ds_s * eps)
        else:
            x_next = ei_apply(c.first, x, [eps], pred.x0)
        nfe = state.nfe + network_calls(denoiser, t)
        return state._replace(x=x_next.astype(x.dtype), i=state.i + 1, pred=pred, hist=hist, nfe=nfe)


@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """Heun's second-order method (EDM's deterministic sampler): two calls per step, one
    on a step into ``sigma = 0`` (and, in rho, out of ``alpha = 0``)."""

    time: str = "t"

    order = 2
    padded_tables = True  # every row reads its own step s -> t only
    supports_adjoint = True

    def __post_init__(self):
        _check_time(self.time)

    @property
    def name(self) -> str:
        return "heun" if self.time == "t" else f"heun-{self.time}"

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = empty_state(x_T, grid, process=process)
        return state._replace(aux=_t_table(process, state.grid))

    def step(self, denoiser, state, cond=None):
        x = state.x
        c = row(state.aux, state.i)
        t = state.grid[state.i + 1]
        pred = evaluate(denoiser, x, state.grid[state.i], cond)
        if self.time == "t":
            d_s = c.da_s * pred.x0 + c.ds_s * pred.eps
            x_e = x + c.dt * d_s

            def correct():
                p2 = evaluate(denoiser, x_e, t, cond)
                d_t = c.da_t * p2.x0 + c.ds_t * p2.eps
                return (x + 0.5 * c.dt * (d_s + d_t)).astype(x.dtype), network_calls(denoiser, t)

            def final():
                return x_e.astype(x.dtype), jnp.int32(0)

            do_correct = c.correct
        else:
            x_e = ei_apply(c.first, x, [pred.eps], pred.x0)

            def correct():
                p2 = evaluate(denoiser, x_e, t, cond)
                return ei_apply(c.first, x, [0.5 * (pred.eps + p2.eps)], pred.x0), network_calls(denoiser, t)

            def final():
                return x_e, jnp.int32(0)

            do_correct = c.finite

        # no correction into sigma = 0 (nor, in rho, out of alpha = 0): one model call there
        x_next, extra = jax.lax.cond(do_correct, correct, final)
        nfe = state.nfe + network_calls(denoiser, state.grid[state.i]) + extra
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=nfe)

    def _single(self, to_data, from_noise):
        return int(to_data) + int(from_noise and self.time == "rho")

    def nfe(self, num_steps, to_data=False, from_noise=False):
        return 2 * num_steps - min(num_steps, self._single(to_data, from_noise))

    def num_steps(self, nfe, to_data=False, from_noise=False):
        return max(1, (nfe + self._single(to_data, from_noise)) // 2)


def euler(time: str = "t", *, cfgpp: bool = False, guidance_memory: bool = False) -> Euler:
    """Euler's method on the probability-flow ODE (first order, one call per step).

    Args:
      time: ``"t"`` (the process's time) or ``"rho"`` (EDM's variables; then DDIM).
      cfgpp: CFG++ (Chung et al., 2024; see the module docstring).
      guidance_memory: carry the guidance wrapper's state across steps (APG momentum).

    Raises:
      ValueError: an unknown ``time``. TypeError: a flag that is not a bool.
    """
    return Euler(time, cfgpp, guidance_memory)


def heun(time: str = "t") -> Heun:
    """Heun's second-order method (EDM's deterministic sampler): two calls per step, one
    on a step into ``sigma = 0``."""
    return Heun(time)


class _EMTable(NamedTuple):
    dt: jax.Array
    f: jax.Array  # drift coefficient d log alpha / dt at s
    g2_over_sigma: jax.Array
    noise: jax.Array  # g(s) sqrt(s - t)
    finite: jax.Array
    limit: EICoef  # first-order SDE step for infinite h
    limit_noise: jax.Array


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse-time SDE ``dx = [f x - g^2 score] dt + g dW``
    (Anderson 1982; Song et al., ICLR 2021), with ``f = d log alpha/dt``,
    ``g^2 = -2 sigma^2 d lambda/dt`` and ``score = -eps / sigma``. Strong order 1/2.

    A step with infinite log-SNR increment (out of ``alpha = 0`` or into ``sigma = 0``)
    takes the exact first-order limit ``alpha_t x0 + sigma_t z``, so zero-terminal-SNR
    processes are finite and the last step into the data adds no noise.
    """

    order = 1
    stochastic = True
    name = "euler-maruyama"
    padded_tables = True  # every row reads its own step s -> t only

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        check_key(self, key)
        state = empty_state(x_T, grid, key=key, process=process)
        grid = state.grid
        g = grid_curves(process, grid).steps
        s = jnp.where(g.finite, grid[:-1], process.t_min)  # keep the unused branch finite
        dt = grid[1:] - grid[:-1]
        g2 = process.diffusion2(s)
        limit = jax.vmap(lambda gi: ei_coefficients(gi, mode="sde_data", K=0))(g)
        tab = _EMTable(
            dt,
            process.drift_coef(s),
            g2 / process.sigma(s),
            jnp.sqrt(jnp.maximum(-g2 * dt, 0.0)),
            g.finite,
            limit,
            g.sigma_t,
        )
        return state._replace(aux=tab)

    def step(self, denoiser, state, cond=None):
        x = state.x
        c = row(state.aux, state.i)
        pred = evaluate(denoiser, x, state.grid[state.i], cond)
        z = step_noise(state)
        x_em = x + c.dt * (c.f * x + c.g2_over_sigma * pred.eps) + c.noise * z
        x_lim = ei_apply(c.limit, x, [pred.x0]) + c.limit_noise * z
        x_next = jnp.where(c.finite, x_em, x_lim).astype(x.dtype)
        nfe = state.nfe + network_calls(denoiser, state.grid[state.i])
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=nfe)


def euler_maruyama() -> EulerMaruyama:
    """Euler-Maruyama on the reverse-time SDE (see :class:`EulerMaruyama`)."""
    return EulerMaruyama()
