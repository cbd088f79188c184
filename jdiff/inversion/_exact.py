"""The exact inversions: EDICT, BDIA and edit-friendly DDPM (each step inverted in closed form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff._param import broadcast_to_x
from jdiff._random import normal_per_sample
from jdiff.inversion._records import (
    BDIAInversion,
    DDPMInversion,
    EDICTInversion,
    _cast,
    _check_unit,
    _maybe_jit,
    _num,
    _setup,
)
from jdiff.solvers._base import compute_dtype, evaluate
from jdiff.solvers.ddim import ddim_coefficients, ddim_table

__all__ = ["edict_invert", "bdia_invert", "ddpm_invert"]


# ---------------------------------------------------------------- DDIM helpers
def _curves(process, grid):
    return process.log_alpha(grid), process.log_sigma(grid)


def _ddim_coefs(la, ls, i, j):
    """``(A, B)`` of the DDIM step from grid point ``i`` to ``j`` (either direction),
    ``x_j = A x_i + B eps(x_i)`` (:func:`jdiff.solvers.ddim.ddim_coefficients`)."""
    return ddim_coefficients(la[i], ls[i], la[j], ls[j])


def _eps(den, x, t, cond):
    return den(x, t, cond).eps.astype(x.dtype)


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
    ``A = alpha_s / alpha_t``, ``B = -sigma_s (e^h - 1)`` for the step ``t -> s``). Each
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
def _ddpm_invert_impl(den, x0, grid, cond, key, eta):
    dt = compute_dtype(x0)
    den = _cast(den, x0)
    grid = grid.astype(dt)
    x0 = x0.astype(dt)
    process = den.process
    N = grid.shape[0] - 1
    a_next, keep, c = ddim_table(process, grid, eta)

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
    a_next, keep, c = ddim_table(den.process, grid, eta)

    def body(x, iz):
        i, z = iz
        p = evaluate(den, x, grid[i], cond)
        return a_next[i] * p.x0 + keep[i] * p.eps + c[i] * z.astype(dt), None

    x, _ = jax.lax.scan(body, x_T.astype(dt), (jnp.arange(zs.shape[0]), zs))
    return x


_ddpm_regen = jax.jit(_ddpm_regen_impl)
