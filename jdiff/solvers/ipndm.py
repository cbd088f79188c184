"""iPNDM: the improved pseudo linear multistep method (Zhang & Chen, "Fast Sampling of
Diffusion Models with Exponential Integrator", ICLR 2023, App. "iPNDM"; after Liu et
al., "Pseudo Numerical Methods for Diffusion Models on Manifolds", ICLR 2022).

PNDM's transfer step is DDIM with the noise prediction replaced by an Adams-Bashforth
combination of past predictions, ``eps' = (55 e0 - 59 e1 + 37 e2 - 9 e3) / 24``; iPNDM
warms up with the lower-order Adams-Bashforth formulas instead of Runge-Kutta steps, so
every step costs one model call. The coefficients are the fixed-step ones: they have
order k on grids uniform in ``rho = sigma / alpha`` and at most order 2 on smoothly
graded grids (logSNR, Karras). ``variable_step=True`` uses the exact variable-step
Adams-Bashforth weights in ``rho`` (k-diffusion's "iPNDM-v"; the same as rhoAB-DEIS),
which keep order k on any grid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdiff._core import ei_apply, ei_coefficients
from jdiff.solvers._base import (
    Solver,
    empty_state,
    evaluate,
    geometry_at,
    grid_curves,
    multistep_order,
    network_calls,
    row,
    settings_name,
    steps_of,
)

__all__ = ["IPNDM", "ipndm"]

_AB = {
    1: (1.0,),
    2: (3.0 / 2, -1.0 / 2),
    3: (23.0 / 12, -16.0 / 12, 5.0 / 12),
    4: (55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24),
}


@dataclasses.dataclass(frozen=True)
class IPNDM(Solver):
    """iPNDM of ``order`` 1-4 with the fixed-step Adams-Bashforth coefficients."""

    order: int = 4
    lower_order_final: bool = False

    padded_tables = True  # row i reads grid points 0..i+1 and steps_of(grid) only

    def __post_init__(self):
        if self.order not in _AB:
            raise ValueError(f"ipndm supports order 1 to 4, got {self.order!r}")

    @property
    def name(self) -> str:
        return settings_name(f"ipndm{self.order}", **({"lower_order_final": True} if self.lower_order_final else {}))

    @property
    def min_steps(self) -> int:
        return self.order

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        K = self.order
        ab = jnp.asarray([list(_AB[k]) + [0.0] * (K - k) for k in range(1, K + 1)])  # (K, K)
        state = empty_state(x_T, grid, hist_size=K, process=process)
        grid = state.grid
        N = grid.shape[0] - 1  # rows (the grid may be padded past its true length)
        num_steps = steps_of(grid)
        gc = grid_curves(process, grid)

        def one(i):
            p = multistep_order(gc.lam, i, self.order, num_steps, self.lower_order_final)
            first = ei_coefficients(geometry_at(gc.steps, i), mode="noise", K=0)
            # ring buffer: eps_{i-j} lives in slot (i - j) % K
            by_slot = jnp.zeros(K, grid.dtype).at[(i - jnp.arange(K)) % K].set(ab.astype(grid.dtype)[p - 1])
            return by_slot, first

        return state._replace(aux=jax.vmap(one)(jnp.arange(N)))

    def step(self, denoiser, state, cond=None):
        K = self.order
        x = state.x
        coeffs, first = row(state.aux, state.i)
        pred = evaluate(denoiser, x, state.grid[state.i], cond)
        # write first, then read only the updated buffer (XLA then updates it in place)
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, pred.eps, state.i % K, 0)
        eps_ab = sum(coeffs[k].astype(x.dtype) * hist[k] for k in range(K))
        x_next = ei_apply(first, x, [eps_ab], pred.x0)
        return state._replace(
            x=x_next, i=state.i + 1, pred=pred, hist=hist, nfe=state.nfe + network_calls(denoiser, state.grid[state.i])
        )


def ipndm(order: int = 4, *, variable_step: bool = False, lower_order_final: bool = False) -> Solver:
    """iPNDM of ``order`` 1-4 (one model call per step); see the module docstring."""
    if order not in _AB:
        raise ValueError(f"ipndm supports order 1 to 4, got {order!r}")
    if not variable_step:
        return IPNDM(order, lower_order_final)
    from jdiff.solvers._multistep import multistep
    from jdiff.solvers.deis import QuadratureWeights

    return multistep(
        order,
        mode="noise",
        weights=QuadratureWeights("rho"),
        lower_order_final=lower_order_final,
        name=settings_name(f"ipndm{order}-v", **({"lower_order_final": True} if lower_order_final else {})),
        max_order=4,
        min_steps=order,
    )
