"""DPM-Solver and DPM-Solver++ (singlestep and multistep), and SDE-DPM-Solver++.

- DPM-Solver-1/2/3 (Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion
  Probabilistic Model Sampling in Around 10 Steps", NeurIPS 2022, Algorithms 1-2):
  singlestep, noise prediction, intermediate points at ``r1 = 1/2`` (order 2) or
  ``r1 = 1/3, r2 = 2/3`` (order 3) of the logSNR step.
- DPM-Solver++(2S), (2M), (3M) (Lu et al., "DPM-Solver++: Fast Solver for Guided
  Sampling of Diffusion Probabilistic Models", 2022, Algorithms 1-2 and App.):
  the same in data prediction; multistep reuses past outputs (one call per step).
- SDE-DPM-Solver++(1/2M) (ibid., Sec. 5 and App. B): the reverse SDE integrated
  with the data-prediction exponential integrator.

``solver_type="midpoint"`` is the papers' (and diffusers') default first-difference
form; ``"heun"`` uses the exact ``phi_2`` coefficient. Both reduce to the core in
:mod:`jdiff._core` (coefficient variants ``"bh2"`` and ``"exact"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff._core import ei_step, geometry
from jdiff.solvers._base import Solver, empty_state, evaluate, order_schedule, step_geometry
from jdiff.solvers._multistep import multistep

__all__ = ["dpm_solver", "dpm_solver_pp", "sde_dpm_solver_pp"]

_TYPES = {"midpoint": "bh2", "heun": "exact"}


def _solver_type(solver_type):
    if solver_type not in _TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
    return _TYPES[solver_type]


def _singlestep(order: int, mode: str, coef: str, lower_order_final: bool, name: str) -> Solver:
    if order not in (1, 2, 3):
        raise ValueError(f"{name} supports order 1, 2 or 3, got {order!r}")

    def init(x_T, grid, key=None, nfe=None):
        del key
        n = jnp.asarray(grid).shape[0] - 1
        orders = order_schedule(order, n, nfe, lower_order_final=lower_order_final)
        return empty_state(x_T, grid, aux=jnp.asarray(orders, jnp.int32))

    def step(denoiser, state, cond=None):
        process = denoiser.process
        x = state.x
        dt = x.dtype
        s, t, g = step_geometry(denoiser, state)
        pred = evaluate(denoiser, x, s, cond)
        m = pred.eps if mode == "noise" else pred.x0
        pick = (lambda p: p.eps) if mode == "noise" else (lambda p: p.x0)

        def sub(r):
            t_r = process.t_of_lambda(g.lam_s + r * g.h_safe).astype(dt)
            return t_r, geometry(process, s, t_r, dt)

        def o1():
            return ei_step(x, g, m, mode=mode, x0=pred.x0), jnp.int32(0)

        def o2():
            r1 = 0.5
            s1, g1 = sub(r1)
            u1 = ei_step(x, g1, m, mode=mode, x0=pred.x0)
            m1 = pick(evaluate(denoiser, u1, s1, cond))
            r = jnp.full((1,), r1, dt)
            return ei_step(x, g, m, (m1 - m)[None], r, 1, mode=mode, coef=coef, x0=pred.x0), jnp.int32(1)

        def o3():
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            s1, g1 = sub(r1)
            s2, g2 = sub(r2)
            u1 = ei_step(x, g1, m, mode=mode, x0=pred.x0)
            m1 = pick(evaluate(denoiser, u1, s1, cond))
            u2 = ei_step(x, g2, m, (m1 - m)[None], jnp.full((1,), r1 / r2, dt), 1, mode=mode, coef="exact", x0=pred.x0)
            m2 = pick(evaluate(denoiser, u2, s2, cond))
            return ei_step(x, g, m, (m2 - m)[None], jnp.full((1,), r2, dt), 1, mode=mode, coef="exact", x0=pred.x0), jnp.int32(2)

        k = jnp.where(g.finite, state.aux[state.i], 1)
        branches = [o1, o2, o3][:order]
        if order == 1:
            x_next, extra = o1()
        else:
            x_next, extra = jax.lax.switch(k - 1, branches)
        return state._replace(x=x_next, i=state.i + 1, pred=pred, nfe=state.nfe + 1 + extra)

    def nfe(num_steps, to_data=False):
        orders = order_schedule(order, num_steps, None, lower_order_final=lower_order_final)
        if to_data:
            orders[-1] = 1
        return sum(orders)

    def num_steps(nfe, to_data=False):
        del to_data
        return -(-nfe // order)

    return Solver(init=init, step=step, nfe=nfe, num_steps=num_steps, order=order, stochastic=False,
                  name=name, min_steps=1)


def dpm_solver(order: int = 3, *, method: str = "singlestep", solver_type: str = "midpoint",
               lower_order_final: bool = True) -> Solver:
    """DPM-Solver with noise prediction.

    Args:
      order: 1, 2 or 3.
      method: ``"singlestep"`` (the paper's DPM-Solver-k, ``k`` calls per step) or
        ``"multistep"`` (one call per step, reusing past outputs).
      solver_type: ``"midpoint"`` or ``"heun"`` (the order-2 difference coefficient).
      lower_order_final: lower the order on the last steps of short grids; for
        singlestep, only when no target NFE fixes the orders.
    """
    coef = _solver_type(solver_type)
    if method == "singlestep":
        return _singlestep(order, "noise", coef, lower_order_final, f"dpm_solver-{order}")
    if method == "multistep":
        return multistep(order, mode="noise", coef=coef, lower_order_final=lower_order_final,
                         name=f"dpm_solver-{order}M")
    raise ValueError(f"unknown method {method!r}; expected 'singlestep' or 'multistep'")


def dpm_solver_pp(order: int = 2, *, method: str = "multistep", solver_type: str = "midpoint",
                  lower_order_final: bool = True) -> Solver:
    """DPM-Solver++ with data prediction: ``(2M)``/``(3M)`` for ``method="multistep"``
    (the default, as in diffusers) and ``(2S)``/3S for ``"singlestep"``."""
    coef = _solver_type(solver_type)
    if method == "multistep":
        return multistep(order, mode="data", coef=coef, lower_order_final=lower_order_final,
                         name=f"dpm_solver++({order}M)")
    if method == "singlestep":
        return _singlestep(order, "data", coef, lower_order_final, f"dpm_solver++({order}S)")
    raise ValueError(f"unknown method {method!r}; expected 'singlestep' or 'multistep'")


def sde_dpm_solver_pp(order: int = 2, *, solver_type: str = "midpoint", lower_order_final: bool = True) -> Solver:
    """SDE-DPM-Solver++(1) or (2M): multistep, data prediction, stochastic (needs a key).
    Order 1 is DDPM ancestral sampling, i.e. DDIM with ``eta = 1``."""
    return multistep(order, mode="sde_data", coef=_solver_type(solver_type), lower_order_final=lower_order_final,
                     name=f"sde_dpm_solver++({order}M)", max_order=2)
