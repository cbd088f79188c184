"""DDRM: the posterior sampler with its own update in the operator's spectral coordinates."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._param import Prediction
from jdiff._random import _batch_keys, normal_per_sample
from jdiff.inverse_problems._engine import PosteriorSolver, measurement_of, posterior_sample, sampling_settings
from jdiff.inverse_problems._operators import _check_number, _safe_div
from jdiff.solvers._base import check_key, empty_state, network_calls, settings_name

__all__ = ["DDRM", "ddrm"]


def _spectral(m, dt):
    """``(singular values, observed, ybar = U^T y / s, its noise sigma_y / s)``."""
    sv = m.operator.singular_values().astype(dt)
    ybar = _safe_div(m.operator.Ut(m.y.astype(dt)), sv)
    return sv, sv > 0, ybar, _safe_div(jnp.asarray(m.sigma_y, dt), sv)


def _curves(process, grid, dt):
    a, s = process.alpha(grid).astype(dt), process.sigma(grid).astype(dt)
    return a, s / a


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _start(m, grid, keys, shape, dtype):
    a, rho = _curves(m.process, grid, dtype)
    sv, obs, ybar, ny = _spectral(m, dtype)
    z = normal_per_sample(keys, (shape[0], sv.shape[0]), dtype, step=2**31 - 1)
    clean = obs & (rho[0] >= ny)
    xb = jnp.where(clean, ybar + jnp.sqrt(jnp.maximum(rho[0] ** 2 - ny**2, 0)) * z, rho[0] * z)
    return a[0] * m.operator.V(xb)


@dataclasses.dataclass(frozen=True)
class DDRM(PosteriorSolver):
    """DDRM as a solver (see :func:`ddrm`). It cannot take another solver's update: each
    spectral coordinate follows its own rule (DDIM, towards ``ybar``, or a mix with fresh
    noise) chosen by comparing the noise level with the measurement's, which is not a
    denoiser correction. It runs in :func:`jdiff.sample`'s loop, so the gradient
    strategies reach it."""

    eta: float = 0.85
    eta_b: float = 1.0

    who = "ddrm"
    default_nfe = 20
    needs_svd = True
    stochastic = True
    order = 1

    def __post_init__(self):
        object.__setattr__(self, "eta", _check_number("ddrm: eta", self.eta, lo=0, hi=1))
        object.__setattr__(self, "eta_b", _check_number("ddrm: eta_b", self.eta_b, lo=0, hi=1))

    @property
    def name(self):
        return settings_name("ddrm", eta=self.eta, eta_b=self.eta_b)

    def check_inputs(self, process, grid, x_T):
        g0 = concrete(grid)
        if g0 is not None and not np.isfinite(float(process.rho(jnp.asarray(g0[0])))):
            raise ValueError(f"ddrm: the grid starts at t = {float(g0[0])} where alpha = 0; start it below t_max")

    def start(self, m, grid, key, shape, dtype):
        """The paper's start: ``ybar + noise`` on the observed spectral coordinates."""
        return _start(m, grid, _batch_keys(key, shape[0]), shape, dtype)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        check_key(self, key)
        state = empty_state(x_T, grid, key=key, process=process)
        return state._replace(aux=_curves(process, state.grid, state.x.dtype))

    def step(self, denoiser, state, cond=None):
        m = measurement_of(denoiser)
        op, x, i, (a, rho) = m.operator, state.x, state.i, state.aux
        dt, eta, eta_b = x.dtype, self.eta, self.eta_b
        sv, obs, ybar, ny = _spectral(m, dt)
        t = state.grid[i]
        p = denoiser(x, t, cond)
        x0b, epsb = op.Vt(p.x0.astype(dt)), op.Vt(p.eps.astype(dt))
        rn = rho[i + 1]
        z = normal_per_sample(state.key, (x.shape[0], sv.shape[0]), dt, step=i)
        k = jnp.sqrt(1 - eta**2)
        free = x0b + k * rn * epsb + eta * rn * z
        noisy = x0b + k * rn * _safe_div(ybar - x0b, ny) + eta * rn * z
        clean = (1 - eta_b) * x0b + eta_b * ybar + jnp.sqrt(jnp.maximum(rn**2 - (eta_b * ny) ** 2, 0)) * z
        xb = jnp.where(~obs, free, jnp.where(rn < ny, noisy, clean))
        x_next = a[i + 1] * op.V(xb)
        # the last step returns x / alpha (the data scale)
        x_next = jnp.where(i + 1 == state.grid.shape[0] - 1, x_next / a[-1], x_next)
        pred = Prediction(p.x0.astype(dt), p.eps.astype(dt))
        return state._replace(x=x_next, i=i + 1, pred=pred, nfe=state.nfe + network_calls(denoiser, t))


def ddrm(denoiser, operator, y, sigma_y, key, *, eta: float = 0.85, eta_b: float = 1.0, **sampling):
    """Denoising diffusion restoration models (Kawar, Elad, Ermon & Song, "Denoising
    Diffusion Restoration Models", NeurIPS 2022, Eq. 7-8).

    In the spectral coordinates ``xbar = V^T x / alpha`` (noise level ``rho = sigma /
    alpha``) and ``ybar = U^T y / s`` (noise ``sigma_y / s_i``), each coordinate moves from
    the Tweedie estimate: unobserved ones (``s_i = 0``) by DDIM with ``eta``; observed ones
    whose measurement is noisier than the target level (``rho < sigma_y / s_i``) towards
    ``ybar`` with ``eta``; the others to ``(1 - eta_b) x0_hat + eta_b ybar`` plus fresh noise
    of variance ``rho^2 - eta_b^2 sigma_y^2 / s_i^2``. The start is the paper's
    ``ybar + noise`` on observed coordinates. With ``sigma_y = 0`` and ``eta_b = 1`` on a
    grid ending at the data, ``A x = y`` exactly (to rounding). The update is DDRM's own
    (see :class:`DDRM` for why no other solver's update can take its place).

    NFE: one denoiser call per step, **no gradients** (needs the SVD). Usual NFE: 20 (paper).

    Args:
      denoiser, operator, y, sigma_y, key: as in :func:`posterior_sample`.
      eta, eta_b: the paper's ``eta`` and ``eta_b`` in [0, 1].
      **sampling: the shared keywords of :class:`Sampling` (``nfe`` default 20).

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`, and a grid starting where ``alpha = 0`` (infinite
        ``rho``: start it below ``t_max``). TypeError: an operator without an SVD.
    """
    run = DDRM(eta, eta_b)
    return posterior_sample(run, denoiser, operator, y, sigma_y, key, sampling_settings("ddrm", sampling))
