"""``sample``: run a solver over a time grid with ``lax.scan``."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import batch_array, concrete, error_if, is_concrete, reraise_checks
from jdiff._gradient import Backprop, GradientStrategy, check_gradient
from jdiff._grid import time_grid
from jdiff._param import Prediction, check_cond_batch
from jdiff.solvers._base import Solver, compute_dtype, network_calls

__all__ = ["sample", "SampleInfo", "validate_grid", "check_x_T", "check_nfe_with_grid"]

_BACKPROP = Backprop()  # the default gradient strategy (an immutable value)


class SampleInfo(NamedTuple):
    """What :func:`sample` returns besides the samples when ``return_info=True``.

    Attributes:
      nfe: network calls made (int32 scalar; counts calls actually taken): every
        evaluation of the denoiser counts its :func:`~jdiff.solvers._base.network_calls`,
        1 for a plain denoiser, 2 for classifier-free guidance or autoguidance, 1 outside
        a guidance interval (see :mod:`jdiff.wrappers`).
      grid: the time grid used.
      xs: ``(N + 1, *x.shape)`` states ``x_{t_0} .. x_{t_N}`` (with ``trajectory=True``).
      x0s: ``(N, *x.shape)`` the x0 prediction made at the start of each step.
      epss: ``(N, *x.shape)`` the eps prediction made at the start of each step.
    """

    nfe: jax.Array
    grid: jax.Array
    xs: Any = None
    x0s: Any = None
    epss: Any = None


@dataclasses.dataclass(frozen=True)
class _CastInput:
    """Feed the network the caller's dtype; the solver keeps float32 (or wider) state."""

    inner: Any
    dtype: Any

    @property
    def process(self):
        return self.inner.process

    def __call__(self, x, t, cond=None):
        p = self.inner(x.astype(self.dtype), t, cond)
        return Prediction(p.x0.astype(x.dtype), p.eps.astype(x.dtype))

    def calls(self, t):
        return network_calls(self.inner, t)

    def guide(self, x, t, cond=None, memory=None):
        guide = getattr(self.inner, "guide", None)
        if guide is None:
            raise TypeError(
                "this solver option needs a guidance wrapper (jdiff.wrappers.guidance), "
                f"got {type(self.inner).__name__}"
            )
        g = guide(x.astype(self.dtype), t, cond, memory)
        cast = lambda p: Prediction(p.x0.astype(x.dtype), p.eps.astype(x.dtype))  # noqa: E731
        return g._replace(pred=cast(g.pred), base=cast(g.base))


jax.tree_util.register_dataclass(_CastInput, data_fields=["inner"], meta_fields=["dtype"])


def validate_grid(process, grid, direction: str = "to_data"):
    """Check that ``grid`` is a valid time grid for ``process`` and return it.

    ``direction`` is the solver's (:class:`~jdiff.solvers.Solver`'s ``direction``):
    ``"to_data"`` asks for a strictly decreasing grid (noise to data) whose last point may
    be ``t_data``; ``"to_noise"`` for a strictly increasing one (data to noise, an
    inversion) whose first point may be ``t_data``. Shapes are checked now. Values
    (finite, strictly monotone, times in the process's range) raise ``ValueError`` now
    when the grid is concrete; when it is traced (inside the caller's ``jit``), the
    returned grid carries runtime checks and the compiled program fails with a message
    containing the same words ("non-finite", "strictly decreasing" or "strictly
    increasing", "outside the valid range"). Use the returned grid downstream.
    """
    if direction not in ("to_data", "to_noise"):
        raise ValueError(f"a grid direction is 'to_data' or 'to_noise', got {direction!r}")
    grid = jnp.asarray(grid)
    if grid.ndim != 1:
        raise ValueError(f"the time grid must be 1-D, got shape {grid.shape}")
    if grid.shape[0] < 2:
        raise ValueError(f"the time grid needs at least 2 points, got {grid.shape[0]}")
    to_data = direction == "to_data"
    order = "decreasing (noise to data)" if to_data else "increasing (data to noise)"
    sign = 1 if to_data else -1
    # the end that may be t_data: the last point toward the data, the first toward noise
    inner, end = (slice(None, -1), slice(-1, None)) if to_data else (slice(1, None), slice(None, 1))
    what = "final grid time" if to_data else "first grid time"
    g = concrete(grid)
    if g is not None:
        g = g.astype(np.float64)
        if not np.all(np.isfinite(g)):
            raise ValueError(f"the time grid has non-finite values: {g.tolist()[:8]}")
        d = sign * np.diff(g)
        if not np.all(d < 0):
            k = int(np.argmax(d >= 0))
            rel = "<=" if to_data else ">="
            raise ValueError(f"the time grid must be strictly {order}; t[{k}]={g[k]} {rel} t[{k + 1}]={g[k + 1]}")
        process.check_times(g[inner], allow_data=False, what="grid times")
        process.check_times(g[end], allow_data=True, what=what)
        return grid
    # traced: one fused reduction per check, once per sample() call (not per step)
    grid = error_if(grid, ~jnp.all(jnp.isfinite(grid)), "the time grid has non-finite values")
    grid = error_if(grid, jnp.any(sign * jnp.diff(grid) >= 0), f"the time grid must be strictly {order}")
    head = process.check_times(grid[inner], allow_data=False, what="grid times")
    tail = process.check_times(grid[end], allow_data=True, what=what)
    return jnp.concatenate([head, tail] if to_data else [tail, head])


def check_x_T(x_T):
    """Return ``x_T`` after checking that it is finite (now, or at run time when traced)."""
    return error_if(x_T, ~jnp.all(jnp.isfinite(x_T)), f"x_T of shape {x_T.shape} has non-finite values (NaN or inf)")


def _grid_ends(process, grid):
    """``(from_noise, to_data)`` of a grid: the possible pairs (all four when traced)."""
    g = concrete(grid)
    if g is None:
        return [(a, b) for a in (False, True) for b in (False, True)]
    lam = np.asarray(process.lambda_(jnp.asarray([g[0], g[-1]])))
    return [(bool(lam[0] == -np.inf), bool(lam[1] == np.inf))]


def check_nfe_with_grid(solver, process, grid, nfe) -> None:
    """Raise ``ValueError`` when a target ``nfe`` given together with an explicit grid
    disagrees with it.

    A solver whose ``init`` spends the target (``init_uses_nfe``: singlestep
    DPM-Solver, which picks its per-step orders from it) takes any target its ``init``
    accepts on the grid. For every other solver the target must be what the grid gives:
    the grid's ``N`` intervals are ``solver.num_steps(nfe)`` (the grid
    :func:`jdiff.time_grid` builds for that ``nfe``) or cost ``solver.nfe(N) == nfe``
    denoiser evaluations (counting first-order steps at a zero-SNR start or a final
    step to the data). A traced grid accepts a target that either end case allows.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver.init_uses_nfe:
        return
    N = grid.shape[0] - 1
    spent = set()
    for from_noise, to_data in _grid_ends(process, grid):
        spent.add(int(solver.nfe(N, to_data, from_noise)))
        try:
            if int(solver.num_steps(int(nfe), to_data, from_noise)) == N:
                return
        except ValueError:
            pass
    if int(nfe) in spent:
        return
    calls = " or ".join(str(k) for k in sorted(spent))
    raise ValueError(
        f"nfe={nfe} disagrees with the grid: {solver.name} makes {calls} denoiser evaluations on this grid of "
        f"{N} intervals; give the grid or nfe, not both (or the nfe the grid gives)"
    )


def check_inputs(solver, denoiser, x_T, grid, cond, key, *, nfe, grid_kind, final):
    """The checks every sampling entry point makes before anything runs; returns
    ``(x_T, grid, N)`` with the grid built from ``nfe`` when not given and both carrying
    their runtime value checks when traced (see :func:`validate_grid`)."""
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver (e.g. jdiff.solvers.ddim()), got {type(solver).__name__}")
    process = getattr(denoiser, "process", None)
    if process is None or not callable(denoiser):
        raise TypeError("denoiser must be a jdiff Denoiser (see jdiff.denoiser)")
    x_T = batch_array(x_T, "x_T")
    if grid is None:
        if nfe is None:
            raise ValueError("give a time grid or a target nfe")
        grid = time_grid(process, kind=grid_kind, nfe=nfe, solver=solver, final=final)
        if solver.direction == "to_noise":
            grid = grid[::-1]
        grid = validate_grid(process, grid, solver.direction)
    else:
        grid = validate_grid(process, grid, solver.direction)
        if nfe is not None:
            check_nfe_with_grid(solver, process, grid, nfe)
    x_T = check_x_T(x_T)
    check_cond_batch(cond, x_T.shape[0], "x_T", x_T.shape)
    N = grid.shape[0] - 1
    if N < solver.min_steps:
        raise ValueError(
            f"{solver.name} needs at least {solver.min_steps} steps to reach its order {solver.order}; "
            f"the grid has {N}: use more steps or a lower order"
        )
    if solver.stochastic and key is None:
        raise ValueError(f"{solver.name} is stochastic: pass key=jax.random.key(seed)")
    solver.check_inputs(process, grid, x_T)
    return x_T, grid, N


def sample(
    solver: Solver,
    denoiser,
    x_T,
    grid=None,
    *,
    cond=None,
    key=None,
    nfe: int | None = None,
    grid_kind: str = "default",
    final: str = "t_min",
    denoise_to_zero: bool = False,
    return_info: bool = False,
    trajectory: bool = False,
    gradient: GradientStrategy = _BACKPROP,
):
    """Sample by running ``solver`` from ``x_T`` over ``grid``.

    Args:
      solver: a :class:`~jdiff.solvers.Solver`, e.g. ``jdiff.solvers.unipc(2)``.
      denoiser: a :class:`~jdiff.Denoiser` (or any object with ``.process`` and
        ``__call__(x, t, cond) -> Prediction``).
      x_T: ``(B, ...)`` starting noise (see :func:`jdiff.prior_sample`). Its dtype is the
        dtype the network sees; the solver computes in at least float32.
      grid: ``(N + 1,)`` decreasing times from ``t_max`` (default: built from ``nfe``);
        increasing, data to noise, for a solver whose ``direction`` is ``"to_noise"``
        (the inversions of :mod:`jdiff.inversion`; the default grid is then reversed).
      cond: any pytree passed unchanged to the denoiser. Per-sample conditioning: every
        array leaf with ``ndim >= 1`` must have the batch of ``x_T`` as its leading
        axis (scalars and non-array leaves are passed as they are); a mismatch raises
        ``ValueError`` naming the leaf and both shapes.
      key: PRNG key for stochastic solvers: one key (sample ``i`` then uses
        ``fold_in(key, i)``) or one key per sample. A sample's noise depends only on its
        own key, not on the batch.
      nfe: target number of denoiser evaluations. Without ``grid``, a grid of kind
        ``grid_kind`` is built with ``solver.num_steps(nfe)`` steps; singlestep solvers
        then pick their per-step orders to spend exactly ``nfe``. (A guidance wrapper
        may make several network calls per evaluation; ``SampleInfo.nfe`` counts those.)
        With a ``grid`` too, singlestep solvers spend ``nfe`` on that grid; for the
        others ``nfe`` must be the NFE the grid gives (its length is
        ``solver.num_steps(nfe)`` or it costs ``nfe`` evaluations), else ``ValueError``
        (see :func:`check_nfe_with_grid`): a grid is never silently preferred.
      final: with ``nfe`` and no grid: ``"t_min"`` or ``"data"`` (see
        :func:`jdiff.time_grid`).
      denoise_to_zero: after the last step, one more model call returns its x0
        prediction (k-diffusion's ``denoise_to_zero``).
      return_info: also return a :class:`SampleInfo` (NFE spent, grid, trajectory).
      trajectory: record states and model outputs at every step (needs return_info).
      gradient: how the reverse pass goes through sampling (see :mod:`jdiff._gradient`;
        diffrax's ``adjoint=`` in spirit): :class:`~jdiff.Backprop` (the default: plain
        autodiff through the scan, memory O(N activations)), :class:`~jdiff.Remat`
        (each step under ``jax.checkpoint``: the same gradient, memory O(N |x|)),
        :class:`~jdiff.Truncated` ``(k, remat=False)`` (only the last ``k`` steps carry
        gradient, DRaFT-K / AlignProp) or :class:`~jdiff.Adjoint` (the adjoint ODE solved
        backward, memory independent of N; deterministic solvers only). The forward
        result is the same in every strategy.

    Returns:
      The samples (dtype of ``x_T``), or ``(samples, SampleInfo)``. The samples are
      ``solver.finish(final_state, x_T.dtype)``: the final ``x`` for every sampler, a
      pytree for a solver whose result is more (e.g. EDICT inversion's pair).

    Works under ``jit``, ``vmap`` (including a different grid per sample) and
    ``grad`` with respect to ``x_T``, ``cond``, the denoiser's parameters and (with
    Backprop, Remat and Truncated) the grid times. Grid points at infinite log-SNR (a
    final time ``t_data`` where sigma = 0, a start where alpha = 0) are ends of the time
    domain, not free parameters: their gradient is 0 (see
    :func:`jdiff.solvers._base.constant_infinite_ends`); every other time gets its exact
    derivative.

    Raises:
      ValueError: before anything runs, for a grid that is not finite, not strictly
        decreasing or outside the process's times, a non-finite ``x_T`` or a ``cond``
        whose batch is not ``x_T``'s; ``denoise_to_zero`` with a solver that runs toward
        noise; ``Truncated(k)`` with ``k`` not in ``1..N`` (N grid
        intervals); an ``nfe`` that disagrees with an explicit ``grid``;
        :class:`~jdiff.Adjoint` with a stochastic solver or another pair it
        does not support; on an eager call, a value check inside the compiled program
        (a model's class labels out of range) too. Under the caller's ``jit`` the value
        checks become runtime checks (:func:`jdiff._checks.error_if`, which also holds on
        a mesh): ``jax.errors.JaxRuntimeError`` whose text contains the same message
        (:func:`jdiff.check_message` extracts it); they run once per call, not per step.
      TypeError: a ``gradient`` that is not a gradient strategy.
    """
    check_gradient(gradient)
    if trajectory and not return_info:
        raise ValueError("trajectory=True needs return_info=True")
    x_T, grid, N = check_inputs(solver, denoiser, x_T, grid, cond, key, nfe=nfe, grid_kind=grid_kind, final=final)
    gradient.check(solver, denoiser, N, trajectory=trajectory, denoise_to_zero=denoise_to_zero)
    if denoise_to_zero and solver.direction != "to_data":
        raise ValueError(f"denoise_to_zero ends at the data, but {solver.name} runs toward noise")

    key = key if solver.stochastic else None
    # One cached compilation per (solver settings, denoiser structure, shapes, flags);
    # inside a user's jit it is inlined. A solver's array fields (solvers that start from
    # more than x_T) are arguments. Objects JAX cannot pass as arguments (a denoiser that
    # is not a registered pytree, strings in cond) run the same body without the cache.
    settings, data = _split_solver(solver)
    run = _run if _jittable((data, denoiser, cond, key)) else _run_impl
    args = (settings, data, denoiser, x_T, grid, cond, key)
    flags = dict(nfe=nfe, denoise_to_zero=denoise_to_zero, trajectory=trajectory, gradient=gradient)
    if is_concrete((data, denoiser, x_T, grid, cond, key)):
        # an eager call: a value check that fails inside the compiled program (e.g. a
        # model's labels out of range) raises ValueError with its message, as the checks
        # made before it do (this waits for the result)
        with reraise_checks():
            x, info = jax.block_until_ready(run(*args, **flags))
    else:
        x, info = run(*args, **flags)
    return (x, info) if return_info else x


def _jittable(tree) -> bool:
    def ok(leaf):
        return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)) or hasattr(
            leaf, "__jax_array__"
        )

    return all(ok(leaf) for leaf in jax.tree.leaves(tree))


def _split_solver(solver):
    """``(settings, data)``: a solver that is not a pytree is all settings (``data`` is
    None); a pytree solver is its structure (hashable, with its static fields) and its
    array leaves (see :class:`~jdiff.solvers.Solver`)."""
    leaves, treedef = jax.tree.flatten(solver)
    if jax.tree_util.treedef_is_leaf(treedef):
        return solver, None
    return treedef, leaves


def _run_impl(settings, data, denoiser, x_T, grid, cond, key, *, nfe, denoise_to_zero, trajectory, gradient):
    """The body of :func:`sample` after validation."""
    solver = settings if data is None else settings.unflatten(data)
    in_dtype = x_T.dtype
    dt = compute_dtype(x_T)
    den = denoiser if in_dtype == dt else _CastInput(denoiser, in_dtype)
    run = gradient.run(solver, den, x_T.astype(dt), grid, cond, key, nfe=nfe, trajectory=trajectory)
    x, count = run.x, run.nfe
    if denoise_to_zero:
        x = den(x, grid[-1], cond).x0.astype(dt)
        count = count + network_calls(den, grid[-1])
    info = SampleInfo(nfe=count, grid=run.grid)
    if trajectory:
        xs = jnp.concatenate([x_T.astype(dt)[None], run.traj[0]], axis=0)
        info = info._replace(xs=xs, x0s=run.traj[1], epss=run.traj[2])
    if run.state is None or denoise_to_zero:
        return x.astype(in_dtype), info
    return solver.finish(run.state, in_dtype), info


_run = jax.jit(_run_impl, static_argnames=("settings", "nfe", "denoise_to_zero", "trajectory", "gradient"))
