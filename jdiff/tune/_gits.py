"""GITS: a grid by dynamic programming over a fine teacher trajectory (Chen et al., ICML 2024)."""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import solvers as S
from jdiff._grid import time_grid
from jdiff._sample import sample
from jdiff.tune._grids import GridFit, _check_noise, _check_steps, _ends, _flags, _per_sample_l2, grid_space
from jdiff.tune._programs import Bounded


# --------------------------------------------------------------------------- GITS
def gits_costs(solver, denoiser, fine_grid, xs, *, nfe_step=None, cond=None):
    """``C[i, j]`` (``i < j``): mean L2 distance between one ``solver`` step from the
    teacher state ``xs[i]`` at ``fine_grid[i]`` to ``fine_grid[j]`` and the teacher state
    ``xs[j]`` (GITS's local cost, Chen et al., ICML 2024); ``inf`` for ``j <= i``.

    ``xs`` is ``(M + 1, B, ...)``, the teacher trajectory on the ``M + 1`` fine points. A
    multistep solver's single step is its first-order start (DDIM for the exponential
    integrators), as in GITS's cost. Computed as one program: a map over ``i``, a vmap
    over ``j``.
    """
    fine = jnp.asarray(fine_grid, jnp.float32)
    return np.asarray(
        _gits_costs(solver, denoiser, jnp.asarray(xs, jnp.float32), fine, cond, nfe_step=nfe_step), np.float64
    )


def _gits_costs_impl(solver, denoiser, xs, fine, cond, *, nfe_step):
    M = fine.shape[0] - 1

    def one(x, i, j):
        # pairs j <= i are masked below; they run on the whole span so that every grid is valid
        g = jnp.where(j > i, jnp.stack([fine[i], fine[j]]), jnp.stack([fine[0], fine[M]]))
        return sample(solver, denoiser, x, g, nfe=nfe_step, cond=cond)

    def row(i):
        out = jax.vmap(lambda j: one(xs[i], i, j))(jnp.arange(M + 1))
        err = jax.vmap(_per_sample_l2)(out, xs).mean(-1)
        return jnp.where(jnp.arange(M + 1) > i, err, jnp.inf)

    return jax.lax.map(row, jnp.arange(M + 1))


_gits_costs = Bounded(jax.jit(_gits_costs_impl, static_argnames=("solver", "nfe_step")))


def gits_path(cost, num_steps: int):
    """The indices ``0 = k_0 < k_1 < ... < k_N = M`` minimizing ``sum_n cost[k_{n-1}, k_n]``
    (dynamic programming, O(N M^2)); returns ``(indices, total)``."""
    C = np.asarray(cost, np.float64)
    M = C.shape[0] - 1
    if C.shape != (M + 1, M + 1):
        raise ValueError(f"cost must be square, got {C.shape}")
    if not 1 <= num_steps <= M:
        raise ValueError(f"num_steps must be in 1..{M} (the fine grid's intervals), got {num_steps}")
    D = np.full((num_steps + 1, M + 1), np.inf)
    arg = np.zeros((num_steps + 1, M + 1), np.int64)
    D[0, 0] = 0.0
    for k in range(1, num_steps + 1):
        tot = D[k - 1][:, None] + C  # [i, j]
        arg[k] = np.argmin(tot, axis=0)
        D[k] = tot[arg[k], np.arange(M + 1)]
    path = [M]
    for k in range(num_steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return path[::-1], float(D[num_steps, M])


def gits(
    solver,
    denoiser,
    x_T,
    nfe: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    fine_steps: int = 100,
    fine_kind: str = "auto",
    teacher=None,
    step_solver=None,
    cond=None,
) -> GridFit:
    """A grid by dynamic programming over a fine teacher trajectory (GITS; Chen et al.,
    "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024).

    The teacher (default DPM-Solver++(3M)) runs over a fine grid of ``fine_steps``
    intervals from the noises ``x_T``; :func:`gits_costs` measures the error of one step
    of ``step_solver`` (default: ``solver``, or DDIM for a solver that cannot take a
    single step) between every pair of fine points from the
    teacher's states, and :func:`gits_path` picks the ``N`` steps (``N`` intervals of
    ``solver`` for ``nfe`` calls) of least total cost. No gradients; the grid's points
    are points of the fine grid. With ``t_end`` at the data (the process's ``t_data``,
    e.g. ``0.0``), the fine grid is ``jdiff.time_grid(..., final="data")`` of
    ``fine_kind`` (its last interval from ``t_min`` to the data), so every interior
    point stays in the valid range.

    Raises:
      ValueError: ``nfe`` below the solver's minimum, ``fine_steps < N``, empty or
        non-finite noises.
    """
    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    to_data, from_noise = _flags(process, t0, t1)
    N = _check_steps(solver, nfe, to_data=to_data, from_noise=from_noise)
    x_T = _check_noise(x_T, "x_T")
    if not isinstance(fine_steps, (int, np.integer)) or fine_steps < N:
        raise ValueError(f"fine_steps must be an int >= the {N} steps of the grid, got {fine_steps!r}")
    if fine_kind == "auto":
        fine_kind = "logsnr" if grid_space(process, t0, t1) == "logsnr" else "uniform"
    if to_data:  # the fine grid's last interval goes from t_min to the data (uniform: straight to it)
        fine = time_grid(process, int(fine_steps), kind=fine_kind, t_start=t0, final="data")
        process.check_times(np.asarray(fine)[:-1], allow_data=False, what=f"fine {fine_kind} grid times")
    elif fine_kind == "uniform":
        fine = jnp.asarray(np.linspace(t0, t1, int(fine_steps) + 1), jnp.float32)
    else:
        fine = time_grid(process, int(fine_steps), kind=fine_kind, t_start=t0, t_end=t1)
    start = time.perf_counter()
    teacher = S.dpm_solver_pp(3) if teacher is None else teacher
    _, info = sample(teacher, denoiser, x_T, fine, return_info=True, trajectory=True, cond=cond)
    if step_solver is None:  # a solver that cannot take one step alone (iPNDM-k) is costed by its DDIM start
        step_solver = solver if solver.min_steps <= 1 else S.ddim()
    if step_solver.min_steps > 1:
        raise ValueError(f"step_solver {step_solver.name} cannot take a single step; pass step_solver=ddim()")
    cost = gits_costs(step_solver, denoiser, fine, info.xs, cond=cond)
    path, total = gits_path(cost, N)
    grid = np.asarray(fine, np.float64)[path]
    grid[0], grid[-1] = np.float32(t0), np.float32(t1)
    return GridFit(grid=grid, method="gits", history=[total], seconds=time.perf_counter() - start)


def _brute_force_path(cost, num_steps):
    """Exhaustive search for :func:`gits_path` (tests)."""
    C = np.asarray(cost, np.float64)
    M = C.shape[0] - 1
    best = (np.inf, None)
    for inner in itertools.combinations(range(1, M), num_steps - 1):
        p = (0, *inner, M)
        c = sum(C[a, b] for a, b in zip(p[:-1], p[1:]))
        if c < best[0]:
            best = (c, list(p))
    return best[1], best[0]
