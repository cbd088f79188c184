"""The exact inversions: EDICT, BDIA and edit-friendly DDPM (each step inverted in closed form).

Each method is one solver run by :func:`jdiff.sample`'s loop. With ``inverse=True`` its
``direction`` is ``"to_noise"``: it runs on the reversed (increasing) grid from the data,
and its ``finish`` returns what regeneration needs (EDICT's pair, BDIA's two states,
DDPM's noises). With ``inverse=False`` it samples, the starting data beyond ``x_T`` being
fields of the solver (a pytree, see :class:`~jdiff.solvers.Solver`). The steps index the
sampling grid (decreasing) as the papers do: ``aux`` holds it and its log alpha, log sigma.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jdiff._param import broadcast_to_x
from jdiff._random import normal_per_sample
from jdiff._sample import sample
from jdiff.inversion._records import (
    BDIAInversion,
    DDPMInversion,
    EDICTInversion,
    _check_unit,
    _num,
    _setup,
    _solver,
)
from jdiff.solvers._base import Solver, empty_state, evaluate, network_calls
from jdiff.solvers.ddim import ddim_coefficients, ddim_table

__all__ = ["edict_invert", "bdia_invert", "ddpm_invert", "EDICT", "BDIA", "EditFriendlyDDPM"]


# ---------------------------------------------------------------- DDIM helpers
def _curves(process, grid):
    return process.log_alpha(grid), process.log_sigma(grid)


def _ddim_coefs(la, ls, i, j):
    """``(A, B)`` of the DDIM step from grid point ``i`` to ``j`` (either direction),
    ``x_j = A x_i + B eps(x_i)`` (:func:`jdiff.solvers.ddim.ddim_coefficients`)."""
    return ddim_coefficients(la[i], ls[i], la[j], ls[j])


def _eps(den, x, t, cond):
    return den(x, t, cond).eps.astype(x.dtype)


class _Exact(Solver):
    """What the exact methods' solvers share: ``inverse`` sets the direction, ``aux``
    starts with the sampling grid (decreasing, as the papers index it), and an inversion
    finishes with the state and the second array it carries in ``hist[0]`` (EDICT's
    second sequence, BDIA's previous state)."""

    order = 1
    who = "exact"

    @property
    def direction(self):
        return "to_noise" if self.inverse else "to_data"

    @property
    def name(self):
        return f"{self.who}_invert" if self.inverse else self.who

    def sampling_grid(self, state):
        """The sampling grid of ``state`` (decreasing): its own grid reversed when inverting."""
        return state.grid[::-1] if self.inverse else state.grid

    def finish(self, state, dtype):
        x = state.x.astype(dtype)
        return (x, state.hist[0].astype(dtype)) if self.inverse else x


def _advance(state, x, other, calls):
    """The state after a step of EDICT or BDIA: ``x`` and the second array ``other``
    (EDICT's second sequence, BDIA's previous state) in ``hist[0]``."""
    return state._replace(x=x, hist=other[None], i=state.i + 1, nfe=state.nfe + calls)


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


@_solver(data=["p", "y_T"], meta=["leapfrog", "inverse"])
class EDICT(_Exact):
    """EDICT's coupled DDIM steps as a solver (see :func:`edict_invert`).

    ``inverse=True`` runs data to noise with both sequences starting at the data and
    finishes with the pair ``(x_T, y_T)``; ``inverse=False`` samples from ``x_T``, the
    second sequence starting at the field ``y_T``. The state's ``x`` is the first
    sequence, ``hist[0]`` the second. Two model calls per step.
    """

    p: Any
    y_T: Any = None
    leapfrog: bool = True
    inverse: bool = False

    who = "edict"

    def nfe(self, num_steps, to_data=False, from_noise=False):
        return 2 * num_steps

    def num_steps(self, nfe, to_data=False, from_noise=False):
        return nfe // 2

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = empty_state(x_T, grid, hist_size=1, process=process)
        y = state.x if self.y_T is None else jnp.asarray(self.y_T).astype(state.x.dtype)
        g = self.sampling_grid(state)
        return state._replace(hist=y[None], aux=(g, *_curves(process, g)))

    def step(self, denoiser, state, cond=None):
        g, la, ls = state.aux
        # the sampling step grid[i] -> grid[i + 1] this step takes or undoes
        i = g.shape[0] - 2 - state.i if self.inverse else state.i
        move = _edict_unstep if self.inverse else _edict_step
        x, y = move(denoiser, state.x, state.hist[0], la, ls, g, i, cond, self.p, self.leapfrog)
        return _advance(state, x, y, 2 * network_calls(denoiser, g[i]))


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
    solver = EDICT(_num(p, x0), None, bool(leapfrog), inverse=True)
    x, y = sample(solver, denoiser, x0, grid[::-1], cond=cond)
    return EDICTInversion(x_T=x, y_T=y, grid=grid, p=p, leapfrog=bool(leapfrog), process=denoiser.process)


# --------------------------------------------------------------------------- BDIA
@_solver(data=["gamma", "x_0", "t_0"], meta=["inverse"])
class BDIA(_Exact):
    """BDIA-DDIM as a solver (see :func:`bdia_invert`); the state's ``x`` is ``x_i`` at
    ``t_i`` and ``hist[0]`` the state before it. One model call per step.

    ``inverse=True`` runs data to noise: from the data ``x_N`` one DDIM inversion step
    to ``x_{N-1}``, then BDIA's update solved for ``x_{i-1}``; it finishes with
    ``(x_0, x_1)``. ``inverse=False`` samples from the second state: :func:`jdiff.sample`
    starts at ``x_1`` on ``grid[1:]``, and the first state ``x_0`` and its time ``t_0 =
    grid[0]`` are fields (the update reads the two last states, and its coefficients
    reach back to ``t_{i-1}``).
    """

    gamma: Any
    x_0: Any = None
    t_0: Any = None
    inverse: bool = False

    who = "bdia"

    @property
    def min_steps(self):
        return 2 if self.inverse else 1

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = empty_state(x_T, grid, hist_size=1, process=process)
        if self.inverse:
            g, prev = state.grid[::-1], state.hist[0]
        else:
            g = jnp.concatenate([jnp.asarray(self.t_0, state.grid.dtype)[None], state.grid])
            prev = jnp.asarray(self.x_0).astype(state.x.dtype)
        return state._replace(hist=prev[None], aux=(g, *_curves(process, g)))

    def step(self, denoiser, state, cond=None):
        g, la, ls = state.aux
        N = g.shape[0] - 1
        x = state.x
        i = N - state.i if self.inverse else state.i + 1  # x = x_i at g[i]
        e = _eps(denoiser, x, g[i], cond)

        def toward(j):
            A, B = _ddim_coefs(la, ls, i, j)
            return A * x + B * e

        if self.inverse:
            # x_{N-1} from the data by one DDIM inversion step, then x_{i-1} from x_{i+1}, x_i
            bdia = (state.hist[0] - toward(jnp.minimum(i + 1, N))) / self.gamma + toward(i - 1)
            new = jnp.where(state.i == 0, toward(i - 1), bdia)
        else:
            new = self.gamma * (state.hist[0] - toward(i - 1)) + toward(i + 1)
        return _advance(state, new, x, network_calls(denoiser, g[i]))


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
    x_T, x_1 = sample(BDIA(_num(gamma, x0), inverse=True), denoiser, x0, grid[::-1], cond=cond)
    return BDIAInversion(x_T=x_T, x_1=x_1, grid=grid, gamma=gamma, process=denoiser.process)


# ------------------------------------------------------------- edit-friendly DDPM
@_solver(data=["eta", "zs"], meta=["inverse"])
class EditFriendlyDDPM(_Exact):
    """Edit-friendly DDPM as a solver (see :func:`ddpm_invert`): DDIM's steps with
    ``eta`` (:func:`jdiff.solvers.ddim.ddim_table`) and given noises. One model call per step.

    ``inverse=True`` (stochastic: the key draws the noised copies) runs data to noise:
    its state is the copy ``x_{i+1}``, and each step draws ``x_i`` and solves for the noise
    ``z_i`` of the DDPM step between them, kept in ``hist`` (``(N, *x.shape)``); it
    finishes with ``(x_T, zs)`` (the noises in the compute dtype). ``inverse=False``
    samples from ``x_T`` with the noises ``zs``, a field.
    """

    eta: Any
    zs: Any = None
    inverse: bool = False

    who = "ddpm"

    @property
    def stochastic(self):
        return self.inverse

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        N = grid.shape[0] - 1 if self.inverse else 0
        state = empty_state(x_T, grid, hist_size=N, key=key if self.inverse else None, process=process)
        g = self.sampling_grid(state)
        return state._replace(aux=(g, ddim_table(process, g, self.eta), state.x))

    def step(self, denoiser, state, cond=None):
        g, c, x0 = state.aux
        x = state.x
        if self.inverse:
            i = g.shape[0] - 2 - state.i
            # x_i = alpha_i x0 + sigma_i eps_i with its own noise per grid time
            process = denoiser.process
            a = broadcast_to_x(process.alpha(g[i]), x0)
            s = broadcast_to_x(process.sigma(g[i]), x0)
            x_i = a * x0 + s * normal_per_sample(state.key, x0.shape, x0.dtype, step=i)
            p = evaluate(denoiser, x_i, g[i], cond)
            z = (x - (c.a[i] * p.x0 + c.keep[i] * p.eps)) / c.c[i]
            new, hist = x_i, state.hist.at[i].set(z)
        else:
            i, hist = state.i, state.hist
            p = evaluate(denoiser, x, g[i], cond)
            new = c.a[i] * p.x0 + c.keep[i] * p.eps + c.c[i] * self.zs[i].astype(x.dtype)
        calls = network_calls(denoiser, g[i])
        return state._replace(x=new, i=state.i + 1, pred=p, hist=hist, nfe=state.nfe + calls)

    def finish(self, state, dtype):
        x = state.x.astype(dtype)
        return (x, state.hist) if self.inverse else x


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
    solver = EditFriendlyDDPM(_num(eta, x0), inverse=True)
    x_T, zs = sample(solver, denoiser, x0, grid[::-1], cond=cond, key=key)
    return DDPMInversion(x_T=x_T, zs=zs, grid=grid, eta=eta, process=denoiser.process)
