r"""Inversion: from data back to the noise that regenerates it, for editing.

Every method here maps data ``x0`` (identified with the state at the last grid time,
``t_min``) to what a sampler needs to regenerate it, and :func:`regenerate` runs that
sampler, possibly with another denoiser, conditioning or guidance scale (editing).
The grid is the sampling grid, decreasing from noise to data, as for :func:`jdiff.sample`;
both of its ends must have finite log-SNR.

- :func:`invert` (and :func:`ddim_invert`): the deterministic solvers run forward in
  log-SNR. An exponential-integrator step approximates the same integral whichever way
  it goes, so DDIM, DPM-Solver(++) multistep, UniPC/UniP, DEIS and iPNDM run
  unchanged on the reversed grid, data to noise (the naive DDIM inversion of Song et
  al. 2021, Dhariwal & Nichol 2021, and its multistep generalization). The round trip
  is not exact: it errs at the solver's order. ``refine=k`` makes each step implicit
  and solves it with ``k`` fixed-point iterations (Pan et al., "Effective Real Image
  Editing with Accelerated Iterative Diffusion Inversion", ICCV 2023; Garibi et al.,
  "ReNoise", ECCV 2024): the unknown noisier state ``x_t`` must satisfy

      x_s = c_x x_t + c_0 m(x_t, t) + sum_j c_j m_j,

  the exponential-integrator step ``t -> s`` (toward the data) whose polynomial goes
  through the model output at its own start ``(x_t, t)`` and the ``order - 1`` known
  outputs at ``s`` and before, so
  ``x_t <- (x_s - c_0 m(x_t, t) - sum_j c_j m_j) / c_x``. For DDIM (order 1) that
  equation is exactly the forward DDIM step, so the refined inversion converges to an
  exact inverse of DDIM sampling as ``k`` grows. A multistep solver's forward step also
  uses outputs at noisier states that the inversion has not reached, so for it the
  refined step is an implicit (Adams-Moulton-type) step of the same order, not the
  sampler's inverse: it converges, but need not shrink the round trip.
- :func:`edict_invert`: EDICT (Wallace, Gokul & Naik, "EDICT: Exact Diffusion Inversion
  via Coupled Transformations", CVPR 2023): two coupled DDIM sequences mixed with
  weight ``p``; every step is an affine coupling layer, inverted in closed form. Two
  model calls per step; exact by construction.
- :func:`bdia_invert`: BDIA-DDIM (Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via
  Bi-directional Integration Approximation", ECCV 2024): ``x_{i+1}`` from the last two
  states, ``x_{i+1} = gamma (x_{i-1} - D(x_i; t_i -> t_{i-1})) + D(x_i; t_i -> t_{i+1})``
  with ``D`` the DDIM step, solvable for ``x_{i-1}``. One model call per step; exact by
  construction given the first two states.
- :func:`ddpm_invert`: edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov &
  Michaeli, "An Edit Friendly DDPM Noise Space", CVPR 2024): independently noised
  ``x_t`` at every grid time and the per-step noises ``z_t`` that make DDPM sampling pass
  through them. One model call per step; exact by construction.

Model calls (NFE) of an inversion over ``N`` grid intervals: ``N (1 + refine)`` for
:func:`invert`, ``2 N`` for EDICT, ``N`` for BDIA and edit-friendly DDPM. Regeneration
costs ``N`` (ODE solvers, DDPM), ``2 N`` (EDICT) and ``N - 1`` (BDIA, which starts from
two stored states).

Everything runs under ``jit`` (the compiled programs are cached per settings, like
:func:`jdiff.sample`; ``p``, ``gamma``, ``eta`` and the number of refinement iterations are
traced, so changing them does not recompile); input checks raise ``ValueError`` before
anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import batch_array, error_if
from jdiff._core import ei_coefficients, geometry_from
from jdiff._grid import time_grid
from jdiff._param import broadcast_to_x, check_cond_batch
from jdiff._process import same_process
from jdiff._random import normal_per_sample
from jdiff._sample import _CastInput, _jittable, sample, validate_grid
from jdiff.solvers._base import Solver, compute_dtype, evaluate
from jdiff.solvers._multistep import Multistep
from jdiff.solvers.ddim import DDIM
from jdiff.solvers.ipndm import IPNDM

__all__ = [
    "ODEInversion",
    "EDICTInversion",
    "BDIAInversion",
    "DDPMInversion",
    "invert",
    "ddim_invert",
    "edict_invert",
    "bdia_invert",
    "ddpm_invert",
    "regenerate",
    "invertible",
]


# ------------------------------------------------------------------------ records
def _record(cls, data, meta=()):
    cls = dataclasses.dataclass(frozen=True)(cls)
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
    return cls


class ODEInversion:
    """What :func:`invert` returns: the noise ``x_T`` at ``grid[0]``, the sampling grid
    (decreasing) and the solver whose forward pass regenerates the data."""

    x_T: jax.Array
    grid: jax.Array
    solver: Solver
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class EDICTInversion:
    """What :func:`edict_invert` returns: the coupled pair ``(x_T, y_T)`` at ``grid[0]``,
    the grid, the mixing weight ``p`` and whether the step order alternates."""

    x_T: jax.Array
    y_T: jax.Array
    grid: jax.Array
    p: float
    leapfrog: bool
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class BDIAInversion:
    """What :func:`bdia_invert` returns: the states ``x_T`` at ``grid[0]`` and ``x_1`` at
    ``grid[1]`` (BDIA needs two to start), the grid and ``gamma``."""

    x_T: jax.Array
    x_1: jax.Array
    grid: jax.Array
    gamma: float
    process: Any = None  # the inverting denoiser's (regenerate checks it)


class DDPMInversion:
    """What :func:`ddpm_invert` returns: ``x_T`` at ``grid[0]``, the per-step noises
    ``zs`` (``(N, *x.shape)``; step ``i`` goes from ``grid[i]`` to ``grid[i + 1]``), the
    grid and DDIM's ``eta`` of the sampler (1 = DDPM)."""

    x_T: jax.Array
    zs: jax.Array
    grid: jax.Array
    eta: float
    process: Any = None  # the inverting denoiser's (regenerate checks it)


ODEInversion = _record(ODEInversion, ["x_T", "grid"], ["solver", "process"])
EDICTInversion = _record(EDICTInversion, ["x_T", "y_T", "grid", "p"], ["leapfrog", "process"])
BDIAInversion = _record(BDIAInversion, ["x_T", "x_1", "grid", "gamma"], ["process"])
DDPMInversion = _record(DDPMInversion, ["x_T", "zs", "grid", "eta"], ["process"])


# ------------------------------------------------------------------------- checks
def invertible(solver) -> bool:
    """Whether :func:`invert` supports ``solver``: deterministic DDIM, the deterministic
    multistep exponential integrators (DPM-Solver(++) multistep, UniPC/UniP, DEIS,
    variable-step iPNDM) and iPNDM."""
    if isinstance(solver, DDIM):
        return solver.eta == 0.0
    if isinstance(solver, Multistep):
        return not solver.stochastic
    return isinstance(solver, IPNDM)


def _check_denoiser(denoiser, what="denoiser"):
    process = getattr(denoiser, "process", None)
    if process is None or not callable(denoiser):
        raise TypeError(f"{what} must be a jdiff Denoiser (see jdiff.denoiser), got {type(denoiser).__name__}")
    return process


def _check_unit(name, value):
    """``value`` in (0, 1]: a Python float when concrete (checked now), else the traced
    scalar carrying a runtime check."""
    msg = f"{name} must be a number in (0, 1]"
    if isinstance(value, jax.core.Tracer):
        if jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(f"{msg}, got a traced array of shape {jnp.shape(value)}")
        return error_if(value, ~((value > 0) & (value <= 1)), msg)
    ok = isinstance(value, (int, float, np.floating, np.integer, np.ndarray, jax.Array)) and not isinstance(value, bool)
    ok = ok and np.shape(value) == ()
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise ValueError(f"{msg}, got {value!r}")
    return v


def _setup(denoiser, x0, grid, cond, *, nfe, grid_kind, calls, min_steps, what):
    """Shared checks; returns ``(process, x0, grid)`` (with runtime checks if traced)."""
    process = _check_denoiser(denoiser)
    x0 = batch_array(x0, "the data", prefix=f"{what}: ")
    if grid is None:
        if nfe is None:
            raise ValueError(f"{what}: give a time grid or a target nfe")
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < calls * min_steps:
            raise ValueError(f"{what}: nfe must be an integer >= {calls * min_steps}, got {nfe!r}")
        if nfe % calls:
            raise ValueError(f"{what} makes {calls} model calls per step: nfe must be a multiple of {calls}, got {nfe}")
        grid = time_grid(process, int(nfe) // calls, kind=grid_kind)
    grid = validate_grid(process, grid)
    N = grid.shape[0] - 1
    if N < min_steps:
        raise ValueError(f"{what} needs at least {min_steps} grid steps, the grid has {N}")
    lam = process.lambda_(jnp.stack([grid[0], grid[-1]]).astype(compute_dtype(x0)))
    grid = error_if(
        grid,
        ~jnp.all(jnp.isfinite(lam)),
        f"{what}: both grid ends need finite log-SNR (the grid must end at t_min, not at t_data where "
        "sigma = 0, and start where alpha > 0); use jdiff.time_grid(..., final='t_min')",
    )
    x0 = error_if(
        x0, ~jnp.all(jnp.isfinite(x0)), f"{what}: the data of shape {x0.shape} has non-finite values (NaN or inf)"
    )
    check_cond_batch(cond, x0.shape[0], "the data", x0.shape)
    return process, x0, grid


def _cast(denoiser, x):
    dt = compute_dtype(x)
    return denoiser if x.dtype == dt else _CastInput(denoiser, x.dtype)


def _num(v, x):
    """A setting as an array of the compute dtype: a traced argument, so that one compiled
    program serves every value."""
    return jnp.asarray(v, compute_dtype(jnp.asarray(x)))


def _maybe_jit(fn, jitted, tree):
    return jitted if _jittable(tree) else fn


# ---------------------------------------------------------------- DDIM helpers
def _curves(process, grid):
    return process.log_alpha(grid), process.log_sigma(grid)


def _ddim_coefs(la, ls, i, j):
    """``(A, B)`` of the DDIM step from grid point ``i`` to ``j`` (either direction),
    ``x_j = A x_i + B eps(x_i)``: ``A = alpha_j / alpha_i``, ``B = sigma_j (1 - e^{-h})``
    with ``h = lambda_j - lambda_i`` (Song et al. 2021, Eq. 12 with eta = 0)."""
    A = jnp.exp(la[j] - la[i])
    h = (la[j] - ls[j]) - (la[i] - ls[i])
    return A, -jnp.exp(ls[j]) * jnp.expm1(-h)


def _eps(den, x, t, cond):
    return den(x, t, cond).eps.astype(x.dtype)


# ------------------------------------------------------------ ODE solvers (DDIM)
def _refine_table(solver, process, rgrid):
    """Coefficients of the implicit step for each reversed interval ``s = rgrid[j] ->
    t = rgrid[j + 1]``: the forward step ``t -> s`` with nodes ``m(x_t, t)`` (its start)
    and the ``K`` known outputs at ``rgrid[j], rgrid[j - 1], ...`` (see the module
    docstring)."""
    mode = _mode(solver)
    K = _refine_order(solver) - 1
    la, ls = _curves(process, rgrid)
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


def _ode_invert_impl(solver, den, x0, grid, cond, iters, refine):
    dt = compute_dtype(x0)
    den = _cast(den, x0)
    process = den.process
    rgrid = grid.astype(dt)[::-1]
    state = solver.init(x0.astype(dt), rgrid, process)
    mode = _mode(solver)
    K = _refine_order(solver) - 1
    table = _refine_table(solver, process, state.grid) if refine else None

    def body(carry, _):
        st, hist = carry
        x_s, j = st.x, st.i
        st = solver.step(den, st, cond)
        if not refine:
            return (st, hist), None
        m_s = st.pred.eps if mode == "noise" else st.pred.x0
        if K:
            hist = jnp.concatenate([m_s[None].astype(dt), hist[:-1]], axis=0)
        c = jax.tree.map(lambda a: a[j], table)
        known = x_s
        for k in range(K):
            known = known - c.cm[k + 1].astype(dt) * hist[k]
        t = st.grid[j + 1]

        def fixed_point(_, x_t):
            p = evaluate(den, x_t, t, cond)
            m_t = p.eps if mode == "noise" else p.x0
            return (known - c.cm[0].astype(dt) * m_t) / c.cx.astype(dt)

        x = jax.lax.fori_loop(0, iters, fixed_point, st.x)
        return (st._replace(x=x, nfe=st.nfe + iters), hist), None

    hist = jnp.zeros((K,) + x0.shape, dt)
    (state, _), _ = jax.lax.scan(body, (state, hist), None, length=grid.shape[0] - 1)
    return state.x.astype(x0.dtype)


_ode_invert = jax.jit(_ode_invert_impl, static_argnames=("solver", "refine"))


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
    run = _maybe_jit(_ode_invert_impl, _ode_invert, (denoiser, cond))
    # refine > 0 is one compiled program whatever the count (a traced loop bound)
    iters = jnp.asarray(int(refine), jnp.int32)
    x_T = run(solver, denoiser, x0, grid, cond, iters, refine=refine > 0)
    return ODEInversion(x_T=x_T, grid=grid, solver=solver, process=denoiser.process)


def ddim_invert(denoiser, x0, grid=None, *, nfe=None, cond=None, refine: int = 0, grid_kind: str = "default"):
    """DDIM inversion (Song et al., ICLR 2021): :func:`invert` with ``jdiff.solvers.ddim()``;
    see it for the arguments. ``refine = k`` iterates the exact inverse of each DDIM
    step ``k`` times (Pan et al., ICCV 2023)."""
    from jdiff.solvers import ddim

    return invert(ddim(), denoiser, x0, grid, nfe=nfe, cond=cond, refine=refine, grid_kind=grid_kind)


# -------------------------------------------------------------------------- EDICT
def _edict_step(den, x, y, la, ls, grid, i, cond, p, leapfrog):
    """One EDICT denoising step ``grid[i] -> grid[i + 1]`` (Wallace et al. 2023, Eqs. 10-13)."""
    A, B = _ddim_coefs(la, ls, i, i + 1)
    t = grid[i]
    swap = jnp.logical_and(leapfrog, i % 2 == 1)
    x, y = jnp.where(swap, y, x), jnp.where(swap, x, y)
    xi = A * x + B * _eps(den, y, t, cond)
    yi = A * y + B * _eps(den, xi, t, cond)
    x = p * xi + (1 - p) * yi
    y = p * yi + (1 - p) * x
    return jnp.where(swap, y, x), jnp.where(swap, x, y)


def _edict_unstep(den, x, y, la, ls, grid, i, cond, p, leapfrog):
    """The exact inverse of :func:`_edict_step`."""
    A, B = _ddim_coefs(la, ls, i, i + 1)
    t = grid[i]
    swap = jnp.logical_and(leapfrog, i % 2 == 1)
    x, y = jnp.where(swap, y, x), jnp.where(swap, x, y)
    yi = (y - (1 - p) * x) / p
    xi = (x - (1 - p) * yi) / p
    y = (yi - B * _eps(den, xi, t, cond)) / A
    x = (xi - B * _eps(den, y, t, cond)) / A
    return jnp.where(swap, y, x), jnp.where(swap, x, y)


def _edict_impl(den, x, y, grid, cond, p, leapfrog, inverse):
    dt = compute_dtype(x)
    den = _cast(den, x)
    grid = grid.astype(dt)
    la, ls = _curves(den.process, grid)
    N = grid.shape[0] - 1
    fn = _edict_unstep if inverse else _edict_step

    def body(carry, i):
        a, b = carry
        return fn(den, a, b, la, ls, grid, i, cond, p, leapfrog), None

    idx = jnp.arange(N - 1, -1, -1) if inverse else jnp.arange(N)
    (x, y), _ = jax.lax.scan(body, (x.astype(dt), y.astype(dt)), idx)
    return x, y


_edict = jax.jit(_edict_impl, static_argnames=("leapfrog", "inverse"))


def edict_invert(
    denoiser, x0, grid=None, *, nfe=None, cond=None, p: float = 0.93, leapfrog: bool = True, grid_kind="default"
):
    """EDICT inversion (Wallace, Gokul & Naik, "EDICT: Exact Diffusion Inversion via
    Coupled Transformations", CVPR 2023).

    Two sequences ``x, y`` (both start at the data) are updated in turn by DDIM steps
    whose noise comes from the other one, ``x' = A x + B eps(y)``, ``y' = A y + B eps(x')``,
    and mixed, ``x'' = p x' + (1 - p) y'``, ``y'' = p y' + (1 - p) x''`` (Eqs. 10-13;
    ``A = alpha_s / alpha_t``, ``B = sigma_s (1 - e^{-h})`` for the step ``t -> s``). Each
    of the four updates is affine in the sequence it changes, so the step inverts in
    closed form and the round trip is exact up to rounding. With ``leapfrog`` the roles
    of ``x`` and ``y`` swap on every other step (the official code's alternation).

    Args:
      denoiser, x0, grid, cond, grid_kind: as in :func:`invert`.
      nfe: model calls when no grid is given (even: 2 per step).
      p: mixing weight in (0, 1] (the paper uses 0.93); a number, or a traced scalar
        checked at run time (one compiled program serves every value).
      leapfrog: alternate which sequence is updated first.

    Returns:
      :class:`EDICTInversion`; :func:`regenerate` returns the ``x`` sequence.

    Raises:
      ValueError: ``p`` outside (0, 1], and the input errors of :func:`invert`.
    """
    p = _check_unit("EDICT's mixing weight p", p)
    _, x0, grid = _setup(
        denoiser, x0, grid, cond, nfe=nfe, grid_kind=grid_kind, calls=2, min_steps=1, what="edict_invert"
    )
    run = _maybe_jit(_edict_impl, _edict, (denoiser, cond))
    x, y = run(denoiser, x0, x0, grid, cond, _num(p, x0), leapfrog=bool(leapfrog), inverse=True)
    return EDICTInversion(
        x_T=x.astype(x0.dtype),
        y_T=y.astype(x0.dtype),
        grid=grid,
        p=p,
        leapfrog=bool(leapfrog),
        process=denoiser.process,
    )


# --------------------------------------------------------------------------- BDIA
def _bdia_impl(den, a, b, grid, cond, gamma, inverse):
    """Forward: ``(a, b) = (x_0, x_1)`` -> ``x_N``. Inverse: ``(a, b) = (x_N, unused)``
    -> ``(x_0, x_1)``. Indices are the sampling grid's (``x_i`` at ``grid[i]``)."""
    dt = compute_dtype(a)
    den = _cast(den, a)
    grid = grid.astype(dt)
    la, ls = _curves(den.process, grid)
    N = grid.shape[0] - 1
    a = a.astype(dt)

    def toward(x, e, i, j):
        A, B = _ddim_coefs(la, ls, i, j)
        return A * x + B * e

    if not inverse:

        def fwd(carry, i):
            x_prev, x_i = carry
            e = _eps(den, x_i, grid[i], cond)
            x_next = gamma * (x_prev - toward(x_i, e, i, i - 1)) + toward(x_i, e, i, i + 1)
            return (x_i, x_next), None

        (_, x_N), _ = jax.lax.scan(fwd, (a, b.astype(dt)), jnp.arange(1, N))
        return x_N, x_N

    # x_{N-1} from the data by one DDIM inversion step (the model at the data)
    x_Nm1 = toward(a, _eps(den, a, grid[N], cond), N, N - 1)

    def bwd(carry, i):
        x_i, x_next = carry
        e = _eps(den, x_i, grid[i], cond)
        x_prev = (x_next - toward(x_i, e, i, i + 1)) / gamma + toward(x_i, e, i, i - 1)
        return (x_prev, x_i), None

    (x_0, x_1), _ = jax.lax.scan(bwd, (x_Nm1, a), jnp.arange(N - 1, 0, -1))
    return x_0, x_1


_bdia = jax.jit(_bdia_impl, static_argnames=("inverse",))


def bdia_invert(denoiser, x0, grid=None, *, nfe=None, cond=None, gamma: float = 1.0, grid_kind="default"):
    """BDIA-DDIM inversion (Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via
    Bi-directional Integration Approximation", ECCV 2024, Eq. 18).

    Sampling starts with a DDIM step ``x_0 -> x_1`` and then takes

        x_{i+1} = gamma (x_{i-1} - D(x_i; t_i -> t_{i-1})) + D(x_i; t_i -> t_{i+1}),

    with ``D(x; t_i -> t_j)`` the DDIM step from ``x`` at ``t_i`` to ``t_j`` (one model call
    at ``(x_i, t_i)`` serves both); ``gamma = 1`` integrates over ``[t_{i+1}, t_{i-1}]``
    symmetrically about ``t_i``. Solving for ``x_{i-1}`` inverts each step exactly, so
    the inversion (``x_{N-1}`` from the data by one DDIM inversion step, then back to
    ``x_0``) regenerates the data up to rounding. Rounding grows by ``1 / gamma`` per
    step.

    Args:
      denoiser, x0, grid, cond, grid_kind: as in :func:`invert`.
      nfe: model calls when no grid is given (one per step, at least 2).
      gamma: in (0, 1] (the paper's default for images is about 0.96); may be traced.

    Returns:
      :class:`BDIAInversion` holding ``x_T`` and ``x_1``; :func:`regenerate` takes
      ``N - 1`` model calls.

    Raises:
      ValueError: ``gamma`` outside (0, 1], a grid of fewer than 2 steps, and the input
        errors of :func:`invert`.
    """
    gamma = _check_unit("BDIA's gamma", gamma)
    _, x0, grid = _setup(
        denoiser, x0, grid, cond, nfe=nfe, grid_kind=grid_kind, calls=1, min_steps=2, what="bdia_invert"
    )
    run = _maybe_jit(_bdia_impl, _bdia, (denoiser, cond))
    x_T, x_1 = run(denoiser, x0, x0, grid, cond, _num(gamma, x0), inverse=True)
    return BDIAInversion(
        x_T=x_T.astype(x0.dtype), x_1=x_1.astype(x0.dtype), grid=grid, gamma=gamma, process=denoiser.process
    )


# ------------------------------------------------------------- edit-friendly DDPM
def _ddpm_tables(process, grid, eta):
    """Per step ``i`` (``grid[i] -> grid[i + 1]``): ``alpha``, the eps coefficient
    ``sqrt(sigma^2 - c^2)`` and the noise scale ``c = eta sigma sqrt(1 - e^{-2h})`` at
    ``grid[i + 1]`` (DDIM's Eq. 16 for any process; eta = 1 is DDPM)."""
    la, ls = _curves(process, grid)
    h = (la[1:] - ls[1:]) - (la[:-1] - ls[:-1])
    one_m = -jnp.expm1(-2.0 * h)
    s = jnp.exp(ls[1:])
    return jnp.exp(la[1:]), s * jnp.sqrt(jnp.maximum(1.0 - eta**2 * one_m, 0.0)), eta * s * jnp.sqrt(one_m)


def _ddpm_invert_impl(den, x0, grid, cond, key, eta):
    dt = compute_dtype(x0)
    den = _cast(den, x0)
    grid = grid.astype(dt)
    x0 = x0.astype(dt)
    process = den.process
    N = grid.shape[0] - 1
    a_next, keep, c = _ddpm_tables(process, grid, eta)

    def noised(i):
        # x_i = alpha_i x0 + sigma_i eps_i with its own noise per grid time; x_N is the data
        a = broadcast_to_x(process.alpha(grid[i]), x0)
        s = broadcast_to_x(process.sigma(grid[i]), x0)
        x = a * x0 + s * normal_per_sample(key, x0.shape, dt, step=i)
        return jnp.where(i == N, x0, x)

    def body(_, i):
        x_i, x_next = noised(i), noised(i + 1)
        p = evaluate(den, x_i, grid[i], cond)
        mu = a_next[i] * p.x0 + keep[i] * p.eps
        return None, (x_next - mu) / c[i]

    _, zs = jax.lax.scan(body, None, jnp.arange(N))
    return noised(0), zs


_ddpm_invert = jax.jit(_ddpm_invert_impl)


def ddpm_invert(denoiser, x0, grid=None, *, key, nfe=None, cond=None, eta: float = 1.0, grid_kind="default"):
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, "An Edit
    Friendly DDPM Noise Space: Inversion and Manipulations", CVPR 2024, Eqs. 6-7).

    Every grid time gets its own noised copy of the data, ``x_i = alpha_i x0 + sigma_i
    eps_i`` with independent ``eps_i`` (``x_N`` is the data itself), and the noise of each
    DDPM step is solved for: ``z_i = (x_{i+1} - mu(x_i)) / c_i``, where
    ``mu(x_i) = alpha_{i+1} x0_hat + sqrt(sigma_{i+1}^2 - c_i^2) eps_hat`` and
    ``c_i = eta sigma_{i+1} sqrt(1 - e^{-2 h_i})`` (DDPM for ``eta = 1``). Sampling with
    those noises passes through every ``x_i`` again, so regeneration is exact up to
    rounding; with other conditioning the same noises carry the image's structure.
    The ``z_i`` are not standard normal (the paper's point: they are edit friendly).

    Args:
      denoiser, x0, grid, cond, grid_kind: as in :func:`invert`.
      key: PRNG key of the noised copies (one key, sample ``i`` then uses
        ``fold_in(key, i)``, or one per sample).
      nfe: model calls when no grid is given (one per step).
      eta: DDIM's stochasticity of the sampler in (0, 1]; may be traced.

    Returns:
      :class:`DDPMInversion`.

    Raises:
      ValueError: ``eta`` outside (0, 1], a missing key, and the input errors of
        :func:`invert`.
    """
    eta = _check_unit("eta", eta)
    if key is None:
        raise ValueError("ddpm_invert draws the noised copies of the data: pass key=jax.random.key(seed)")
    _, x0, grid = _setup(
        denoiser, x0, grid, cond, nfe=nfe, grid_kind=grid_kind, calls=1, min_steps=1, what="ddpm_invert"
    )
    run = _maybe_jit(_ddpm_invert_impl, _ddpm_invert, (denoiser, cond, key))
    x_T, zs = run(denoiser, x0, grid, cond, key, _num(eta, x0))
    return DDPMInversion(x_T=x_T.astype(x0.dtype), zs=zs, grid=grid, eta=eta, process=denoiser.process)


def _ddpm_regen_impl(den, x_T, zs, grid, cond, eta):
    dt = compute_dtype(x_T)
    den = _cast(den, x_T)
    grid = grid.astype(dt)
    a_next, keep, c = _ddpm_tables(den.process, grid, eta)

    def body(x, iz):
        i, z = iz
        p = evaluate(den, x, grid[i], cond)
        return a_next[i] * p.x0 + keep[i] * p.eps + c[i] * z.astype(dt), None

    x, _ = jax.lax.scan(body, x_T.astype(dt), (jnp.arange(zs.shape[0]), zs))
    return x


_ddpm_regen = jax.jit(_ddpm_regen_impl)


# --------------------------------------------------------------------- regenerate
def regenerate(denoiser, inversion, *, cond=None):
    """Sample from an inversion: the data again with the inversion's denoiser and
    conditioning, an edit of it with others.

    Args:
      denoiser: a :class:`~jdiff.Denoiser` or wrapper; it may differ from the one used
        to invert (another conditioning model, another guidance scale) but must use the
        same process.
      inversion: what an ``*_invert`` function returned.
      cond: the conditioning of the regeneration (per-sample leaves batched).

    Returns:
      ``(B, ...)`` samples in the dtype of the inversion's ``x_T``.

    Raises:
      TypeError: ``inversion`` is not an inversion record, or ``denoiser`` not a denoiser.
      ValueError: a ``cond`` whose batch is not the inversion's, or a denoiser of another
        process than the inverting one.
    """
    _check_denoiser(denoiser)
    if not isinstance(inversion, (ODEInversion, EDICTInversion, BDIAInversion, DDPMInversion)):
        raise TypeError(f"inversion must be what an *_invert function returned, got {type(inversion).__name__}")
    if inversion.process is not None and not same_process(denoiser.process, inversion.process):
        raise ValueError(
            f"regenerate: the denoiser's process {denoiser.process!r} is not the one the inversion was made "
            f"with ({inversion.process!r}); its x_T and grid only mean something under that process"
        )
    x_T = inversion.x_T
    check_cond_batch(cond, x_T.shape[0], "the inversion's x_T", x_T.shape)
    if isinstance(inversion, ODEInversion):
        return sample(inversion.solver, denoiser, x_T, inversion.grid, cond=cond)
    tree = (denoiser, cond)
    if isinstance(inversion, EDICTInversion):
        run = _maybe_jit(_edict_impl, _edict, tree)
        x, _ = run(
            denoiser,
            x_T,
            inversion.y_T,
            inversion.grid,
            cond,
            _num(inversion.p, x_T),
            leapfrog=inversion.leapfrog,
            inverse=False,
        )
    elif isinstance(inversion, BDIAInversion):
        run = _maybe_jit(_bdia_impl, _bdia, tree)
        x, _ = run(denoiser, x_T, inversion.x_1, inversion.grid, cond, _num(inversion.gamma, x_T), inverse=False)
    else:
        run = _maybe_jit(_ddpm_regen_impl, _ddpm_regen, tree)
        x = run(denoiser, x_T, inversion.zs, inversion.grid, cond, _num(inversion.eta, x_T))
    return x.astype(x_T.dtype)
