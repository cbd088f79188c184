"""The integrators of :func:`jdiff.likelihood.log_likelihood`: the probability-flow vector
field in ``t``, ``rho`` or ``lambda``, the field augmented with the divergence (exact or
Hutchinson probes), and its solution adaptive (diffrax), on a fixed Runge-Kutta grid or
by a jdiff solver with a quadrature of the divergence over the grid's nodes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._random import _batch_keys
from jdiff.likelihood._prior import _feature_sum


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
    # deferred: diffrax is heavy (about 1.5-2 s to import) and only the adaptive path needs it
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
    keys = _batch_keys(key, shape[0])

    def one(k):
        if probe == "gaussian":
            return jax.random.normal(k, (num_probes,) + tuple(shape[1:]), dtype)
        return jax.random.rademacher(k, (num_probes,) + tuple(shape[1:]), dtype)

    return jnp.swapaxes(jax.vmap(one)(keys), 0, 1)
