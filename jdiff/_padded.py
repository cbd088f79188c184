"""One compiled sampler for every grid length up to a bound (NFE sweeps).

:func:`jdiff.sample` runs ``lax.scan`` over the grid's ``N`` steps, so ``N`` is part of
the compiled program and a sweep over NFE compiles once per NFE. Every solver computes
its per-step coefficients in ``init`` (cheap: no network) and its ``step`` reads only row
``i`` of those tables and the grid points ``i`` and ``i + 1``. So the tables of a short
grid can be padded to ``max_steps`` rows and the steps run in a ``lax.while_loop`` whose
trip count is data: one compiled program per (solver, denoiser structure, shapes) serves
every grid with at most ``max_steps`` intervals. The tables themselves are compiled once
too: ``init`` runs on the grid padded to ``max_steps + 1`` points (repeats of its last
point) with the true length as traced data (:func:`jdiff.solvers._base.padded_length`),
and the solvers' table code reads the length from
:func:`~jdiff.solvers._base.steps_of` (``lower_order_final``, singlestep NFE schedules,
whose target is traced too), so rows ``i < N`` are those of the unpadded grid. A solver
without ``padded_tables`` gets its tables compiled per length instead. This is what the
NFE-versus-quality sweep uses.

The loop is not reverse-mode differentiable (``while_loop``); use :func:`jdiff.sample`
for gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import is_concrete, reraise_checks
from jdiff._sample import _CastInput, check_inputs
from jdiff.solvers._base import Solver, compute_dtype, empty_state, padded_length

__all__ = ["sample_padded"]


def _pad_rows(a, rows: int):
    a = jnp.asarray(a)
    if a.ndim == 0 or a.shape[0] >= rows:
        return a
    pad = jnp.broadcast_to(a[-1:], (rows - a.shape[0], *a.shape[1:]))
    return jnp.concatenate([a, pad], axis=0)


def _pad_grid(grid, points: int):
    """``grid`` followed by repeats of its last point, ``points`` in all."""
    n = grid.shape[0]
    if not isinstance(grid, jax.core.Tracer) and getattr(grid, "is_fully_addressable", True):
        # on the host (also at full length, so that every length passes the same kind of
        # argument to the jitted tables): no small program compiled per length
        g = np.asarray(grid)
        return np.concatenate([g, np.repeat(g[-1:], points - n)])
    return jnp.concatenate([grid, jnp.broadcast_to(grid[-1:], (points - n,))])


def _dummy(solver, x):
    """The state the tables are built for: one element, or one sample of ``x``'s shape for
    solvers whose tables are per dimension (``Solver.shaped_tables``)."""
    return (1, *x.shape[1:]) if solver.shaped_tables else (1, 1)


def _tables_impl(solver, process, grid, num_steps, nfe, *, with_nfe, dtype, shape):
    # The coefficient tables depend on the grid and the process only: compute them for a
    # one-element dummy state, so the program is shared by every sample shape (and by
    # sweeps of different models on the same process). ``grid`` is padded to the bound
    # and ``num_steps`` (its true length) and ``nfe`` are traced: one program per bound.
    key = jax.random.key(0) if solver.stochastic else None
    with padded_length(num_steps):
        state = solver.init(jnp.zeros(shape, dtype), grid, process, key=key, nfe=nfe if with_nfe else None)
    return state.aux, state.grid, state.hist


# tiny programs: XLA's optimization passes would cost more than they save
_tables = jax.jit(
    _tables_impl,
    static_argnames=("solver", "with_nfe", "dtype", "shape"),
    compiler_options={"xla_backend_optimization_level": 0},
)


def _tables_per_length_impl(solver, process, grid, *, nfe, max_steps, dtype, shape):
    # solvers whose init needs the unpadded grid (no padded_tables): the tables of the
    # actual grid, padded to max_steps rows afterwards (one program per length)
    key = jax.random.key(0) if solver.stochastic else None
    state = solver.init(jnp.zeros(shape, dtype), grid, process, key=key, nfe=nfe)
    aux = jax.tree.map(lambda a: _pad_rows(a, max_steps), state.aux)
    return aux, _pad_rows(state.grid, max_steps + 1), state.hist


_tables_per_length = jax.jit(
    _tables_per_length_impl,
    static_argnames=("solver", "nfe", "max_steps", "dtype", "shape"),
    compiler_options={"xla_backend_optimization_level": 0},
)


def _init(solver, process, x, grid, key, *, nfe, max_steps):
    if not solver.init_uses_nfe:
        nfe = None  # ignored by init: one tables program whether or not a target is given
    if solver.padded_tables:
        solver._check_nfe(process, grid, nfe)  # on the concrete grid, before tracing
        num_steps = np.int32(grid.shape[0] - 1)
        nfe_arg = np.int32(0 if nfe is None else nfe)
        padded = _pad_grid(grid, max_steps + 1)
        with_nfe, shape = nfe is not None, _dummy(solver, x)
        aux, padded, hist = _tables(
            solver, process, padded, num_steps, nfe_arg, with_nfe=with_nfe, dtype=x.dtype, shape=shape
        )
    else:
        aux, padded, hist = _tables_per_length(
            solver, process, grid, nfe=nfe, max_steps=max_steps, dtype=x.dtype, shape=_dummy(solver, x)
        )
    # every solver's init is empty_state(x, grid, hist_size, key) plus its tables
    state = empty_state(x, padded, hist_size=hist.shape[0], key=key if solver.stochastic else None)
    return state._replace(aux=aux)


def _loop_impl(solver, den, state, n, cond):
    def cond_fn(st):
        return st.i < n

    def body(st):
        return solver.step(den, st, cond)

    return jax.lax.while_loop(cond_fn, body, state)


_loop = jax.jit(_loop_impl, static_argnames=("solver",))


def sample_padded(
    solver: Solver,
    denoiser,
    x_T,
    grid=None,
    *,
    max_steps: int,
    cond=None,
    key=None,
    nfe: int | None = None,
    grid_kind: str = "default",
    final: str = "t_min",
    return_nfe: bool = False,
):
    """:func:`jdiff.sample` with one compiled program for every grid of at most
    ``max_steps`` intervals.

    The solver's coefficient tables (a small program without the network) are computed
    on the grid padded to ``max_steps + 1`` points with its length and the ``nfe``
    target as data, and the steps then run in a ``lax.while_loop`` whose trip count is
    the grid's length, so a sweep over NFE compiles both programs once per solver
    (solvers without ``padded_tables`` compile their tables per length). The result
    equals :func:`jdiff.sample`'s up to floating-point reassociation (tested).

    Args:
      solver, denoiser, x_T, grid, cond, key, nfe, grid_kind, final: as for
        :func:`jdiff.sample`.
      max_steps: the largest number of grid intervals this program serves (a static
        bound: equal bounds share the compiled loop).
      return_nfe: also return the number of model calls made.

    Returns:
      The samples (dtype of ``x_T``), or ``(samples, nfe)``.

    Raises:
      ValueError: for the same bad input as :func:`jdiff.sample` (on an eager call also
        for a check inside the compiled loop, such as a model's labels out of range), and
        for a grid with more than ``max_steps`` intervals, and for a solver that runs
        toward noise or carries array fields (the inversions: use :func:`jdiff.sample`).

    Not reverse-mode differentiable (the loop is a ``while_loop``): use
    :func:`jdiff.sample` with a gradient strategy for gradients.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    pytree = not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(solver))
    if getattr(solver, "direction", "to_data") != "to_data" or pytree:
        raise ValueError(
            f"sample_padded runs solvers from noise to data without array fields; {type(solver).__name__} "
            "is not one (an inversion or regeneration): use jdiff.sample"
        )
    x_T, grid, N = check_inputs(solver, denoiser, x_T, grid, cond, key, nfe=nfe, grid_kind=grid_kind, final=final)
    if N > max_steps:
        raise ValueError(f"the grid has {N} intervals, more than max_steps={max_steps}")
    process = denoiser.process
    key = key if solver.stochastic else None

    in_dtype = x_T.dtype
    dt = compute_dtype(x_T)
    den = denoiser if in_dtype == dt else _CastInput(denoiser, in_dtype)
    state = _init(solver, process, x_T.astype(dt), grid, key, nfe=nfe, max_steps=max_steps)
    if is_concrete((denoiser, x_T, grid, cond, key)):
        with reraise_checks():  # as sample: a check inside the program raises ValueError
            state = jax.block_until_ready(_loop(solver, den, state, jnp.int32(N), cond))
    else:
        state = _loop(solver, den, state, jnp.int32(N), cond)
    x = state.x.astype(in_dtype)
    return (x, state.nfe) if return_nfe else x
