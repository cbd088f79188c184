"""The solver protocol: optax-style ``(init, step)`` pairs of pure functions.

A solver is a *value*: a frozen, hashable dataclass (a subclass of :class:`Solver`)
whose fields are its settings and whose ``init``/``step``/``nfe``/``num_steps`` are
methods. Two solvers built with the same settings are equal and hash alike, so the
compiled sampler (which takes the solver as a static argument) is reused however often
the solver is rebuilt. ``state = solver.init(x_T, grid, process, key=...)`` builds the
scan carry (a :class:`State`) and ``state = solver.step(denoiser, state, cond)``
advances it by one grid interval, calling the denoiser one or more times.
:func:`jdiff.sample` runs ``step`` under ``lax.scan``, so the compiled program does not
grow with the number of steps and any grid of the same length reuses it.

Every coefficient a solver uses (log-SNR steps, phi functions, Lagrange weights,
effective orders during warm-up, noise scales) depends only on the grid and the
process. ``init`` computes them for all steps at once, vectorized, into ``state.aux``;
``step`` reads its row and does a few fused multiply-adds around the model call. The
grid stays data, so a new grid of the same length reuses the compiled program.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._core import Geometry, geometry_from
from jdiff._param import Prediction
from jdiff._random import _batch_keys, normal_per_sample

__all__ = [
    "State",
    "Solver",
    "evaluate",
    "network_calls",
    "guided_evaluate",
    "valid_history",
    "multistep_order",
    "LONG_STEP_RATIO",
    "step_noise",
    "order_schedule",
    "grid_curves",
    "row",
    "constant_infinite_ends",
    "steps_of",
    "padded_length",
]


class State(NamedTuple):
    """Scan carry shared by all solvers.

    Attributes:
      x: the current sample, in the compute dtype (at least float32).
      i: the index of the next grid interval (int32 scalar).
      grid: the time grid, shape ``(N + 1,)``, decreasing (increasing for a solver whose
        ``direction`` is ``"to_noise"``).
      pred: the prediction ``(x0, eps)`` made at the start of the last step.
      hist: ``(K, *x.shape)`` a ring buffer of past model outputs in the solver's form
        (output ``i`` in slot ``i % K``; ``K`` may be 0). Each step writes its slot
        first and then reads only the updated buffer, which XLA updates in place.
      key: per-sample PRNG keys for stochastic solvers, else None.
      nfe: network calls made so far (int32 scalar): each evaluation adds
        :func:`network_calls` (1 for a plain denoiser, 2 for classifier-free guidance).
      aux: the per-step coefficient tables (a pytree of arrays with leading axis N).
    """

    x: jax.Array
    i: jax.Array
    grid: jax.Array
    pred: Prediction
    hist: jax.Array
    key: Any = None
    nfe: jax.Array = None
    aux: Any = None


class Solver:
    """Base class of the solvers: a sampler as pure methods on a settings value.

    Subclasses are frozen dataclasses (``@dataclasses.dataclass(frozen=True)``) whose
    fields are the solver's settings, all hashable (numbers, strings, tuples, frozen
    dataclasses, module-level functions), so equal settings give equal, hashable solvers.

    Methods:
      init: ``(x_T, grid, process, *, key=None, nfe=None) -> State``.
      step: ``(denoiser, state, cond) -> State``.
      nfe: ``(num_steps, to_data=False, from_noise=False) -> int``: model calls for a
        grid of ``num_steps`` intervals; ``to_data`` says the grid ends where
        sigma = 0 and ``from_noise`` that it starts where alpha = 0 (zero terminal SNR):
        such steps are first order.
      num_steps: ``(nfe, to_data=False, from_noise=False) -> int``: intervals to spend
        at most ``nfe`` calls.

    Attributes (fields or properties of the subclass):
      order: the solver's order of convergence (deterministic solvers) or strong order.
      stochastic: whether ``init`` needs a PRNG key.
      name: the canonical name in :func:`jdiff.solvers.get`'s registry (settings the
        short name does not carry follow in parentheses, e.g. ``"dpm++2m(solver_type=heun)"``),
        so ``jdiff.solvers.get(solver.name) == solver``.
      min_steps: the fewest grid intervals the solver accepts.
      padded_tables: whether ``init`` supports padded grids: under
        :func:`padded_length`, ``init`` receives the grid padded with repeats of its
        last point and the true (traced) number of intervals, and builds tables whose
        rows ``i < N`` are those of the unpadded grid (it reads the length with
        :func:`steps_of`, never ``grid.shape[0] - 1``, and row ``i`` depends only on
        grid points ``0..i + 1``). :func:`jdiff.sample_padded` then compiles the tables
        once for every grid length; solvers without it get one tables program per length.
      shaped_tables: whether the tables depend on the shape of one sample (per-dimension
        coefficients, e.g. DPM-Solver-v3's statistics): :func:`jdiff.sample_padded` then
        builds them for a dummy state of that shape instead of a shape-free one.
      init_uses_nfe: whether ``init`` reads its ``nfe`` target (singlestep solvers spend
        it exactly, so the target is the NFE spent); for the others
        :func:`jdiff.sample_padded` drops the target, so calls with and without it share
        one tables program, and :func:`jdiff.sample` refuses a target that differs from
        the NFE an explicit grid gives.
      supports_adjoint: whether ``gradient=jdiff.Adjoint()`` may transpose this solver's
        step: a deterministic step of the probability-flow ODE whose outputs are the
        ODE's (not DPM-Solver-v3's statistics, DC-Solver's compensated outputs or
        iPNDM's analytic first step). Default False: a new solver opts in.
      direction: ``"to_data"`` (the default: the grid decreases, noise to data) or
        ``"to_noise"`` (the grid increases, data to noise: the inversions of
        :mod:`jdiff.inversion`); :func:`jdiff.sample` validates the grid accordingly.

    Starting from more than ``x_T`` (the hook the inversions use): a solver may be a
    registered pytree (``jax.tree_util.register_dataclass``, ``eq=False``) whose data
    fields are arrays, e.g. EDICT's second sequence ``y_T``, BDIA's first state, the
    per-step noises of edit-friendly DDPM or a traced setting such as EDICT's ``p``.
    :func:`jdiff.sample` passes those leaves to its compiled program as arguments (so new
    values do not recompile) and the rest of the pytree structure as its static settings;
    ``init`` puts them into the state (``hist`` for what the steps change, ``aux`` for
    what they only read). A solver that is not a pytree is all settings.
    """

    stochastic = False
    min_steps = 1
    padded_tables = False
    shaped_tables = False
    init_uses_nfe = False
    supports_adjoint = False
    direction = "to_data"

    def init(self, x_T, grid, process, *, key=None, nfe=None) -> State:
        raise NotImplementedError

    def step(self, denoiser, state: State, cond=None) -> State:
        raise NotImplementedError

    def finish(self, state: State, dtype):
        """What :func:`jdiff.sample` returns from the final state, in the caller's
        ``dtype`` (that of ``x_T``): by default the sample ``state.x``. A solver whose
        result is more than the last state overrides it (EDICT's pair, edit-friendly
        DDPM's noises) and then returns a pytree."""
        return state.x.astype(dtype)

    def transition(self, denoiser, state: State, cond=None):
        """``(state, std)``: the step as a Gaussian transition ``x_next ~ N(state.x,
        std^2 I)``, ``state.x`` the mean the solver computes before adding noise and
        ``std`` its noise scale (0 for a deterministic step). Solvers whose stochastic
        step is such a Gaussian (DDIM/DDPM, SDE-DPM-Solver++) implement it; it is what
        :func:`jdiff.preference.transition_log_prob` scores.

        Raises:
          NotImplementedError: for a solver without that form."""
        raise NotImplementedError(f"{self.name} does not expose its step as a Gaussian transition")

    def nfe(self, num_steps, to_data=False, from_noise=False) -> int:
        """One model call per step (override for solvers that make more)."""
        return num_steps

    def num_steps(self, nfe, to_data=False, from_noise=False) -> int:
        return nfe

    def check_inputs(self, process, grid, x_T) -> None:
        """Raise ``ValueError`` now, before anything is traced, for a process, grid or
        ``x_T`` this solver refuses (e.g. statistics made for another process); called by
        :func:`jdiff.sample` after its own checks. ``grid`` may be traced (inside the
        caller's ``jit``); then only what is static can be checked. Default: nothing."""

    def _check_nfe(self, process, grid, nfe) -> None:
        """Raise ``ValueError`` now when ``nfe`` cannot be spent on ``grid`` (a solver
        whose ``init`` uses the target; called with the concrete, unpadded grid before
        :func:`jdiff.sample_padded` traces ``init`` with a traced target)."""


# The true number of grid intervals while jdiff.sample_padded traces a solver's init on a
# padded grid (see Solver.padded_tables); unset otherwise.
_PADDED_LENGTH = contextvars.ContextVar("jdiff_padded_length", default=None)


@contextlib.contextmanager
def padded_length(num_steps):
    """While active, :func:`steps_of` returns ``num_steps`` (an int32 scalar, usually
    traced): the grid ``init`` receives is padded past its ``num_steps`` intervals."""
    token = _PADDED_LENGTH.set(num_steps)
    try:
        yield
    finally:
        _PADDED_LENGTH.reset(token)


def steps_of(grid):
    """The number of intervals of ``grid``: ``grid.shape[0] - 1`` (a Python int), or the
    true length set by :func:`padded_length` (an int32 array) while the grid is padded.
    Table code uses it for everything that depends on the length (``lower_order_final``,
    NFE schedules) and ``grid.shape[0] - 1`` only for array shapes."""
    n = _PADDED_LENGTH.get()
    return grid.shape[0] - 1 if n is None else n


def settings_name(base: str, **settings) -> str:
    """``base`` followed by ``(key=value, ...)`` for the given non-default settings, in a
    form :func:`jdiff.solvers.get` parses back (strings unquoted, floats exact)."""
    if not settings:
        return base
    return f"{base}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def check_key(solver, key):
    if solver.stochastic and key is None:
        raise ValueError(f"{solver.name} is stochastic: pass a PRNG key")


def compute_dtype(x):
    return jnp.result_type(x.dtype, jnp.float32)


def check_grid_shape(grid):
    grid = jnp.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 points, got shape {grid.shape}")
    return grid


def constant_infinite_ends(process, grid):
    """``grid`` with its points at infinite log-SNR made constants for autodiff.

    A grid point where ``sigma = 0`` (``t_data``, the data) or ``alpha = 0`` (a start at
    zero terminal SNR) is an end of the time domain, not a free parameter: ``t_data`` is
    an isolated valid final time (times between it and ``t_min`` are invalid) and
    ``alpha = 0`` only holds at ``t_max``. The curves can also have infinite slope there
    (VP's ``sigma ~ sqrt(t)`` at ``t = 0``, ``log alpha`` at ``alpha = 0``), which would
    turn the gradient into ``0 * inf = NaN``. So those entries get gradient 0, selected
    with ``jnp.where`` after the derivative (a select does not propagate NaN), and every
    other grid time keeps its exact derivative. The values are unchanged.
    """
    fixed = jax.lax.stop_gradient(grid)
    return jnp.where(jnp.isfinite(process.lambda_(fixed)), grid, fixed)


def empty_state(x_T, grid, *, hist_size: int = 0, key=None, aux=None, process=None) -> State:
    """A fresh :class:`State` for ``x_T`` on ``grid`` (helper for ``init``). With
    ``process``, the grid's ends at infinite log-SNR are constants for autodiff
    (:func:`constant_infinite_ends`), so that the coefficient tables ``init`` builds
    from ``state.grid`` have finite derivatives with respect to every grid time."""
    x = jnp.asarray(x_T)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x_T must be floating point, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x_T must have a leading batch axis")
    dt = compute_dtype(x)
    x = x.astype(dt)
    grid = check_grid_shape(grid).astype(dt)
    if process is not None:
        grid = constant_infinite_ends(process, grid)
    zeros = jnp.zeros_like(x)
    if key is not None:
        key = _batch_keys(key, x.shape[0])
    return State(
        x=x,
        i=jnp.zeros((), jnp.int32),
        grid=grid,
        pred=Prediction(zeros, zeros),
        hist=jnp.zeros((hist_size,) + x.shape, dt),
        key=key,
        nfe=jnp.zeros((), jnp.int32),
        aux=aux,
    )


def evaluate(denoiser, x, t, cond) -> Prediction:
    """Call the denoiser at ``(x, t)`` and return ``(x0, eps)`` in ``x``'s dtype."""
    p = denoiser(x, t, cond)
    return Prediction(p.x0.astype(x.dtype), p.eps.astype(x.dtype))


def network_calls(denoiser, t):
    """Network calls (forward passes over the caller's batch) that one evaluation of
    ``denoiser`` at time ``t`` makes, as an int32 scalar: ``denoiser.calls(t)`` when the
    denoiser defines it (guidance wrappers: 2 for classifier-free guidance, 1 outside a
    guidance interval, see :mod:`jdiff.wrappers`), else 1. Solvers add it to
    ``State.nfe`` for every evaluation, so :class:`jdiff.SampleInfo` reports the true
    count; ``t`` may be traced."""
    f = getattr(denoiser, "calls", None)
    if f is None:
        return jnp.int32(1)
    return jnp.asarray(f(t), jnp.int32)


def guided_evaluate(solver, denoiser, state: State, t, cond):
    """The evaluation of DDIM's and Euler's guidance options (``cfgpp``,
    ``guidance_memory``): ``(pred, eps_renoise, hist)``.

    Without the options: the plain prediction, its own eps and the unchanged history.
    With them the denoiser must be a guidance wrapper of :mod:`jdiff.wrappers` (it has
    ``guide(x, t, cond, memory) -> Guided(pred, base, memory)``): ``cfgpp`` renoises
    with the unguided ``base.eps`` (CFG++, Chung et al., 2024), and
    ``guidance_memory`` passes the wrapper's memory (APG's momentum average, Sadat et
    al., 2024) in ``state.hist[0]`` from step to step.
    """
    x = state.x
    if not (solver.cfgpp or solver.guidance_memory):
        p = evaluate(denoiser, x, t, cond)
        return p, p.eps, state.hist
    guide = getattr(denoiser, "guide", None)
    if guide is None:
        raise TypeError(
            f"{solver.name} needs a guidance wrapper from jdiff.wrappers (guidance, autoguidance, "
            f"classifier_guidance) as its denoiser, got {type(denoiser).__name__}"
        )
    g = guide(x, t, cond, state.hist[0] if solver.guidance_memory else None)
    pred = Prediction(g.pred.x0.astype(x.dtype), g.pred.eps.astype(x.dtype))
    eps = g.base.eps.astype(x.dtype) if solver.cfgpp else pred.eps
    hist = state.hist
    if solver.guidance_memory and g.memory is not None:
        hist = g.memory[None].astype(hist.dtype)
    return pred, eps, hist


class GridCurves(NamedTuple):
    """log alpha, log sigma and lambda at every grid point, and the step geometries."""

    log_alpha: jax.Array
    log_sigma: jax.Array
    lam: jax.Array
    steps: Geometry  # batched over the N steps


def grid_curves(process, grid) -> GridCurves:
    la, ls = process.log_alpha(grid), process.log_sigma(grid)
    return GridCurves(la, ls, la - ls, geometry_from(la[:-1], ls[:-1], la[1:], ls[1:]))


def row(table, i):
    """Row ``i`` of a per-step coefficient table (a pytree with leading axis N)."""
    return jax.tree.map(lambda a: a[i], table)


def geometry_at(g: Geometry, i) -> Geometry:
    return jax.tree.map(lambda a: a[i], g)


def history_lambdas(lam, i, K: int):
    """``[lam_i, lam_{i-1}, ..., lam_{i-K+1}]`` with ``-inf`` before the grid start."""
    idx = i - jnp.arange(K)
    return jnp.where(idx >= 0, lam[jnp.maximum(idx, 0)], -jnp.inf)


def valid_history(hist_lam):
    """Number of leading history entries with finite log-SNR (usable as nodes)."""
    ok = jnp.isfinite(hist_lam)
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))


def multistep_order(lam, i, order: int, num_steps, lower_order_final: bool, long_step_ratio=None):
    """Effective order of multistep step ``i``: ``order`` limited by the usable history
    (past outputs at finite log-SNR ``lam``; warm-up) and, with ``lower_order_final`` on
    grids shorter than 15 steps, by the steps left (as in diffusers). ``num_steps`` may
    be traced (:func:`steps_of`). int32 scalar.

    With ``lower_order_final`` and ``long_step_ratio`` (data-prediction solvers whose
    polynomial is in log-SNR: DPM-Solver++, UniPC, DPM-Solver-v3), the last step of a grid
    of 15 or more steps is first order when its log-SNR increment is more than
    ``long_step_ratio`` times the previous one: the extrapolation weights of a multistep
    update grow with that ratio, and the last step of a uniform-in-t grid to a small
    ``t_min`` is 3-5x its predecessor at every length (a quadratic grid's 1.4-1.7x up to
    about 35 steps). Without this, the error jumped where diffusers' short-grid rule stops:
    8x from 14 to 15 steps on the digits model (DPM-Solver++(3M), uniform grid), 2-25x on
    the exact testbeds; with it the error falls steadily with the steps (RESULTS.md
    "Multistep solvers past 15 steps"). Shorter grids keep diffusers' rule alone; logSNR
    and Karras grids (ratios 1.0 and under 1.2) keep the full order."""
    p = jnp.clip(jnp.minimum(order, valid_history(history_lambdas(lam, i, order))), 1, order)
    if not lower_order_final:
        return p.astype(jnp.int32)
    short = jnp.minimum(p, num_steps - i)
    if long_step_ratio is None:
        long = p
    else:
        n = lam.shape[0]
        h = lam[jnp.minimum(i + 1, n - 1)] - lam[i]
        h_prev = lam[i] - lam[jnp.maximum(i - 1, 0)]
        # magnitudes: an inversion runs the grid backwards (negative increments)
        last_long = (i >= 1) & (i == num_steps - 1) & (jnp.abs(h) > long_step_ratio * jnp.abs(h_prev))
        long = jnp.where(last_long, 1, p)
    if isinstance(num_steps, (int, np.integer)):
        p = short if num_steps < 15 else long
    else:
        p = jnp.where(num_steps < 15, short, long)
    return jnp.asarray(p).astype(jnp.int32)


#: ``multistep_order``'s ``long_step_ratio`` for the data-prediction solvers in log-SNR
LONG_STEP_RATIO = 1.5


def step_noise(state: State, dtype=None):
    """Per-sample standard normal noise for step ``state.i``."""
    if state.key is None:
        raise ValueError("this solver is stochastic: pass a PRNG key to sample()/init()")
    return normal_per_sample(state.key, state.x.shape, dtype or state.x.dtype, step=state.i)


def order_schedule(order: int, num_steps: int, nfe: int | None, *, lower_order_final: bool = False, forced=()):
    """Per-step orders of a singlestep solver, as a list of ints, with validation.

    With ``nfe`` given, the orders add up to exactly ``nfe``, lowering the last steps
    first (DPM-Solver's "fast" schedule, Lu et al. 2022, Sec. 3.4); a target that
    cannot be met raises ``ValueError``. Without it, every step uses ``order``;
    ``lower_order_final`` then lowers the final steps as the multistep solvers do.
    Steps listed in ``forced`` (infinite log-SNR increments) are first order. The
    schedule itself is :func:`traced_order_schedule` evaluated now.
    """
    forced = {k % num_steps for k in forced} if num_steps else set()
    if nfe is not None:
        lo, hi = num_steps, order * (num_steps - len(forced)) + len(forced)
        if not lo <= nfe <= hi:
            raise ValueError(
                f"cannot spend exactly {nfe} model calls in {num_steps} steps of order <= {order}; "
                f"use between {lo} and {hi}"
            )
    finite = np.array([k not in forced for k in range(num_steps)], bool)
    # the same arithmetic in NumPy: no small eager programs compiled per grid length
    orders = traced_order_schedule(order, finite, nfe, lower_order_final=lower_order_final)
    return [int(o) for o in orders]


def traced_order_schedule(order: int, finite, nfe, *, lower_order_final: bool = False, num_steps=None):
    """The singlestep order schedule from (possibly traced) per-step flags ``finite``
    (steps with infinite log-SNR increment are first order): with ``nfe`` (an int or a
    traced int32), the free steps start at ``order`` and the last ones are lowered until
    the orders add up to ``nfe`` (clamped to what the grid allows; :func:`order_schedule`
    validates). ``num_steps`` (possibly traced, default ``finite.shape[0]``) is the true
    number of steps when ``finite`` is padded: rows past it are ignored (order 1).
    A NumPy ``finite`` gives a NumPy result."""
    xp = np if isinstance(finite, np.ndarray) else jnp
    n = finite.shape[0]
    if num_steps is not None and not (isinstance(num_steps, (int, np.integer)) and num_steps == n):
        finite = finite & (xp.arange(n) < num_steps)
        n = num_steps
    free = finite.astype(xp.int32)
    if nfe is not None:
        hi = order * xp.sum(free) + (n - xp.sum(free))
        extra = xp.maximum(hi - nfe, 0)
        # capacity (order - 1 each) of the free steps after step j
        after = (xp.cumsum(free[::-1])[::-1] - free) * (order - 1)
        cut = xp.clip(extra - after, 0, order - 1)
        return xp.where(finite, order - cut, 1).astype(xp.int32)
    rows = finite.shape[0]
    orders = xp.full((rows,), order, xp.int32)
    if lower_order_final and isinstance(n, (int, np.integer)):
        if n < 15:
            orders = xp.minimum(orders, n - xp.arange(rows))
    elif lower_order_final:
        orders = xp.where(n < 15, xp.minimum(orders, n - xp.arange(rows)), orders)
    return xp.where(finite, orders, 1).astype(xp.int32)


def infinite_steps(process, grid) -> tuple:
    """Indices of the grid's steps with infinite log-SNR increment (a start at alpha = 0,
    an end at sigma = 0), when the grid is concrete; ``()`` when it is traced."""
    g = concrete(grid)
    if g is None:
        return ()
    g = g.astype(np.float64)
    with jax.ensure_compile_time_eval():
        lam = np.asarray(process.lambda_(jnp.asarray(g[[0, -1]], jnp.float32)))
    out = []
    if lam[0] == -np.inf:
        out.append(0)
    if lam[1] == np.inf:
        out.append(len(g) - 2)
    return tuple(out)
