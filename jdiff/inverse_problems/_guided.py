"""Posterior samplers that take another solver's update: DPS, PiGDM and DDS.

Each is a solver wrapper: its ``step`` calls the inner solver's ``step`` (DDIM with the
paper's ``eta`` by default; any solver of :mod:`jdiff.solvers`) with a corrected
denoiser (PiGDM's guided Tweedie estimate, DDS's conjugate-gradient refined ``x0``) or
corrects the state after it (DPS's gradient step). Their per-step tables ride in the
state beside the inner solver's (``aux = (inner_aux, tables)``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import Prediction
from jdiff.inverse_problems._engine import PosteriorSolver, measurement_of, posterior_sample, sampling_settings
from jdiff.inverse_problems._operators import _check_number, _flat, _per_sample_dot, _safe_div
from jdiff.solvers._base import Solver, network_calls, settings_name
from jdiff.solvers.ddim import ddim

__all__ = ["DPS", "PiGDM", "DDS", "dps", "pigdm", "dds"]


class _Wrapper(PosteriorSolver):
    """A posterior solver around ``self.inner``: the inner solver's init, NFE and step
    count; ``step`` runs :meth:`inner_step` on the inner solver's own state."""

    @property
    def stochastic(self):
        return self.inner.stochastic

    @property
    def order(self):
        return self.inner.order

    @property
    def min_steps(self):
        return self.inner.min_steps

    @property
    def name(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "inner"}
        return settings_name(f"{self.who}[{self.inner.name}]", **fields)

    def nfe(self, num_steps, to_data=False, from_noise=False):
        return self.inner.nfe(num_steps, to_data, from_noise)

    def num_steps(self, nfe, to_data=False, from_noise=False):
        return self.inner.num_steps(nfe, to_data, from_noise)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = self.inner.init(x_T, grid, process, key=key, nfe=nfe)
        return state._replace(aux=(state.aux, self.tables(process, state.grid, state.x.dtype)))

    def tables(self, process, grid, dtype):
        return None

    def step(self, denoiser, state, cond=None):
        inner_aux, tables = state.aux
        new = self.inner_step(denoiser, state._replace(aux=inner_aux), cond, tables)
        return new._replace(aux=state.aux)

    def inner_step(self, denoiser, state, cond, tables):
        raise NotImplementedError


def _inner(who, solver, eta, default_eta):
    """The inner solver: ``solver``, or DDIM with ``eta`` (default ``default_eta``)."""
    if solver is None:
        return ddim(_check_number(f"{who}: eta", default_eta if eta is None else eta, lo=0, hi=1))
    if eta is not None:
        raise ValueError(f"{who}: give eta (for the default DDIM steps) or a solver, not both")
    if not isinstance(solver, Solver):
        raise TypeError(f"{who}: solver must be a jdiff Solver, got {type(solver).__name__}")
    return solver


# ---------------------------------------------------------------------------- DPS
@dataclasses.dataclass(frozen=True)
class DPS(_Wrapper):
    """DPS as a solver wrapper (see :func:`dps`): the inner solver's step, then
    ``x <- x - scale * grad_{x_t} ||y - A(x0_hat(x_t))||`` through the step's first model call."""

    inner: Solver
    scale: float = 1.0

    who = "dps"
    default_nfe = 1000

    def __post_init__(self):
        object.__setattr__(self, "scale", _check_number("dps: scale", self.scale, lo=0))

    def inner_step(self, denoiser, state, cond, tables):
        m = measurement_of(denoiser)
        dt = state.x.dtype

        def norms(x):
            new = self.inner.step(denoiser, state._replace(x=x), cond)
            r = _flat(m.y - m.operator.A(new.pred.x0))
            # sqrt(sum r^2 + tiny): the gradient stays finite at an exact fit
            return jnp.sqrt(jnp.sum(r * r, axis=1) + jnp.finfo(dt).tiny), new

        nrm, vjp, new = jax.vjp(norms, state.x, has_aux=True)
        (g,) = vjp(jnp.ones_like(nrm))
        return new._replace(x=new.x - self.scale * g)


def dps(denoiser, operator, y, sigma_y, key, *, scale: float = 1.0, eta: float | None = None, solver=None, **sampling):
    """Diffusion posterior sampling (Chung, Kim, Mccann, Klasky & Ye, "Diffusion Posterior
    Sampling for General Noisy Inverse Problems", ICLR 2023, Algorithm 1).

    Each step takes the inner solver's step (DDIM with ``eta``, 1 = DDPM: the paper's
    ancestral step) from ``x_t`` and then ``x <- x - scale * grad_{x_t} ||y - A(x0_hat(x_t))||``,
    with ``x0_hat`` the step's first model call: the paper's step ``zeta_i = zeta' /
    ||y - A x0_hat||`` on the squared residual is this gradient of the norm. The norm is
    per sample (the reference code takes it over the whole batch, which couples the
    samples). Works for nonlinear ``A``. Any solver can take the steps (``solver=``, e.g.
    ``jdiff.solvers.dpm_solver_pp(2)``): the correction only needs its first model call.

    NFE: the inner solver's (DDIM: one denoiser call per step), **with a VJP** through the
    first call of each step (about 2-3 times a forward call). Usual NFE: 1000 (paper).

    Args:
      denoiser, operator, y, sigma_y, key: as in :func:`posterior_sample`.
      scale: the step ``zeta'`` (finite, >= 0).
      eta: DDIM noise in [0, 1] of the default steps (default 1).
      solver: another solver for the steps (then leave ``eta`` unset).
      **sampling: the shared keywords of :class:`Sampling` (``nfe`` (default 1000), ``grid``,
        ``grid_kind``, ``cond``, ``x_T``, ``return_info``, ``gradient``) or ``settings=``.

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`posterior_sample`, and ``scale``/``eta`` not finite or out of range.
    """
    run = DPS(_inner("dps", solver, eta, 1.0), scale)
    return posterior_sample(run, denoiser, operator, y, sigma_y, key, sampling_settings("dps", sampling))


class _Corrected:
    """A denoiser a step builds around the one it was given (``settings`` become
    attributes): the same process and network calls, a corrected prediction."""

    def __init__(self, denoiser, **settings):
        self.denoiser, self.process = denoiser, denoiser.process
        self.__dict__.update(settings)

    def calls(self, t):
        return network_calls(self.denoiser, t)


# ---------------------------------------------------------------------------- PiGDM
class _PiGDMGuided(_Corrected):
    """PiGDM's guided Tweedie estimate as a denoiser (built by :class:`PiGDM`'s step)."""

    def __call__(self, x, t, cond=None):
        m = measurement_of(self.denoiser)
        op, dt = m.operator, x.dtype
        x0, vjp, p = jax.vjp(lambda x: (lambda p: (p.x0.astype(dt), p))(self.denoiser(x, t, cond)), x, has_aux=True)
        sv = op.singular_values().astype(dt)
        sy2 = jnp.asarray(m.sigma_y, dt) ** 2
        a, s = self.a, self.s
        r2 = s**2 / (a**2 + s**2)
        resid = op.Ut(m.y - op.A(x0))
        h = op.V(_safe_div(sv * resid, r2 * sv * sv + sy2))  # A^T (r^2 A A^T + sy^2)^-1 (y - A x0)
        (g,) = vjp(h)
        return Prediction(x0 + self.scale * s**2 / a * g, p.eps.astype(dt) - self.scale * s * g)


@dataclasses.dataclass(frozen=True)
class PiGDM(_Wrapper):
    """PiGDM as a solver wrapper (see :func:`pigdm`): the inner solver's step on the
    guided Tweedie estimate."""

    inner: Solver
    scale: float = 1.0

    who = "pigdm"
    default_nfe = 100
    needs_svd = True

    def __post_init__(self):
        object.__setattr__(self, "scale", _check_number("pigdm: scale", self.scale, lo=0))

    def tables(self, process, grid, dtype):
        return process.alpha(grid).astype(dtype), process.sigma(grid).astype(dtype)

    def inner_step(self, denoiser, state, cond, tables):
        a, s = tables
        guided = _PiGDMGuided(denoiser, scale=self.scale, a=a[state.i], s=s[state.i])
        return self.inner.step(guided, state, cond)


def pigdm(
    denoiser, operator, y, sigma_y, key, *, scale: float = 1.0, eta: float | None = None, solver=None, **sampling
):
    """Pseudoinverse-guided diffusion (Song, Vahdat, Mardani & Kautz, "Pseudoinverse-Guided
    Diffusion Models for Inverse Problems", ICLR 2023, Eq. 7 and Algorithm 1).

    With ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)``, ``r_t^2 = sigma^2 / (alpha^2 + sigma^2)``,
    the likelihood score is ``g = (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1}
    (y - A x0_hat)`` (computed through the SVD, one VJP). The guided Tweedie estimate
    ``x0_hat + scale * sigma^2 / alpha * g`` (and its eps) is a denoiser, so any solver can
    take the steps (default DDIM with ``eta``, the paper's). With ``sigma_y = 0`` the
    inner inverse is ``A^+``, as in the paper's noiseless case.

    NFE: the inner solver's (DDIM: one denoiser call per step), each **with a VJP**.
    Usual NFE: 100 (paper).

    Args:
      denoiser, operator, y, sigma_y, key: as in :func:`posterior_sample`.
      scale: guidance weight (finite, >= 0); eta: DDIM noise in [0, 1] (default 1).
      solver: another solver for the steps (then leave ``eta`` unset).
      **sampling: the shared keywords of :class:`Sampling` (``nfe`` default 100).

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`. TypeError: an operator without an SVD.
    """
    run = PiGDM(_inner("pigdm", solver, eta, 1.0), scale)
    return posterior_sample(run, denoiser, operator, y, sigma_y, key, sampling_settings("pigdm", sampling))


# ---------------------------------------------------------------------------- DDS
def _cg(apply, b, x, steps):
    """``steps`` conjugate-gradient iterations on ``apply(x) = b`` (symmetric PSD), every
    inner product and step size per sample."""
    shp = (-1,) + (1,) * (x.ndim - 1)
    r = b - apply(x)
    p = r
    rs = _per_sample_dot(r, r)

    def it(_, carry):
        x, r, p, rs = carry
        Ap = apply(p)
        alpha = _safe_div(rs, _per_sample_dot(p, Ap)).reshape(shp)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _per_sample_dot(r, r)
        p = r + _safe_div(rs_new, rs).reshape(shp) * p
        return x, r, p, rs_new

    return jax.lax.fori_loop(0, steps, it, (x, r, p, rs))[0]


class _DDSRefined(_Corrected):
    """DDS's denoiser: the Tweedie ``x0`` refined by conjugate gradients, the network's eps."""

    def __call__(self, x, t, cond=None):
        m = measurement_of(self.denoiser)
        op, dt, gamma = m.operator, x.dtype, self.gamma
        p = self.denoiser(x, t, cond)
        x0 = p.x0.astype(dt)
        x0 = _cg(lambda v: op.AT(op.A(v)) + gamma * v, op.AT(m.y.astype(dt)) + gamma * x0, x0, self.cg_steps)
        return Prediction(x0, p.eps.astype(dt))


@dataclasses.dataclass(frozen=True)
class DDS(_Wrapper):
    """DDS as a solver wrapper (see :func:`dds`): the inner solver's step on the
    conjugate-gradient refined ``x0``."""

    inner: Solver
    cg_steps: int = 5
    gamma: float = 0.0

    who = "dds"
    default_nfe = 50
    needs_linear = True

    def __post_init__(self):
        c = self.cg_steps
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"dds: cg_steps must be an int >= 0, got {c!r}")
        object.__setattr__(self, "cg_steps", int(c))
        object.__setattr__(self, "gamma", _check_number("dds: gamma", self.gamma, lo=0))

    def inner_step(self, denoiser, state, cond, tables):
        return self.inner.step(_DDSRefined(denoiser, gamma=self.gamma, cg_steps=self.cg_steps), state, cond)


def dds(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    cg_steps: int = 5,
    gamma: float = 0.0,
    eta: float | None = None,
    solver=None,
    **sampling,
):
    """Decomposed diffusion sampler (Chung, Lee & Ye, "Decomposed Diffusion Sampler for
    Accelerating Large-Scale Inverse Problems", ICLR 2024, Algorithm 1).

    At each step the Tweedie estimate ``x0_hat`` is refined by ``cg_steps`` conjugate-gradient
    iterations on ``(A^T A + gamma I) x = A^T y + gamma x0_hat`` started at ``x0_hat`` (a
    Krylov step that stays on the data manifold's tangent; ``gamma > 0`` is the proximal
    variant for noisy data), and a DDIM step with ``eta`` renoises it with the network's eps
    (the refined ``x0`` with the network's eps is a denoiser, so another solver can take
    the step; a data-prediction solver then uses the refined ``x0`` alone). The CG inner
    products and step sizes are per sample.

    NFE: the inner solver's (DDIM: one denoiser call per step), **no gradients** (``A`` and
    ``A^T`` only). Usual NFE: 50 (paper: 50-100).

    Args:
      denoiser, operator, y, sigma_y, key: as in :func:`posterior_sample`.
      cg_steps: CG iterations per step (int >= 0); gamma: proximal weight (>= 0); eta: DDIM
        noise in [0, 1] (default 0.15).
      solver: another solver for the steps (then leave ``eta`` unset).
      **sampling: the shared keywords of :class:`Sampling` (``nfe`` default 50).

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`. TypeError: a nonlinear operator.
    """
    run = DDS(_inner("dds", solver, eta, 0.15), cg_steps, gamma)
    return posterior_sample(run, denoiser, operator, y, sigma_y, key, sampling_settings("dds", sampling))
