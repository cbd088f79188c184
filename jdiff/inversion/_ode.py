"""ODE inversion: a deterministic solver run on the reversed grid, with fixed-point refinement.

:class:`ODEInverse` wraps the solver into one whose ``direction`` is ``"to_noise"``, so
:func:`jdiff.sample`'s loop runs it on the increasing grid, data to noise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._core import ei_coefficients, geometry_from
from jdiff._sample import sample
from jdiff.inversion._records import ODEInversion, _setup, _solver
from jdiff.solvers._base import Solver, evaluate, network_calls
from jdiff.solvers._multistep import Multistep
from jdiff.solvers.ddim import DDIM, ddim
from jdiff.solvers.ipndm import IPNDM

__all__ = ["invertible", "invert", "ddim_invert", "ODEInverse"]


def invertible(solver) -> bool:
    """Whether :func:`invert` supports ``solver``: deterministic DDIM, the deterministic
    multistep exponential integrators (DPM-Solver(++) multistep, UniPC/UniP, DEIS,
    variable-step iPNDM) and iPNDM."""
    if isinstance(solver, DDIM):
        return solver.eta == 0.0
    if isinstance(solver, Multistep):
        return not solver.stochastic
    return isinstance(solver, IPNDM)


def _refine_table(solver, process, rgrid):
    """Coefficients of the implicit step for each reversed interval ``s = rgrid[j] ->
    t = rgrid[j + 1]``: the forward step ``t -> s`` with nodes ``m(x_t, t)`` (its start)
    and the ``K`` known outputs at ``rgrid[j], rgrid[j - 1], ...`` (see the module
    docstring)."""
    mode = _mode(solver)
    K = _refine_order(solver) - 1
    la, ls = process.log_alpha(rgrid), process.log_sigma(rgrid)
    lam = la - ls
    N = rgrid.shape[0] - 1

    def one(j):
        g = geometry_from(la[j + 1], ls[j + 1], la[j], ls[j])
        if K == 0:
            return ei_coefficients(g, mode=mode, K=0)
        idx = j - jnp.arange(K)
        nodes = jnp.where(idx >= 0, lam[jnp.maximum(idx, 0)], -jnp.inf)
        q = jnp.minimum(K, j + 1)
        r = jnp.where(jnp.isfinite(nodes), (jnp.where(jnp.isfinite(nodes), nodes, g.lam_s) - g.lam_s) / g.h_safe, 1.0)
        return ei_coefficients(g, r, q, mode=mode)

    return jax.vmap(one)(jnp.arange(N))


def _mode(solver):
    return solver.mode if isinstance(solver, Multistep) else "noise"


def _refine_order(solver):
    return 1 if isinstance(solver, DDIM) else min(int(solver.order), 3)


@_solver(data=["iters"], meta=["solver", "refine"])
class ODEInverse(Solver):
    """``solver`` run toward noise, each step refined by ``iters`` fixed-point iterations
    of its implicit equation (module docstring of :mod:`jdiff.inversion`) when
    ``refine``; ``iters`` is traced (an int32 scalar), so one compiled program serves
    every count. The inner solver's state is the state, with the refinement's table and
    history of the last ``order - 1`` model outputs beside the inner ones (``aux`` and
    ``hist`` are pairs).
    """

    solver: Solver
    iters: Any
    refine: bool = False

    direction = "to_noise"

    @property
    def name(self):
        return f"invert[{self.solver.name}]"

    @property
    def order(self):
        return self.solver.order

    @property
    def min_steps(self):
        return max(1, self.solver.min_steps)

    def nfe(self, num_steps, to_data=False, from_noise=False):
        return num_steps * (1 + int(self.iters))

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = self.solver.init(x_T, grid, process)
        K = _refine_order(self.solver) - 1
        table = _refine_table(self.solver, process, state.grid) if self.refine else None
        hist = jnp.zeros((K,) + state.x.shape, state.x.dtype)
        return state._replace(aux=(state.aux, table), hist=(state.hist, hist))

    def step(self, denoiser, state, cond=None):
        (aux, table), (inner_hist, hist) = state.aux, state.hist
        dt = state.x.dtype
        x_s, j = state.x, state.i
        st = self.solver.step(denoiser, state._replace(aux=aux, hist=inner_hist), cond)
        if self.refine:
            mode = _mode(self.solver)
            K = hist.shape[0]
            m_s = st.pred.eps if mode == "noise" else st.pred.x0
            if K:
                hist = jnp.concatenate([m_s[None].astype(dt), hist[:-1]], axis=0)
            c = jax.tree.map(lambda a: a[j], table)
            known = x_s
            for k in range(K):
                known = known - c.cm[k + 1].astype(dt) * hist[k]
            t = st.grid[j + 1]

            def fixed_point(_, x_t):
                p = evaluate(denoiser, x_t, t, cond)
                m_t = p.eps if mode == "noise" else p.x0
                return (known - c.cm[0].astype(dt) * m_t) / c.cx.astype(dt)

            x = jax.lax.fori_loop(0, self.iters, fixed_point, st.x)
            st = st._replace(x=x, nfe=st.nfe + self.iters * network_calls(denoiser, t))
        return st._replace(aux=state.aux, hist=(st.hist, hist))


def invert(solver, denoiser, x0, grid=None, *, nfe=None, cond=None, refine: int = 0, grid_kind: str = "default"):
    """Invert a deterministic solver: run it on the reversed grid, data to noise.

    An exponential-integrator step approximates the same integral whichever way it is
    taken, so the solver's own coefficients serve from data to noise (DDIM inversion,
    Song et al., ICLR 2021, Sec. 4.3; Dhariwal & Nichol, NeurIPS 2021, App. F, and its
    multistep generalization). The round trip ``x0 -> x_T -> x0`` errs at the solver's
    order. ``refine = k`` solves each step's implicit equation (the step toward the
    data through the model output at the unknown noisier state, see the module
    docstring) with ``k`` fixed-point iterations (Pan et al., ICCV 2023; Garibi et al.,
    ReNoise, ECCV 2024); for DDIM it converges to the exact inverse of DDIM sampling.

    Args:
      solver: a deterministic solver for which :func:`invertible` holds (DDIM,
        DPM-Solver(++) multistep, UniPC/UniP, DEIS, iPNDM).
      denoiser: a :class:`~jdiff.Denoiser` (or a wrapper such as guidance).
      x0: ``(B, ...)`` data, taken as the state at the grid's last time.
      grid: ``(N + 1,)`` the sampling grid, decreasing, with finite log-SNR at both ends
        (default: ``jdiff.time_grid(process, nfe // (1 + refine), kind=grid_kind)``).
      nfe: model calls of the inversion when no grid is given (a multiple of ``1 + refine``).
      cond: conditioning pytree passed to the denoiser (per-sample leaves batched).
      refine: fixed-point iterations per step (each one model call).
      grid_kind: the spacing of the default grid.

    Returns:
      :class:`ODEInversion`; :func:`regenerate` samples from it with ``solver``.

    Raises:
      ValueError: a stochastic or unsupported solver, a negative ``refine``, a bad
        ``nfe``, a grid that is not decreasing, outside the process's times or ends at
        infinite log-SNR, non-finite data, a ``cond`` whose batch is not the data's.
      TypeError: non-floating data, or a denoiser that is not one.
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver (e.g. jdiff.solvers.ddim()), got {type(solver).__name__}")
    if not invertible(solver):
        raise ValueError(
            f"{solver.name} cannot be inverted by running it backward: use DDIM (eta=0), a deterministic "
            "multistep solver (dpm++2m/3m, unipc, deis, ipndm) or edict_invert / bdia_invert / ddpm_invert"
        )
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
    _, x0, grid = _setup(
        denoiser,
        x0,
        grid,
        cond,
        nfe=nfe,
        grid_kind=grid_kind,
        calls=1 + int(refine),
        min_steps=max(1, solver.min_steps),
        what=f"invert({solver.name})",
    )
    # refine > 0 is one compiled program whatever the count (a traced loop bound)
    iters = jnp.asarray(int(refine), jnp.int32)
    x_T = sample(ODEInverse(solver, iters, refine > 0), denoiser, x0, grid[::-1], cond=cond)
    return ODEInversion(x_T=x_T, grid=grid, solver=solver, process=denoiser.process)


def ddim_invert(denoiser, x0, grid=None, *, nfe=None, cond=None, refine: int = 0, grid_kind: str = "default"):
    """DDIM inversion (Song et al., ICLR 2021): :func:`invert` with ``jdiff.solvers.ddim()``;
    see it for the arguments. ``refine = k`` iterates the exact inverse of each DDIM
    step ``k`` times (Pan et al., ICCV 2023)."""
    return invert(ddim(), denoiser, x0, grid, nfe=nfe, cond=cond, refine=refine, grid_kind=grid_kind)
