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

``afs=True`` is the analytic first step (AFS; Zhou et al., "Fast ODE-based Sampling for
Diffusion Models in Around 5 Steps", CVPR 2024, Sec. 4): the first step uses the noise
estimate ``eps = x_T / sqrt(alpha^2 + sigma^2)`` (``x_T`` scaled to unit variance per
entry, as for unit-variance data) instead of a model call, which saves one call; that
estimate also seeds the Adams-Bashforth history. It needs ``alpha > 0`` at the start.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdiff._checks import concrete
from jdiff._core import ei_apply, ei_coefficients
from jdiff._param import Prediction
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
from jdiff.solvers._multistep import multistep
from jdiff.solvers.deis import QuadratureWeights

__all__ = ["IPNDM", "ipndm"]

_AB = {
    1: (1.0,),
    2: (3.0 / 2, -1.0 / 2),
    3: (23.0 / 12, -16.0 / 12, 5.0 / 12),
    4: (55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24),
}


@dataclasses.dataclass(frozen=True)
class IPNDM(Solver):
    """iPNDM of ``order`` 1-4 with the fixed-step Adams-Bashforth coefficients
    (``afs``: the analytic first step, see the module docstring)."""

    order: int = 4
    lower_order_final: bool = False
    afs: bool = False

    padded_tables = True  # row i reads grid points 0..i+1 and steps_of(grid) only

    @property
    def supports_adjoint(self) -> bool:
        return not self.afs  # the analytic first step is not a step of the ODE

    def __post_init__(self):
        if self.order not in _AB:
            raise ValueError(f"ipndm supports order 1 to 4, got {self.order!r}")
        if not isinstance(self.afs, bool):
            raise TypeError(f"afs must be True or False, got {self.afs!r}")

    @property
    def name(self) -> str:
        extra = ({"lower_order_final": True} if self.lower_order_final else {}) | ({"afs": True} if self.afs else {})
        return settings_name(f"ipndm{self.order}", **extra)

    def nfe(self, num_steps, to_data=False, from_noise=False) -> int:
        return num_steps - int(self.afs)

    def num_steps(self, nfe, to_data=False, from_noise=False) -> int:
        return nfe + int(self.afs)

    def check_inputs(self, process, grid, x_T) -> None:
        """AFS needs ``alpha > 0`` at the grid's start (its x0 is ``(x - sigma eps) / alpha``)."""
        if not self.afs:
            return
        g = concrete(grid)
        if g is not None:
            with jax.ensure_compile_time_eval():
                a0 = float(process.alpha(jnp.asarray(g[0], jnp.float32)))
            if a0 <= 0.0:
                raise ValueError(
                    f"{self.name}: the analytic first step needs alpha > 0 at the start, got alpha({g[0]}) = {a0} "
                    "(zero terminal SNR): use afs=False"
                )

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
        t = state.grid[state.i]
        calls = network_calls(denoiser, t)
        if self.afs:
            # the analytic first step: no model call at i = 0 (lax.cond runs one branch)
            def analytic():
                a, s = denoiser.process.alpha(t).astype(x.dtype), denoiser.process.sigma(t).astype(x.dtype)
                eps = x / jnp.sqrt(a * a + s * s)
                return Prediction((x - s * eps) / a, eps)

            pred = jax.lax.cond(state.i == 0, analytic, lambda: evaluate(denoiser, x, t, cond))
            calls = jnp.where(state.i == 0, 0, calls)
        else:
            pred = evaluate(denoiser, x, t, cond)
        # write first, then read only the updated buffer (XLA then updates it in place)
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, pred.eps, state.i % K, 0)
        eps_ab = sum(coeffs[k].astype(x.dtype) * hist[k] for k in range(K))
        x_next = ei_apply(first, x, [eps_ab], pred.x0)
        return state._replace(x=x_next, i=state.i + 1, pred=pred, hist=hist, nfe=state.nfe + calls)


def ipndm(order: int = 4, *, variable_step: bool = False, lower_order_final: bool = False, afs: bool = False) -> Solver:
    """iPNDM of ``order`` 1-4 (one model call per step); see the module docstring.

    Args:
      order: Adams-Bashforth order 1-4.
      variable_step: the exact variable-step weights (iPNDM-v).
      lower_order_final: lower the order on the last steps of short grids.
      afs: the analytic first step (Zhou et al., CVPR 2024): one call fewer.

    Raises:
      ValueError: an order outside 1-4, or ``afs`` with ``variable_step``.
    """
    if order not in _AB:
        raise ValueError(f"ipndm supports order 1 to 4, got {order!r}")
    if afs and variable_step:
        raise ValueError("afs is implemented for the fixed-step iPNDM (variable_step=False)")
    if not variable_step:
        return IPNDM(order, lower_order_final, afs)
    return multistep(
        order,
        mode="noise",
        weights=QuadratureWeights("rho"),
        lower_order_final=lower_order_final,
        name=settings_name(f"ipndm{order}-v", **({"lower_order_final": True} if lower_order_final else {})),
        max_order=4,
        min_steps=order,
    )
