"""The multistep engine behind DDIM-order-1, DPM-Solver(++) multistep, SDE-DPM-Solver++,
DEIS and UniPC.

One model call per step. The step evaluates the model at ``(x_i, t_i)``, optionally
corrects ``x_i`` with UniPC's UniC corrector using that new output (no extra call),
pushes the output into the history and takes an exponential-integrator predictor step
whose polynomial goes through up to ``order`` most recent outputs.

Warm-up is data, not Python control flow: the effective order is
``min(order, usable history)``, with history entries at infinite log-SNR (a start at
zero terminal SNR) not usable, and ``lower_order_final`` lowers the order on the last
steps of short grids (fewer than 15 steps), as in diffusers.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff._core import ei_step, ei_step_weights, ei_weights, geometry
from jdiff.solvers._base import (
    Solver,
    empty_state,
    evaluate,
    push,
    step_geometry,
    step_noise,
    valid_history,
)

__all__ = ["multistep"]


def _check_order(order, allowed, name):
    if order not in allowed:
        raise ValueError(f"{name} supports order in {tuple(allowed)}, got {order!r}")


def multistep(
    order: int,
    *,
    mode: str,
    coef: str = "exact",
    corrector: str | None = None,
    lower_order_final: bool = True,
    weights=None,
    name: str = "multistep",
    max_order: int = 3,
) -> Solver:
    """Build a multistep exponential-integrator solver.

    Args:
      order: polynomial order of the predictor (1 to ``max_order``).
      mode: ``"data"`` (x0 prediction), ``"noise"`` (eps prediction) or ``"sde_data"``
        (SDE-DPM-Solver++; stochastic).
      coef: coefficient variant for the predictor (``"exact"``, ``"bh1"``, ``"bh2"``).
      corrector: None, or the coefficient variant of a UniC corrector.
      lower_order_final: lower the order on the last steps of grids shorter than 15.
      weights: optional ``(process, geometry, s, lam_nodes, q, dtype) -> w`` replacing
        the closed-form weights (tAB-DEIS).
    """
    _check_order(order, range(1, max_order + 1), name)
    K = order  # history: the current output and order - 1 past ones
    stochastic = mode == "sde_data"
    use_corr = corrector is not None

    def init(x_T, grid, key=None, nfe=None):
        del nfe
        if stochastic and key is None:
            raise ValueError(f"{name} is stochastic: pass a PRNG key")
        return empty_state(x_T, grid, hist_size=K, key=key if stochastic else None, x_prev=use_corr,
                           aux=jnp.zeros((), jnp.int32))

    def _weights(process, g, s, lam_nodes, q, dtype):
        if weights is None:
            r = (lam_nodes - g.lam_s) / g.h_safe
            z = {"data": -g.h_safe, "noise": g.h_safe, "sde_data": -2.0 * g.h_safe}[mode]
            return r, ei_weights(r, jnp.where(g.finite, q, 0), z, coef)
        return None, weights(process, g, s, lam_nodes, q, dtype)

    def step(denoiser, state, cond=None):
        process = denoiser.process
        x, i, grid = state.x, state.i, state.grid
        N = grid.shape[0] - 1
        s, t, g = step_geometry(denoiser, state)
        pred = evaluate(denoiser, x, s, cond)
        m = pred.eps if mode == "noise" else pred.x0

        if use_corr:
            # UniC: redo the previous step x_{i-1} -> x_i with the new output as a node at r = 1.
            s_prev = grid[jnp.maximum(i - 1, 0)]
            gp = geometry(process, s_prev, s, x.dtype)
            m0p = state.hist[0]
            D = jnp.concatenate([(m - m0p)[None], state.hist[1:] - m0p], axis=0)
            r = jnp.concatenate([jnp.ones((1,), x.dtype), (state.hist_lam[1:] - state.hist_lam[0]) / gp.h_safe])
            xc = ei_step(state.x_prev, gp, m0p, D, r, q=state.aux, mode=mode, coef=corrector, x0=m0p)
            x = jnp.where((i > 0) & gp.finite, xc, x)

        hist, hist_lam = push(state.hist, state.hist_lam, m, g.lam_s)
        p = jnp.clip(jnp.minimum(order, valid_history(hist_lam)), 1, order)
        if lower_order_final and N < 15:
            p = jnp.minimum(p, N - i)
        p = p.astype(jnp.int32)

        D = hist[1:] - m
        lam_nodes = hist_lam[1:]
        if K > 1:
            _, w = _weights(process, g, s, lam_nodes, p - 1, x.dtype)
            x_next = ei_step_weights(x, g, m, D, w, p - 1, mode=mode, x0=pred.x0)
        else:
            x_next = ei_step(x, g, m, mode=mode, x0=pred.x0)
        if stochastic:
            noise_std = g.sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * jnp.where(g.finite, g.h, jnp.inf)))
            x_next = x_next + noise_std.astype(x.dtype) * step_noise(state)
        return state._replace(
            x=x_next, i=i + 1, pred=pred, hist=hist, hist_lam=hist_lam,
            x_prev=x if use_corr else None, nfe=state.nfe + 1, aux=p,
        )

    def nfe(num_steps, to_data=False):
        del to_data
        return num_steps

    def num_steps(nfe, to_data=False):
        del to_data
        return nfe

    return Solver(init=init, step=step, nfe=nfe, num_steps=num_steps, order=order,
                  stochastic=stochastic, name=name, min_steps=1)
