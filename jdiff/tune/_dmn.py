"""DMN: a grid minimizing a bound on the discretization error, without model calls (Xue et al., CVPR 2024)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._grid import time_grid
from jdiff.tune._grids import GridFit, _ends, _to_data, grid_space, logits_from_grid
from jdiff.tune._programs import Bounded

# ---------------------------------------------------------------------------- DMN
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def _lagrange_weights(nodes, a, b):
    """``int_a^b e^l L_j(l) dl`` for the Lagrange basis ``L_j`` on ``nodes`` (Gauss-Legendre,
    16 points: exact to rounding for the smooth integrands of a step)."""
    nodes = jnp.asarray(nodes)
    k = nodes.shape[0]
    w = _step_weights(nodes[None], jnp.reshape(a, (1,)), jnp.reshape(b, (1,)), np.ones((1, k), bool))
    return w[0]


def _step_weights(nodes, a, b, mask):
    """Vectorized :func:`_lagrange_weights`: ``nodes`` ``(S, K)`` (entries where ``mask``
    is False are ignored), intervals ``[a_s, b_s]``; returns ``(S, K)`` (0 where masked)."""
    dt = nodes.dtype
    x = 0.5 * (b - a)[:, None] * jnp.asarray(_GL_X, dt) + 0.5 * (a + b)[:, None]  # (S, Q)
    w = 0.5 * (b - a)[:, None] * jnp.asarray(_GL_W, dt)
    K = nodes.shape[1]
    other = mask[:, None, :] & mask[:, :, None] & ~np.eye(K, dtype=bool)[None]  # (S, j, m): factors of L_j
    den = jnp.where(other, nodes[:, :, None] - nodes[:, None, :], 1.0)  # (S, j, m)
    num = jnp.where(other[..., None], x[:, None, None, :] - nodes[:, None, :, None], 1.0)  # (S, j, m, Q)
    L = jnp.prod(num / den[..., None], axis=2)  # (S, j, Q)
    out = jnp.sum(w[:, None, :] * jnp.exp(x)[:, None, :] * L, axis=-1)
    return jnp.where(mask, out, 0.0)


def dmn_objective(process, lambdas, order: int = 3, warmup: int = 3):
    """The bound of Xue et al. ("Accelerating Diffusion Sampling with Optimized Time
    Steps", CVPR 2024, Sec. 3) on the error of a multistep data-prediction solver over
    the log-SNR points ``lambdas`` (increasing, ``N + 1`` of them).

    Step ``n`` (``lambda_n -> lambda_{n+1}``) replaces ``x0(lambda)`` in
    ``int e^lambda x0 dlambda`` by its Lagrange interpolant through the last ``k``
    nodes (``k = min(order, n + 1, N - n)``: warm-up and lower order at the end), so a
    model error ``delta_m`` at node ``m`` enters the result with the weight
    ``J_{n,m} = int e^lambda L_m``. The model's x0 error at node ``m`` is taken as
    ``c * sigma_m^2 / alpha_m`` (the paper's assumption; ``c`` does not change the
    minimizer). The first ``warmup`` steps add the Euclidean norm of their weighted
    errors; the later ones add up the signed weights per node and the bound adds the
    absolute values. This is the objective of the paper's released code
    (``scxue/DM-NonUniform``) written for any order and process; the paper minimizes it
    with a constrained trust-region method, :func:`dmn` with Adam on the softmax
    parameterization (no constraint needed). All steps are computed at once, in one
    compiled program per (process, order, number of points).
    """
    return _dmn_objective(process, jnp.asarray(lambdas), order=int(order), warmup=int(warmup))


def _dmn_objective_impl(process, lam, *, order, warmup):
    lam = jnp.asarray(lam)
    N = lam.shape[0] - 1
    t = process.t_of_lambda(lam)
    err = process.sigma(t) ** 2 / process.alpha(t)
    K = max(1, min(order, N))
    n = np.arange(N)
    k = np.minimum(np.minimum(order, n + 1), N - n)  # nodes per step (static)
    j = np.arange(K)
    mask = j[None] < k[:, None]
    idx = np.where(mask, n[:, None] - (k[:, None] - 1) + j[None], 0)  # nodes n-k+1..n
    J = _step_weights(lam[idx], lam[:-1], lam[1:], mask) * err[idx]  # (N, K)
    warm = n < warmup
    total = jnp.sum(jnp.where(warm, jnp.sqrt(jnp.sum(J * J, -1)), 0.0))
    late = jnp.where((~warm)[:, None] & mask, J, 0.0)
    per_node = jnp.zeros((N + 1,), J.dtype).at[idx.ravel()].add(late.ravel())
    return total + jnp.sum(jnp.abs(per_node))


_dmn_objective = jax.jit(_dmn_objective_impl, static_argnames=("order", "warmup"))


def _dmn_lams(z, l0, l1):
    c = jnp.cumsum(jax.nn.softmax(z))[:-1]
    return jnp.concatenate([jnp.reshape(l0, (1,)), l0 + (l1 - l0) * c, jnp.reshape(l1, (1,))]).astype(z.dtype)


def _dmn_fit_impl(process, z, l0, l1, lr, *, order, iters):
    """``iters`` Adam steps on :func:`dmn_objective` under ``lax.scan``; returns the logits
    of the lowest bound and the bound's history."""
    b1, b2, eps = 0.9, 0.999, 1e-8

    def body(carry, k):
        z, m, v, best_v, best_z = carry
        val, g = jax.value_and_grad(
            lambda z: _dmn_objective_impl(process, _dmn_lams(z, l0, l1), order=order, warmup=3)
        )(z)
        better = jnp.isfinite(val) & (val < best_v)
        best_v, best_z = jnp.where(better, val, best_v), jnp.where(better, z, best_z)
        c = (k + 1).astype(z.dtype)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        z = z - lr * (m / (1 - b1**c)) / (jnp.sqrt(v / (1 - b2**c)) + eps)
        return (z, m, v, best_v, best_z), val

    zeros = jnp.zeros_like(z)
    (_, _, _, _, best), hist = jax.lax.scan(
        body, (z, zeros, zeros, jnp.asarray(jnp.inf, z.dtype), z), jnp.arange(iters)
    )
    return best, hist


_dmn_fit = Bounded(jax.jit(_dmn_fit_impl, static_argnames=("order", "iters")))


def dmn(
    process,
    num_steps: int,
    *,
    order: int = 3,
    t_start: float | None = None,
    t_end: float | None = None,
    init: str = "logsnr",
    iters: int = 500,
    learning_rate: float = 0.05,
) -> GridFit:
    """A grid of ``num_steps`` intervals whose interior log-SNR points minimize
    :func:`dmn_objective` (Xue et al., CVPR 2024), without any model call.

    The points are :func:`grid_from_logits` in log-SNR (so ordered by construction), the
    logits fitted by Adam (float64 when ``jax_enable_x64`` is on), started from the
    ``init`` grid kind. ``order`` is the solver's multistep order (3 for UniPC-3 /
    DPM-Solver++(3M), as in the paper). With ``t_end`` at the data (the process's
    ``t_data``, e.g. ``0.0``), where the log-SNR and the bound are infinite, the
    ``num_steps - 1`` intervals from ``t_start`` to ``t_min`` are fitted and the last
    step goes from ``t_min`` to the data (as in ``jdiff.time_grid(..., final="data")``).

    Raises:
      ValueError: ``num_steps < 1``, ``order`` not in 1..3, an end point with infinite
        log-SNR (e.g. rectified flow's ``t = 1``: pass a smaller ``t_start``).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    t0, t1 = _ends(process, t_start, t_end)
    if grid_space(process, t0, t1) != "logsnr":
        raise ValueError(
            f"dmn works in log-SNR, which is infinite at t_start={t0} or t_end={t1} for {process!r}: "
            "pass finite end points"
        )
    start = time.perf_counter()
    to_data = _to_data(process, t1)
    te, n = (float(process.t_min), int(num_steps) - 1) if to_data else (t1, int(num_steps))
    if n == 0:  # one step straight to the data: nothing to place
        grid = np.array([np.float32(t0), np.float32(t1)], np.float64)
        return GridFit(grid=grid, method="dmn", history=[], seconds=time.perf_counter() - start)
    g0 = np.asarray(time_grid(process, n, kind=init, t_start=t0, t_end=te), np.float64)
    logits0 = logits_from_grid(process, g0, "logsnr")
    dt = jnp.asarray(1.0).dtype.type  # float64 under jax_enable_x64
    l0, l1 = (float(v) for v in np.asarray(process.lambda_(jnp.asarray([t0, te], dt)), np.float64))

    best, hist = _dmn_fit(
        process,
        jnp.asarray(logits0, dt),
        jnp.asarray(l0, dt),
        jnp.asarray(l1, dt),
        dt(learning_rate),
        order=order,
        iters=int(iters),
    )
    hist = [float(v) for v in np.asarray(hist)]
    grid = np.array(process.t_of_lambda(_dmn_lams(best, l0, l1)), np.float64)
    lo = np.float32(te) if float(np.float32(te)) >= te else np.nextafter(np.float32(te), np.float32(t0))
    grid = np.clip(grid, float(lo), float(np.float32(t0)))  # rounding never leaves [te, t0]
    grid[0], grid[-1] = np.float32(t0), np.float32(te)
    if to_data:
        grid = np.concatenate([grid, [np.float32(t1)]])
    return GridFit(grid=grid, method="dmn", history=hist, seconds=time.perf_counter() - start)
