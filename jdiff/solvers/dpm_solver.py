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

Third-order multistep (3M): jdiff integrates the quadratic through the last three
outputs exactly (local error ``O(h^4)``, globally third order). The reference
implementation (``dpm_solver_pytorch.py``) and diffusers' ``DPMSolverMultistepScheduler``
estimate the second difference as ``D2 = (D1_0 - D1_1) / (r0 + r1)``, half the second
derivative term ``h^2 m''``, and weight it with ``phi_3`` as if it were the whole term:
their update is locally ``O(h^3)``, globally second order (on the testbed, halving
``h`` divides jdiff's local error by about 16 and theirs by about 8). ``variant=
"diffusers"`` reproduces their numbers; ``variant="exact"`` (the default) keeps jdiff's
form. The two differ only on the third-order steps.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._core import ei_apply, ei_coefficients, geometry
from jdiff.solvers._base import (
    Solver,
    empty_state,
    evaluate,
    geometry_at,
    grid_curves,
    infinite_steps,
    network_calls,
    order_schedule,
    row,
    settings_name,
    steps_of,
    traced_order_schedule,
)
from jdiff.solvers._multistep import multistep

__all__ = ["Singlestep", "dpm_solver", "dpm_solver_pp", "sde_dpm_solver_pp"]

_TYPES = {"midpoint": "bh2", "heun": "exact"}


def _solver_type(solver_type):
    if solver_type not in _TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; expected 'midpoint' or 'heun'")
    return _TYPES[solver_type]


class _SingleTable(NamedTuple):
    order: jax.Array  # order of this step (1 on an infinite step)
    times: jax.Array  # (2,) intermediate times: order 2 uses [0], order 3 uses both
    t_mid: jax.Array  # order 2's intermediate time
    c: tuple  # per order k, the EICoef of its stages


@dataclasses.dataclass(frozen=True)
class Singlestep(Solver):
    """Singlestep DPM-Solver(++) of ``order`` 1-3: ``order`` model calls per step (fewer
    on steps lowered to spend an NFE target, and on infinite steps).

    Attributes:
      order: 1, 2 or 3.
      mode: ``"noise"`` (DPM-Solver) or ``"data"`` (DPM-Solver++).
      coef: the order-2 difference coefficient (``"bh2"``: midpoint, ``"exact"``: heun).
      lower_order_final: lower the final orders when no NFE target fixes them.
      name: the registry name (set by the factory).
    """

    order: int
    mode: str
    coef: str = "bh2"
    lower_order_final: bool = True
    name: str = "singlestep"

    # row i reads grid points i, i + 1 and the schedule, which reads steps_of(grid) and
    # the (possibly traced) nfe target
    padded_tables = True

    def __post_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"{self.name} supports order 1, 2 or 3, got {self.order!r}")

    def table(self, process, grid, nfe):
        mode, coef, order = self.mode, self.coef, self.order
        gc = grid_curves(process, grid)
        N = grid.shape[0] - 1  # rows (the grid may be padded past its true length)
        orders = traced_order_schedule(
            order, gc.steps.finite, nfe, lower_order_final=self.lower_order_final, num_steps=steps_of(grid)
        )

        def one_node(gg, r, variant):
            return ei_coefficients(gg, jnp.full((1,), r, grid.dtype), 1, mode=mode, coef=variant)

        def one(i):
            s = grid[i]
            g = geometry_at(gc.steps, i)

            def sub(r):
                t_r = process.t_of_lambda(g.lam_s + r * g.h_safe).astype(grid.dtype)
                return t_r, geometry(process, s, t_r, grid.dtype)

            stages = [(ei_coefficients(g, mode=mode, K=0),)]
            t_mid, ga = sub(0.5)
            stages.append((ei_coefficients(ga, mode=mode, K=0), one_node(g, 0.5, coef)))
            ta, g1 = sub(1.0 / 3.0)
            tb, g2 = sub(2.0 / 3.0)
            stages.append(
                (ei_coefficients(g1, mode=mode, K=0), one_node(g2, 0.5, "exact"), one_node(g, 2.0 / 3.0, "exact"))
            )
            return _SingleTable(orders[i], jnp.stack([ta, tb]), t_mid, tuple(stages[:order]))

        return jax.vmap(one)(jnp.arange(N))

    init_uses_nfe = True  # the per-step orders spend the target exactly
    supports_adjoint = True

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        del key
        state = empty_state(x_T, grid, process=process)
        if isinstance(steps_of(state.grid), int):  # padded: sample_padded has checked
            self._check_nfe(process, grid, nfe)
        return state._replace(aux=self.table(process, state.grid, nfe))

    def _check_nfe(self, process, grid, nfe):
        # validate the target on a concrete grid (raises a clear error); the schedule
        # itself is computed from the (possibly traced) grid in the table
        n = np.shape(grid)[0] - 1
        order_schedule(
            self.order, n, nfe, lower_order_final=self.lower_order_final, forced=infinite_steps(process, grid)
        )

    def step(self, denoiser, state, cond=None):
        x = state.x
        tab = row(state.aux, state.i)
        pred = evaluate(denoiser, x, state.grid[state.i], cond)
        pick = (lambda p: p.eps) if self.mode == "noise" else (lambda p: p.x0)
        m = pick(pred)

        def o1():
            (c,) = tab.c[0]
            return ei_apply(c, x, [m], pred.x0), jnp.int32(0)

        def o2():
            ca, cb = tab.c[1]
            u1 = ei_apply(ca, x, [m], pred.x0)
            m1 = pick(evaluate(denoiser, u1, tab.t_mid, cond))
            return ei_apply(cb, x, [m, m1], pred.x0), network_calls(denoiser, tab.t_mid)

        def o3():
            ca, cb, cc = tab.c[2]
            u1 = ei_apply(ca, x, [m], pred.x0)
            m1 = pick(evaluate(denoiser, u1, tab.times[0], cond))
            u2 = ei_apply(cb, x, [m, m1], pred.x0)
            m2 = pick(evaluate(denoiser, u2, tab.times[1], cond))
            extra = network_calls(denoiser, tab.times[0]) + network_calls(denoiser, tab.times[1])
            return ei_apply(cc, x, [m, m2], pred.x0), extra

        if self.order == 1:
            x_next, extra = o1()
        else:
            x_next, extra = jax.lax.switch(tab.order - 1, [o1, o2, o3][: self.order])
        return state._replace(
            x=x_next, i=state.i + 1, pred=pred, nfe=state.nfe + network_calls(denoiser, state.grid[state.i]) + extra
        )

    def nfe(self, num_steps, to_data=False, from_noise=False):
        forced = ([0] if from_noise else []) + ([num_steps - 1] if to_data else [])
        return sum(order_schedule(self.order, num_steps, None, lower_order_final=self.lower_order_final, forced=forced))

    def num_steps(self, nfe, to_data=False, from_noise=False):
        f = int(to_data) + int(from_noise)
        return f + max(1, -(-(nfe - f) // self.order)) if nfe > f else max(nfe, 1)


_VARIANTS = ("exact", "diffusers")


def _extra(solver_type, lower_order_final, variant="exact"):
    """The settings a registry name does not carry, when not at their defaults."""
    return (
        ({} if solver_type == "midpoint" else {"solver_type": solver_type})
        | ({} if lower_order_final else {"lower_order_final": False})
        | ({} if variant == "exact" else {"variant": variant})
    )


def _variant(variant, order, method):
    """Validate ``variant``; it matters only for third-order multistep (below that the
    two forms are the same solver, so the setting is dropped and equal solvers stay equal)."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected 'exact' or 'diffusers'")
    if variant == "diffusers" and method != "multistep":
        raise ValueError(f"variant='diffusers' is a multistep (3M) form; got method={method!r}")
    return variant if order == 3 else "exact"


def _check_method(method):
    if method not in ("singlestep", "multistep"):
        raise ValueError(f"unknown method {method!r}; expected 'singlestep' or 'multistep'")


def dpm_solver(
    order: int = 3,
    *,
    method: str = "singlestep",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    variant: str = "exact",
) -> Solver:
    """DPM-Solver with noise prediction (Lu et al., NeurIPS 2022).

    Args:
      order: 1, 2 or 3.
      method: ``"singlestep"`` (the paper's DPM-Solver-k, ``k`` calls per step) or
        ``"multistep"`` (one call per step, reusing past outputs).
      solver_type: ``"midpoint"`` or ``"heun"`` (the order-2 difference coefficient).
      lower_order_final: lower the order on the last steps of short grids; for
        singlestep, only when no target NFE fixes the orders.
      variant: ``"exact"`` or, for third-order multistep, ``"diffusers"`` (the reference
        implementation's and diffusers' update, globally second order; see the module).

    Raises:
      ValueError: an unknown ``method``, ``solver_type`` or ``variant``, or
        ``variant="diffusers"`` with ``method="singlestep"``.
    """
    _check_method(method)
    coef = _solver_type(solver_type)
    variant = _variant(variant, order, method)
    extra = _extra(solver_type, lower_order_final, variant)
    if method == "singlestep":
        return Singlestep(order, "noise", coef, lower_order_final, settings_name(f"dpm{order}", **extra))
    name = settings_name(f"dpm{order}m", **extra)
    return multistep(
        order,
        mode="noise",
        coef=coef,
        lower_order_final=lower_order_final,
        half_second=variant == "diffusers",
        name=name,
    )


def dpm_solver_pp(
    order: int = 2,
    *,
    method: str = "multistep",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    variant: str = "exact",
) -> Solver:
    """DPM-Solver++ with data prediction (Lu et al., 2022): ``(2M)``/``(3M)`` for
    ``method="multistep"`` (the default, as in diffusers) and ``(2S)``/3S for
    ``"singlestep"``.

    Args:
      order: 1, 2 or 3.
      method: ``"multistep"`` or ``"singlestep"``.
      solver_type: ``"midpoint"`` or ``"heun"`` (the order-2 difference coefficient).
      lower_order_final: lower the order on the last steps of short grids (multistep: also
        on a long last step of longer grids, :func:`jdiff.solvers._base.multistep_order`).
      variant: ``"exact"`` (jdiff's third-order form, the default) or ``"diffusers"``
        (the reference implementation's and diffusers' 3M update, which puts half the
        exact weight on the second difference: globally second order; see the module).
        Only third-order multistep differs; other orders ignore it.

    Raises:
      ValueError: an unknown ``method``, ``solver_type`` or ``variant``, or
        ``variant="diffusers"`` with ``method="singlestep"``.
    """
    _check_method(method)
    coef = _solver_type(solver_type)
    variant = _variant(variant, order, method)
    extra = _extra(solver_type, lower_order_final, variant)
    if method == "multistep":
        name = settings_name(f"dpm++{order}m", **extra)
        return multistep(
            order,
            mode="data",
            coef=coef,
            lower_order_final=lower_order_final,
            half_second=variant == "diffusers",
            name=name,
        )
    if method == "singlestep":
        return Singlestep(order, "data", coef, lower_order_final, settings_name(f"dpm++{order}s", **extra))
    raise ValueError(f"unknown method {method!r}; expected 'singlestep' or 'multistep'")


def sde_dpm_solver_pp(order: int = 2, *, solver_type: str = "midpoint", lower_order_final: bool = True) -> Solver:
    """SDE-DPM-Solver++(1) or (2M): multistep, data prediction, stochastic (needs a key).
    Order 1 is DDPM ancestral sampling, i.e. DDIM with ``eta = 1``."""
    return multistep(
        order,
        mode="sde_data",
        coef=_solver_type(solver_type),
        lower_order_final=lower_order_final,
        name=settings_name(f"sde-dpm++{order}" + ("m" if order == 2 else ""), **_extra(solver_type, lower_order_final)),
        max_order=2,
    )
