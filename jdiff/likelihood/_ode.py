"""Likelihoods of diffusion models: the probability-flow ODE log-likelihood (with bits
per dimension of quantized data) and the Ito density estimator along reverse-SDE
trajectories.

**Probability-flow ODE.** The marginals ``p_t`` of ``x_t = alpha x0 + sigma eps`` are
transported by the ODE ``dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat`` (Song
et al., "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR 2021, Eq. 13 written with the denoiser), so along a solution the instantaneous
change of variables (Chen et al., "Neural Ordinary Differential Equations", NeurIPS
2018; Grathwohl et al., "FFJORD", ICLR 2019) gives

    d log p_t(x_t) / dt = -div v(x_t, t),   log p_0(x_0) = log p_T(x_T) + Int_0^T div v dt.

:func:`log_likelihood` integrates the state and the divergence together from the data
time to ``t_max``. The divergence is exact (the trace of the Jacobian, one JVP per
dimension; for small dimensions) or Hutchinson's estimate ``v^T (dv/dx) v`` with probes
``v`` drawn once per sample and kept fixed along the path (FFJORD), Rademacher or
Gaussian; every probe is integrated as its own unbiased estimate. The ODE is solved by
diffrax with adaptive steps (Tsit5, Dopri5 or Dopri8 with a PID controller) or on a
fixed jdiff time grid (Euler, Heun or classic RK4, or any deterministic jdiff solver run
from data to noise as in :func:`jdiff.inversion.invert`, with the divergence integrated
over the grid's nodes in log-SNR). ``time="rho"`` integrates the EDM
form ``y = x / alpha`` against ``rho = sigma / alpha`` (``dy/drho = eps_hat``), which
stays smooth at the data, so the integral may start exactly at ``t_data``.

**Bits per dimension.** :func:`bits_per_dim` adds uniform dequantization
(:class:`Dequantization`) and reports ``-(log p(y) + D log Delta) / (D ln 2)``, with
``Delta`` the width of one quantization bin (derivation in :class:`Dequantization`).

**Ito density.** Along any trajectory of the reverse-time SDE, ``log p_t(x_t)`` evolves
by Ito's lemma with increments only, no divergence (Skreta et al., "The Superposition
of Diffusion Models Using the Ito Density Estimator", ICLR 2025):
:func:`ito_log_density` (derivation in its docstring). :func:`jdiff.superdiff.sample_superdiff`
builds on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._param import check_cond_batch
from jdiff.solvers._base import Solver

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "LikelihoodResult",
    "BitsResult",
    "Dequantization",
    "log_likelihood",
    "bits_per_dim",
    "gaussian_prior_log_prob",
    "ito_log_density",
    "ito_increment",
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE_METHODS = ("tsit5", "dopri5", "dopri8")
FIXED_METHODS = ("euler", "heun", "rk4")
TIMES = ("t", "rho")


class LikelihoodResult(NamedTuple):
    """What :func:`log_likelihood` returns.

    Attributes:
      log_prob: ``(B,)`` the estimate of ``log p(x)`` in nats (the mean over probes).
      prior_log_prob: ``(B,)`` ``log p_T(x_T)`` of the prior at the end of the path.
      delta: ``(B,)`` the change of ``log p`` along the path (``log_prob - prior_log_prob``;
        the divergence integral plus, for ``time="rho"`` or a jdiff solver, the
        ``D log alpha`` terms).
      per_probe: ``(B, K)`` one ``log p(x)`` estimate per Hutchinson probe (``K = 1``
        for the exact divergence); independent given ``x``, so their spread gives the
        probe part of the error.
      x_T: the end of the path, ``x``'s shape.
      steps: the number of solver steps taken (diffrax's accepted plus rejected steps
        for adaptive methods, the grid's steps otherwise).
    """

    log_prob: jax.Array
    prior_log_prob: jax.Array
    delta: jax.Array
    per_probe: jax.Array
    x_T: jax.Array
    steps: jax.Array


class BitsResult(NamedTuple):
    """What :func:`bits_per_dim` returns.

    Attributes:
      bpd: ``(B,)`` bits per dimension of each sample.
      log_prob: ``(B,)`` the model's ``log p(y)`` of the (dequantized) data in nats.
      y: the dequantized data the likelihood was computed at.
      likelihood: the full :class:`LikelihoodResult`.
    """

    bpd: jax.Array
    log_prob: jax.Array
    y: jax.Array
    likelihood: LikelihoodResult


# ------------------------------------------------------------------- dequantization
@dataclasses.dataclass(frozen=True)
class Dequantization:
    """Uniform dequantization of data quantized to ``levels`` equally spaced values.

    The data takes the values ``v_k = low + k * Delta``, ``k = 0 .. levels - 1``,
    ``Delta = (high - low) / (levels - 1)``: both ends are attained, as in
    :mod:`jdiff.data` (8-bit images ``u / 127.5 - 1``: ``levels=256, low=-1, high=1``,
    ``Delta = 2/255``; scikit-learn's digits ``v / 8 - 1`` with pixel counts ``0..16``:
    ``levels=17``, ``Delta = 1/8``). Dequantized data is ``y = v_k + (u - 1/2) Delta``
    with ``u ~ U[0, 1)^D``, so value ``v_k`` owns the bin ``[v_k - Delta/2, v_k + Delta/2)``.

    Why the offset (Theis et al., "A note on the evaluation of generative models",
    ICLR 2016; Ho et al. 2020): the discrete model ``P(k) = Int_bin p(y) dy =
    Delta^D E_u[p(y)] >= Delta^D exp(E_u[log p(y)])`` (Jensen), so

        -log2 P(k) / D <= -log p(y) / (D ln 2) - log2(Delta)     (in expectation over u),

    the number :func:`bits_per_dim` reports: an upper bound on the discrete model's
    bits per dimension. ``-log2(Delta)`` is ``log2(127.5) = 6.994`` for jdiff's 8-bit
    scaling and ``3`` for the digits. (Song et al. 2021 dequantize ``y = (k + u) / 256``
    in ``[0, 1)`` then map to ``[-1, 1)``: bins of width ``2/256`` and offset exactly 7,
    which is ``levels=256, low=-1 + 1/256, high=1 - 1/256`` here.)

    Attributes:
      levels: number of quantization levels (>= 2).
      low, high: the smallest and largest data values (``low < high``).
    """

    levels: int
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer)) or self.levels < 2:
            raise ValueError(f"Dequantization: levels must be an integer >= 2, got {self.levels!r}")
        for name in ("low", "high"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise ValueError(f"Dequantization: {name} must be a finite number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"Dequantization: needs low < high, got low={self.low}, high={self.high}")
        object.__setattr__(self, "levels", int(self.levels))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    @property
    def delta(self) -> float:
        """The bin width ``(high - low) / (levels - 1)``."""
        return (self.high - self.low) / (self.levels - 1)

    @property
    def bits_offset(self) -> float:
        """``-log2(Delta)``: the bits per dimension added to ``-log p(y) / (D ln 2)``."""
        return -math.log2(self.delta)

    def check(self, x):
        """Return ``x`` after checking that every value is one of the ``levels`` values
        (within ``1e-3 Delta``); ``ValueError`` now when ``x`` is concrete, at run time
        under ``jit``."""
        xf = jnp.asarray(x)
        tol = 1e-3 * self.delta
        k = (xf - self.low) / self.delta
        arr = concrete(xf)
        if arr is not None:
            a = np.asarray(arr, np.float64)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"data has {int((~np.isfinite(a)).sum())} non-finite values")
            lo, hi = float(a.min()), float(a.max())
            if lo < self.low - tol or hi > self.high + tol:
                raise ValueError(
                    f"data range [{lo:.6g}, {hi:.6g}] is outside the dequantization range [{self.low}, {self.high}] "
                    f"({self.levels} levels): rescale the data or declare its range"
                )
            kk = (a - self.low) / self.delta
            off = np.abs(kk - np.rint(kk)) * self.delta
            if np.any(off > tol):
                raise ValueError(
                    f"data is not quantized to the declared {self.levels} levels in [{self.low}, {self.high}] "
                    f"(step {self.delta:.6g}): a value is {float(off.max()):.3g} away from the nearest level"
                )
            return x
        bad_range = (xf < self.low - tol) | (xf > self.high + tol) | ~jnp.isfinite(xf)
        xf = error_if(
            xf,
            jnp.any(bad_range),
            f"data outside the dequantization range [{self.low}, {self.high}] ({self.levels} levels)",
        )
        off = jnp.abs(k - jnp.round(k)) * self.delta
        return error_if(xf, jnp.any(off > tol), f"data is not quantized to the declared {self.levels} levels")

    def __call__(self, key, x):
        """Dequantize ``x`` (checked by :meth:`check`): ``x + (u - 1/2) Delta``, the
        uniform noise of sample ``i`` drawn from ``fold_in(key, i)`` (or ``key[i]``)."""
        from jdiff._random import _batch_keys

        x = self.check(x)
        x = jnp.asarray(x)
        dt = jnp.result_type(x.dtype, jnp.float32)
        keys = _batch_keys(key, x.shape[0])
        u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], dt))(keys)
        return x.astype(dt) + (u - 0.5) * jnp.asarray(self.delta, dt)


# ------------------------------------------------------------------------- prior
def gaussian_prior_log_prob(process, x_T):
    """``log N(x_T; 0, (alpha_T^2 + sigma_T^2) I)`` summed per sample: the prior that
    :func:`jdiff.prior_sample` draws from (unit-variance data), at ``t_max``."""
    x = jnp.asarray(x_T)
    dt = jnp.result_type(x.dtype, jnp.float32)
    t = jnp.asarray(process.t_max, dt)
    var = process.alpha(t) ** 2 + process.sigma(t) ** 2
    xf = x.reshape(x.shape[0], -1).astype(dt)
    D = xf.shape[1]
    return -0.5 * jnp.sum(xf * xf, axis=1) / var - 0.5 * D * jnp.log(2.0 * jnp.pi * var)


# --------------------------------------------------------------------- the ODE
def _feature_sum(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def _field(denoiser, cond, time):
    """``F(s, z) -> dz/ds`` in the integration variable: ``s = t`` with ``z = x``, or
    ``s = rho`` with ``z = x / alpha``."""
    process = denoiser.process

    def f_t(t, x):
        p = denoiser(x, t, cond)
        return (process.d_alpha(t) * p.x0 + process.d_sigma(t) * p.eps).astype(x.dtype)

    def f_rho(rho, y):
        t = process.t_of_rho(rho)
        a = process.alpha(t)
        return denoiser(a * y, t, cond).eps.astype(y.dtype)

    def f_lam(t, x):
        # sigma * eps_hat: dx/dlambda = (dlog alpha/dlambda) x - sigma eps_hat, whose
        # linear part has the constant divergence D dlog alpha/dlambda (integrated exactly)
        return (process.sigma(t) * denoiser(x, t, cond).eps).astype(x.dtype)

    return {"t": f_t, "rho": f_rho, "lambda": f_lam}[time]


def _augmented(field, probes, exact):
    """The vector field of ``(z, acc)``: ``acc`` (``(K, B)``) integrates the divergence
    (exact, ``K = 1``) or each probe's ``v^T J v``."""

    def rhs(s, state):
        z, _ = state
        f = lambda zz: field(s, zz)
        if exact:
            n = int(np.prod(z.shape[1:]))
            eye = jnp.eye(n, dtype=z.dtype).reshape((n, 1) + z.shape[1:])
            basis = jnp.broadcast_to(eye, (n,) + z.shape)  # e_i for every sample at once

            out, jcols = jax.vmap(lambda e: jax.jvp(f, (z,), (e,)), out_axes=(None, 0))(basis)
            # trace: the i-th component of J e_i, per sample
            diag = jnp.diagonal(jcols.reshape(n, z.shape[0], n), axis1=0, axis2=2)
            div = jnp.sum(diag, axis=1)[None]
        else:
            out, jv = jax.vmap(lambda v: jax.jvp(f, (z,), (v,)), out_axes=(None, 0))(probes)
            div = jax.vmap(lambda v, w: _feature_sum(v * w))(probes, jv)
        return out, div.astype(z.dtype)

    return rhs


def _solve_adaptive(rhs, state, s0, s1, method, rtol, atol, max_steps):
    import diffrax

    solver = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}[method]()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda s, y, args: rhs(s, y)),
        solver,
        s0,
        s1,
        None,
        state,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    y = jax.tree.map(lambda a: a[0], sol.ys)
    return y, sol.stats["num_steps"]


def _solve_fixed(rhs, state, ss, method):
    """Integrate over the increasing points ``ss`` (``(N + 1,)``) with a fixed-step
    Runge-Kutta method."""

    def add(y, k, h):
        return jax.tree.map(lambda a, b: a + h * b, y, k)

    def step(y, pair):
        s, s_next = pair
        h = s_next - s
        k1 = rhs(s, y)
        if method == "euler":
            return add(y, k1, h), None
        if method == "heun":
            k2 = rhs(s_next, add(y, k1, h))
            return jax.tree.map(lambda a, b, c: a + 0.5 * h * (b + c), y, k1, k2), None
        m = s + 0.5 * h
        k2 = rhs(m, add(y, k1, 0.5 * h))
        k3 = rhs(m, add(y, k2, 0.5 * h))
        k4 = rhs(s_next, add(y, k3, h))
        return jax.tree.map(lambda a, b, c, d, e: a + h / 6.0 * (b + 2.0 * c + 2.0 * d + e), y, k1, k2, k3, k4), None

    y, _ = jax.lax.scan(step, state, (ss[:-1], ss[1:]))
    return y, jnp.asarray(ss.shape[0] - 1, jnp.int32)


def _node_weights(s):
    """Quadrature weights ``w`` (``(N + 1,)``) with ``sum_n w_n h(s_n) ~ Int_{s_0}^{s_N} h ds``
    on monotone nodes ``s`` (either direction, any spacing).

    Each interval ``[s_n, s_{n+1}]`` integrates the cubic through the four nodes
    ``n - 1 .. n + 2`` (the stencil shifted inward at the ends; fewer nodes when the grid
    has fewer than 3 intervals), exactly by 2-point Gauss-Legendre. Composite error
    ``O(h^4)`` for a smooth integrand (``O(h^2)`` / ``O(h^3)`` on grids of 1 / 2 intervals).
    """
    N = s.shape[0] - 1
    p = min(4, N + 1)
    n = jnp.arange(N)
    j0 = jnp.clip(n - (p // 2 - 1), 0, N + 1 - p)
    idx = j0[:, None] + jnp.arange(p)  # (N, p) stencil of each interval
    h = s[1:] - s[:-1]
    v = (s[idx] - s[:-1, None]) / h[:, None]  # stencil in units of the interval: 0 and 1 are its ends
    g = jnp.asarray([0.5 - 0.5 / math.sqrt(3.0), 0.5 + 0.5 / math.sqrt(3.0)], s.dtype)
    w = jnp.zeros((N, p), s.dtype)
    for k in range(p):
        basis = jnp.ones((N, 2), s.dtype)
        for m in range(p):
            if m != k:
                basis = basis * (g[None] - v[:, m, None]) / (v[:, k, None] - v[:, m, None])
        w = w.at[:, k].set(0.5 * jnp.sum(basis, axis=1))
    return jnp.zeros(N + 1, s.dtype).at[idx].add(w * h[:, None])


def _solve_solver(solver, denoiser, cond, rhs, x, ts, process):
    """Run ``solver`` on the increasing times ``ts`` (data to noise, as
    :func:`jdiff.inversion.invert`), evaluating ``rhs``'s divergence at every node state.
    Returns ``(x_T, divs)`` with ``divs`` of shape ``(N + 1, K, B)``."""
    state = solver.init(x, ts, process)
    aux = jnp.zeros((1,) + x.shape[:1], x.dtype)

    def body(st, _):
        _, div = rhs(st.grid[st.i], (st.x, aux))
        return solver.step(denoiser, st, cond), div

    state, divs = jax.lax.scan(body, state, None, length=ts.shape[0] - 1)
    _, div_T = rhs(state.grid[-1], (state.x, aux))
    return state.x, jnp.concatenate([divs, div_T[None]], axis=0)


def _draw_probes(key, shape, num_probes, probe, dtype):
    """``(K, B, ...)`` probes; sample ``i``'s come from ``fold_in(key, i)`` (or ``key[i]``)."""
    from jdiff._random import _batch_keys

    keys = _batch_keys(key, shape[0])

    def one(k):
        if probe == "gaussian":
            return jax.random.normal(k, (num_probes,) + tuple(shape[1:]), dtype)
        return jax.random.rademacher(k, (num_probes,) + tuple(shape[1:]), dtype)

    return jnp.swapaxes(jax.vmap(one)(keys), 0, 1)


def _likelihood_impl(
    denoiser,
    x,
    cond,
    key,
    grid,
    *,
    divergence,
    probe,
    num_probes,
    method,
    time,
    t_start,
    t_end,
    rtol,
    atol,
    max_steps,
    prior_log_prob,
):
    process = denoiser.process
    dt = jnp.result_type(x.dtype, jnp.float32)
    x = x.astype(dt)
    B = x.shape[0]
    D = int(np.prod(x.shape[1:]))
    exact = divergence == "exact"
    probes = None if exact else _draw_probes(key, x.shape, num_probes, probe, dt)
    K = 1 if exact else num_probes
    if isinstance(method, Solver):
        # the path by the solver (its states at the grid nodes), d log p/dlambda at the nodes
        ts = grid.astype(dt)[::-1]  # increasing: data to noise
        rhs = _augmented(_field(denoiser, cond, "lambda"), probes, exact)
        zT, divs = _solve_solver(method, denoiser, cond, rhs, x, ts, process)
        # log p_0(x_0) - log p_T(x_T) = Int_{lam_0}^{lam_T} div(dx/dlam) dlam
        #   = D (log alpha_T - log alpha_0) - Int_{lam_0}^{lam_T} sigma div(eps_hat) dlam
        acc = -jnp.einsum("n,nkb->kb", _node_weights(process.lambda_(ts)), divs)
        acc = acc + D * (process.log_alpha(ts[-1]) - process.log_alpha(ts[0]))
        steps = jnp.asarray(ts.shape[0] - 1, jnp.int32)
    else:
        field = _field(denoiser, cond, time)
        rhs = _augmented(field, probes, exact)
        if grid is None:
            ts = jnp.asarray([t_start, t_end], dt)
        else:
            ts = grid.astype(dt)[::-1]  # increasing: data to noise
        if time == "rho":
            ss = process.rho(ts)
            ss = jnp.where(ts == (process.t_data if process.t_data is not None else -1.0), 0.0, ss)
            z0 = x / process.alpha(ts[0])
        else:
            ss = ts
            z0 = x
        state = (z0, jnp.zeros((K, B), dt))
        if grid is None:
            (zT, acc), steps = _solve_adaptive(rhs, state, ss[0], ss[-1], method, rtol, atol, max_steps)
        else:
            (zT, acc), steps = _solve_fixed(rhs, state, ss, method)
    if time == "rho":
        # x = alpha y: log p_x(x) = log p_y(y) - D log alpha at both ends
        a0, aT = process.alpha(ts[0]), process.alpha(ts[-1])
        x_T = zT * aT
        jac = D * (jnp.log(aT) - jnp.log(a0))
    else:
        x_T = zT
        jac = jnp.zeros((), dt)
    prior = prior_log_prob(x_T) if prior_log_prob is not None else gaussian_prior_log_prob(process, x_T)
    prior = jnp.asarray(prior, dt).reshape(B)
    per_probe = (prior[:, None] + acc.T + jac).astype(dt)
    logp = jnp.mean(per_probe, axis=1)
    return LikelihoodResult(logp, prior, logp - prior, per_probe, x_T, steps)


_likelihood_jit = jax.jit(
    _likelihood_impl,
    static_argnames=(
        "divergence",
        "probe",
        "num_probes",
        "method",
        "time",
        "t_start",
        "t_end",
        "rtol",
        "atol",
        "max_steps",
        "prior_log_prob",
    ),
)


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not (v > 0) or v == math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_solver_grid(solver, process, grid, x):
    """The grid of a jdiff solver: enough steps and finite log-SNR at both ends (a
    ``ValueError`` now for a concrete grid, at run time under ``jit``)."""
    N = grid.shape[0] - 1
    if N < max(1, solver.min_steps):
        raise ValueError(f"method={solver.name} needs at least {solver.min_steps} grid steps, the grid has {N}")
    msg = (
        f"method={solver.name} needs finite log-SNR at both grid ends (end the grid at t_min, not at t_data "
        "where sigma = 0, and start where alpha > 0): use jdiff.time_grid(..., final='t_min')"
    )
    ends = jnp.stack([grid[0], grid[-1]]).astype(jnp.result_type(x.dtype, jnp.float32))
    g = concrete(ends)
    if g is not None:
        if not np.all(np.isfinite(np.asarray(process.lambda_(jnp.asarray(g))))):
            raise ValueError(msg)
        return grid
    return error_if(grid, ~jnp.all(jnp.isfinite(process.lambda_(ends))), msg)


def _check_common(denoiser, x, cond):
    process = getattr(denoiser, "process", None)
    from jdiff._process import Process

    if not isinstance(process, Process) or not callable(denoiser):
        raise TypeError("denoiser must be a jdiff Denoiser (see jdiff.denoiser), with a .process")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have a leading batch axis and at least one feature axis, e.g. (B, d); got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    x = error_if(x, ~jnp.all(jnp.isfinite(x)), f"x of shape {x.shape} has non-finite values (NaN or inf)")
    check_cond_batch(cond, x.shape[0], "x", x.shape)
    return process, x


def log_likelihood(
    denoiser,
    x,
    *,
    cond=None,
    key=None,
    divergence: str = "exact",
    probe: str = "rademacher",
    num_probes: int = 1,
    method: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    grid=None,
    num_steps: int | None = None,
    grid_kind: str = "default",
    time: str = "t",
    t_start: float | None = None,
    t_end: float | None = None,
    prior_log_prob=None,
) -> LikelihoodResult:
    """The log-likelihood ``log p(x)`` of a diffusion model by its probability-flow ODE.

    Integrates ``(x_t, Int div v dt)`` from ``t_start`` (the data end) to ``t_end``
    (the prior) and returns ``log p_T(x_T) + Int div v dt`` (Song et al., ICLR 2021,
    Sec. 4.3 and App. D.2; Grathwohl et al., FFJORD, ICLR 2019). Batched (one ODE for
    the whole batch, so an adaptive step size is shared by the batch) and compiled once
    per shape and setting.

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (or anything with ``.process`` and
        ``__call__(x, t, cond) -> Prediction``).
      x: ``(B, ...)`` data, floating point (float64 under ``jax.enable_x64`` for a
        precise answer).
      cond: conditioning pytree passed to the denoiser (per-sample leaves lead with B).
      key: PRNG key of the Hutchinson probes (required for ``"hutchinson"``); sample
        ``i``'s probes come from ``fold_in(key, i)``, independent of the batch.
      divergence: ``"exact"`` (the trace of the Jacobian through one JVP per dimension:
        cost ``D`` JVPs per evaluation, for small ``D``) or ``"hutchinson"``
        (Hutchinson's estimator ``E[v^T J v] = tr J``; ``num_probes`` JVPs per
        evaluation).
      probe: ``"rademacher"`` (entries +-1, the lower-variance choice) or ``"gaussian"``.
      num_probes: Hutchinson probes per sample (>= 1), each fixed along the path and
        integrated separately (``per_probe``); ``log_prob`` is their mean.
      method: ``"tsit5"``, ``"dopri5"``, ``"dopri8"`` (diffrax, adaptive steps with
        ``rtol``/``atol``; ignored with a grid) or, with ``grid``/``num_steps``, a fixed
        grid method ``"euler"``, ``"heun"`` or ``"rk4"``, or a jdiff solver value for
        which :func:`jdiff.inversion.invertible` holds (``jdiff.solvers.ddim()``,
        ``dpm_solver_pp(2)``, ``unipc(3)``, ``deis(...)``, ``ipndm(...)``).

        With a jdiff solver, the state runs from data to noise on the reversed grid with
        the solver's own steps (exponential integrators in log-SNR ``lambda``, as
        :func:`jdiff.inversion.invert`; Lu et al., "DPM-Solver++", 2022; Zhao et al.,
        "UniPC", NeurIPS 2023), and the log-density along that path follows from
        ``dx/dlambda = (dlog alpha/dlambda) x - sigma eps_hat``:

            log p(x_0) = log p_T(x_T) + D (log alpha_T - log alpha_0)
                         + Int_{lambda_T}^{lambda_0} sigma div(eps_hat)(x_lambda) dlambda,

        the ``alpha`` term exact, the integral by a composite 4-point rule over the
        grid's nodes in ``lambda`` (each interval integrates the cubic through its four
        nearest nodes: error ``O(h^4)``), with ``sigma div(eps_hat)`` evaluated at the
        solver's node states by the ``divergence`` chosen here. The total error is
        therefore the solver's, ``O(h^p)`` for an order-``p`` solver. ``time`` must be
        ``"t"`` and both grid ends need finite log-SNR (start at ``t_min``, not
        ``t_data``). Cost over ``N`` grid steps: ``solver.nfe(N)`` model calls (``N``
        for these solvers) for the path plus ``N + 1`` divergence evaluations, each
        ``D`` JVPs (exact) or ``num_probes`` JVPs (Hutchinson); a fixed Runge-Kutta
        method spends ``N``/``2N``/``4N`` (Euler/Heun/RK4) such evaluations, so for a
        given ``N`` the solver is about as costly as Euler and has its own order.
      rtol, atol: tolerances of the adaptive step-size controller (PID).
      max_steps: the adaptive solver's step budget.
      grid: a decreasing jdiff time grid (``jdiff.time_grid``), traversed from its end
        (data) to its start (prior); or ``num_steps`` to build one of ``grid_kind``
        from ``t_end`` to ``t_start``.
      time: ``"t"`` integrates ``x`` in the process time; ``"rho"`` integrates
        ``y = x / alpha`` against ``rho = sigma / alpha`` (``dy/drho = eps_hat``; the
        ``D log alpha`` Jacobian is added at both ends), smooth down to ``t_data``.
        ``"rho"`` needs ``alpha > 0`` at ``t_end`` (not zero terminal SNR).
      t_start: the data end (default ``t_min``; with ``time="rho"`` it may be
        ``t_data``, the exact data distribution).
      t_end: the prior end (default ``t_max``).
      prior_log_prob: ``x_T -> (B,)`` log-density of the prior at ``t_end``; default
        :func:`gaussian_prior_log_prob` (``N(0, alpha_T^2 + sigma_T^2)``, the prior of
        unit-variance data). Pass the exact marginal when it is known (a testbed).

    Returns:
      A :class:`LikelihoodResult` (``log_prob`` in nats per sample).

    Raises:
      TypeError: a denoiser without a process, non-float ``x``.
      ValueError: an unknown ``divergence``/``probe``/``method``/``time``; a jdiff
        solver that is stochastic or cannot run backward, without a grid, with
        ``time="rho"``, from ``t_data`` or on a grid with an end at infinite log-SNR;
        ``num_probes`` < 1; Hutchinson without a key; bad tolerances; times outside the
        process's range or not ``t_start < t_end``; ``time="t"`` from ``t_data``;
        ``time="rho"`` to ``alpha = 0``; a grid that is not a valid decreasing grid;
        non-finite ``x``; a ``cond`` batch that is not ``x``'s.
    """
    process, x = _check_common(denoiser, x, cond)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; expected one of {PROBES}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    num_probes = int(num_probes)
    if divergence == "hutchinson" and key is None:
        raise ValueError("divergence='hutchinson' draws random probes: pass key=jax.random.key(seed)")
    if divergence == "exact":
        key, num_probes = None, 1
    if time not in TIMES:
        raise ValueError(f"unknown time {time!r}; expected one of {TIMES}")
    fixed = grid is not None or num_steps is not None
    solver = method if isinstance(method, Solver) else None
    if solver is not None:
        from jdiff.inversion import invertible

        if not invertible(solver):
            raise ValueError(
                f"method={solver.name} cannot integrate the PF-ODE from data to noise: a jdiff solver here "
                "must be deterministic and run backward (jdiff.inversion.invertible): ddim() (eta=0), "
                "dpm_solver_pp(2), unipc(3), deis, ipndm, ..."
            )
        if not fixed:
            raise ValueError(f"method={solver.name} (a jdiff solver) runs on a grid: pass grid= or num_steps=")
        if time != "t":
            raise ValueError(
                f"time={time!r} applies to {FIXED_METHODS + ADAPTIVE_METHODS}; method={solver.name} steps in "
                "log-SNR by itself: leave time='t'"
            )
    elif fixed and method not in FIXED_METHODS:
        if callable(method) and not isinstance(method, str):
            raise ValueError(f"method={method!r} is not a jdiff solver value: call it, e.g. dpm_solver_pp(2)")
        raise ValueError(
            f"with a grid the method must be one of {FIXED_METHODS} (fixed steps) or a deterministic jdiff "
            f"solver (e.g. jdiff.solvers.dpm_solver_pp(2)), got {method!r}"
        )
    if not fixed and solver is None and method not in ADAPTIVE_METHODS:
        raise ValueError(
            f"unknown adaptive method {method!r}; expected one of {ADAPTIVE_METHODS}, "
            f"or pass grid= or num_steps= for {FIXED_METHODS}"
        )
    rtol, atol = _positive("rtol", rtol), _positive("atol", atol)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")

    t_start = float(process.t_min if t_start is None else t_start)
    t_end = float(process.t_max if t_end is None else t_end)
    at_data = process.t_data is not None and t_start == process.t_data
    if not at_data:
        process.check_times(np.asarray([t_start]), allow_data=False, what="t_start")
    process.check_times(np.asarray([t_end]), allow_data=False, what="t_end")
    if not t_start < t_end:
        raise ValueError(f"need t_start < t_end (data to prior), got t_start={t_start}, t_end={t_end}")
    if solver is not None and at_data:
        raise ValueError(
            f"method={solver.name} needs finite log-SNR at both ends: it cannot start at t_data={t_start} "
            "(sigma = 0); start at t_min, or use time='rho' with a Runge-Kutta method"
        )
    if time == "t" and at_data:
        raise ValueError(
            f"time='t' cannot start at t_data={t_start}: sigma'(t) may be infinite there; "
            "use time='rho' (smooth at the data) or start at t_min"
        )
    if time == "rho" and not float(process.alpha(np.float64(t_end))) > 0.0:
        raise ValueError(f"time='rho' needs alpha > 0 at t_end={t_end} (rho is infinite at alpha = 0); use time='t'")

    if fixed:
        if grid is None:
            from jdiff._grid import time_grid

            if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
                raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
            grid = time_grid(
                process,
                int(num_steps),
                kind=grid_kind,
                t_start=t_end,
                t_end=t_start if not at_data else process.t_min,
                final="data" if at_data else "t_min",
                dtype=jnp.result_type(x.dtype, jnp.float32),
            )
        else:
            from jdiff._sample import validate_grid

            grid = validate_grid(process, grid)
            g = concrete(grid)
            if (
                g is not None
                and solver is None
                and time == "t"
                and process.t_data is not None
                and float(g[-1]) == process.t_data
            ):
                raise ValueError("time='t' cannot integrate from t_data (sigma' may be infinite): use time='rho'")
        if solver is not None:
            grid = _check_solver_grid(solver, process, grid, x)
        t_start = t_end = None  # the grid says

    from jdiff._sample import _jittable

    run = _likelihood_jit if _jittable((denoiser, cond, key)) else _likelihood_impl
    return run(
        denoiser,
        x,
        cond,
        key,
        grid,
        divergence=divergence,
        probe=probe,
        num_probes=num_probes,
        method=method,
        time=time,
        t_start=t_start,
        t_end=t_end,
        rtol=rtol,
        atol=atol,
        max_steps=int(max_steps),
        prior_log_prob=prior_log_prob,
    )


def bits_per_dim(
    denoiser,
    x,
    key=None,
    *,
    dequantization: Dequantization | None = None,
    **kwargs,
) -> BitsResult:
    """Bits per dimension of data ``x`` under a diffusion model (by :func:`log_likelihood`).

    With ``dequantization``, ``x`` must hold quantized values (checked) and is
    dequantized with uniform noise first; the result is
    ``-log p(y) / (D ln 2) - log2(Delta)``, an upper bound (in expectation) on the
    bits per dimension of the discrete data (see :class:`Dequantization`). Without it,
    ``x`` is continuous data and the result is ``-log p(x) / (D ln 2)``.

    Args:
      denoiser, x: as :func:`log_likelihood`.
      key: PRNG key for the dequantization noise and the Hutchinson probes (split in
        two; one key, or one key per sample); required for either.
      dequantization: a :class:`Dequantization` or None.
      **kwargs: passed to :func:`log_likelihood` (``divergence``, ``num_probes``, ...).

    Returns:
      A :class:`BitsResult`.

    Raises:
      ValueError: data outside the declared range or off its levels, a missing key,
        and everything :func:`log_likelihood` raises.
    """
    if dequantization is not None and not isinstance(dequantization, Dequantization):
        raise TypeError(
            f"dequantization must be a jdiff.likelihood.Dequantization, got {type(dequantization).__name__}"
        )
    needs_key = dequantization is not None or kwargs.get("divergence", "exact") == "hutchinson"
    if needs_key and key is None:
        raise ValueError("bits_per_dim needs key= for the dequantization noise or the Hutchinson probes")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    k_deq = k_probe = None
    if key is not None:
        from jdiff._random import is_key_batch

        if is_key_batch(key):  # one key per sample: split each
            pair = jax.vmap(jax.random.split)(key)
            k_deq, k_probe = pair[:, 0], pair[:, 1]
        else:
            k_deq, k_probe = jax.random.split(key)
    if dequantization is not None:
        y = dequantization(k_deq, x)
        offset = dequantization.bits_offset
    else:
        y, offset = x, 0.0
    res = log_likelihood(denoiser, y, key=k_probe, **kwargs)
    D = int(np.prod(y.shape[1:]))
    bpd = -res.log_prob / (D * math.log(2.0)) + offset
    return BitsResult(bpd, res.log_prob, y, res)


# ------------------------------------------------------------------ Ito density
def ito_increment(process, x, x_next, eps, t, t_next):
    """One step of the Ito density estimator: ``log p_{t_next}(x_next) - log p_t(x)``
    (``(B,)``) from the increment ``x_next - x`` of a reverse-SDE step ``t -> t_next < t``
    and the model's ``eps`` prediction at ``(x, t)``. See :func:`ito_log_density`."""
    dt = jnp.result_type(x.dtype, jnp.float32)
    t = jnp.asarray(t, dt)
    t_next = jnp.asarray(t_next, dt)
    la, la_n = process.log_alpha(t), process.log_alpha(t_next)
    lam, lam_n = process.lambda_(t), process.lambda_(t_next)
    sig = process.sigma(t)
    D = int(np.prod(x.shape[1:]))
    dla = la_n - la  # = -Int f dtau over the step
    h = lam_n - lam  # = Int g^2 / (2 sigma^2) dtau
    eps = eps.astype(dt)
    x = x.astype(dt)
    dx = x_next.astype(dt) - x
    return -D * dla + dla * _feature_sum(x * eps) / sig - h * _feature_sum(eps * eps) - _feature_sum(eps * dx) / sig


def ito_log_density(process, xs, epss, grid, *, log_prob_T=None):
    """The Ito density estimator: ``log p_t(x_t)`` of the model's marginals at every
    point of a reverse-time SDE trajectory, from its increments and the model's
    predictions alone (Skreta et al., "The Superposition of Diffusion Models Using the
    Ito Density Estimator", ICLR 2025, Thm. 1).

    Derivation. With the forward SDE ``dx = f x dt + g dW`` (``f = d log alpha/dt``,
    ``g^2 = -2 sigma^2 d lambda/dt``), Fokker-Planck gives ``d/dt log p = -f D -
    f x.s + g^2/2 (Lap log p + |s|^2)`` with ``s = grad log p = -eps/sigma``. In reverse
    time ``tau`` a trajectory ``dx = (anything) dtau + g dB`` has quadratic variation
    ``g^2 dtau``, so by Ito's lemma

        d log p(x) = [f D + f x.s - g^2/2 |s|^2] dtau + s . dx

    (the Laplacians cancel: no divergence). Frozen at the start of each step, the time
    integrals are exact: ``Int f dtau = -(log alpha_next - log alpha)`` and
    ``Int g^2/sigma^2 dtau = 2 (lambda_next - lambda)``, so with ``x, eps`` at the
    start of the step and ``dx = x_next - x``:

        dlogp = -D dlog_alpha + dlog_alpha (x.eps)/sigma - dlambda |eps|^2 - eps.dx/sigma.

    The estimate is exact in the limit of small steps; on a grid its error is that of
    the Euler scheme for the log-density: per step a zero-mean part
    ``1/2 (dx^T H dx - c^2 tr H)`` (``H`` the Hessian of ``log p_t``, ``c^2`` the step's
    noise variance) with variance ``c^4 |H|_F^2 / 2``, and a drift part of order
    ``dtau^2``; so the error is ``O(sqrt(max dtau))`` per trajectory and ``O(max dtau)``
    on average. It is valid only for trajectories whose noise per step has the reverse
    SDE's variance (``ddpm``, ``euler_maruyama``, ``sde_dpm_solver_pp``); an ODE
    trajectory (no noise) gives a wrong answer, because the Laplacian then no longer
    cancels.

    Args:
      process: the model's :class:`~jdiff.Process`.
      xs: ``(N + 1, B, ...)`` states at the grid points (``SampleInfo.xs`` of
        ``jdiff.sample(..., return_info=True, trajectory=True)``).
      epss: ``(N, B, ...)`` the eps predictions at ``xs[n]`` (``SampleInfo.epss``).
      grid: ``(N + 1,)`` the decreasing time grid, ending where ``sigma > 0``.
      log_prob_T: ``(B,)`` ``log p`` at ``xs[0]`` (default: the Gaussian prior,
        :func:`gaussian_prior_log_prob`; only differences matter for SuperDiff).

    Returns:
      ``(N + 1, B)`` the estimated ``log p_{t_n}(xs[n])``.

    Raises:
      ValueError: shapes that do not fit together, a grid that is not valid for the
        process or that ends at ``sigma = 0``.
    """
    xs = jnp.asarray(xs)
    epss = jnp.asarray(epss)
    grid = jnp.asarray(grid)
    if xs.ndim < 3:
        raise ValueError(f"xs must be (N + 1, B, ...) states of a trajectory, got shape {xs.shape}")
    if grid.ndim != 1 or grid.shape[0] != xs.shape[0]:
        raise ValueError(f"grid of shape {grid.shape} does not fit xs of shape {xs.shape} (need ({xs.shape[0]},))")
    if epss.shape != (xs.shape[0] - 1,) + xs.shape[1:]:
        raise ValueError(
            f"epss has shape {epss.shape}; xs of shape {xs.shape} needs {(xs.shape[0] - 1,) + xs.shape[1:]}"
        )
    from jdiff._sample import validate_grid

    grid = validate_grid(process, grid)
    g = concrete(grid)
    if g is not None and process.t_data is not None and float(g[-1]) == process.t_data:
        raise ValueError("the Ito density needs sigma > 0 at every grid point: end the grid at t_min, not t_data")
    dt = jnp.result_type(xs.dtype, jnp.float32)
    xs = xs.astype(dt)
    grid = grid.astype(dt)
    l0 = gaussian_prior_log_prob(process, xs[0]) if log_prob_T is None else jnp.asarray(log_prob_T, dt)
    if l0.shape != (xs.shape[1],):
        raise ValueError(f"log_prob_T must have shape ({xs.shape[1]},), got {l0.shape}")
    inc = jax.vmap(lambda x, xn, e, t, tn: ito_increment(process, x, xn, e, t, tn))(
        xs[:-1], xs[1:], epss, grid[:-1], grid[1:]
    )
    return jnp.concatenate([l0[None], l0[None] + jnp.cumsum(inc, axis=0)], axis=0)
