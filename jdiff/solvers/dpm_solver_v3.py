r"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver
with Empirical Model Statistics", NeurIPS 2023), with its empirical model statistics
(EMS) computed by jdiff.

In log-SNR ``lambda`` the probability-flow ODE with a noise prediction reads
``dx/dlambda = (alpha'/alpha) x - sigma eps``. For any per-dimension ``l_lambda`` it is

    dx/dlambda = (alpha'/alpha - l) x - alpha f,    f = (sigma eps - l x) / alpha,

whose exact solution over a step ``s -> t`` is (``L = \int l``, integrating factor)

    x_t = (alpha_t / alpha_s) e^{L_s - L_t} x_s - alpha_t \int_s^t e^{L_lambda - L_t} f_lambda dlambda.

The paper's second change of variable (with ``S = \int s``) takes out the part of ``f``
that follows ``f' = s f + b``:

    g_lambda = e^{S_s - S_lambda} f_lambda - \int_s^lambda e^{S_s - S_u} b_u du,

which is constant when ``f`` follows that linear model exactly. ``g`` is then expanded
in a Taylor polynomial around ``lambda_s``; its derivatives come from past outputs
(the multistep predictor) or from the output at the step's end (the corrector, which
costs no call). Every integral of the update is a per-dimension coefficient that
depends only on the grid and the statistics, so ``init`` computes them all:
``x_{i+1} = E_i x_i + sum_j F_ij f_{i-j} + c_i`` with ``E, F, c`` of the shape of one
sample.

The EMS (Sec. 3.2, Eqs. 9-10) are the choices that make the two changes of variable
most effective, per dimension, on a log-SNR grid:

- ``l_lambda = E[diag(sigma grad_x eps)]``, the minimizer of ``E||grad_x (sigma eps - l x)||_F^2``;
  estimated with one Jacobian-vector product per sample with a Rademacher vector
  ``v`` (``E[v * (J v)] = diag J``);
- ``s_lambda, b_lambda``: the least-squares line ``f' ~ s f + b`` over samples, with
  ``f'`` the total derivative of ``f`` along the ODE (one JVP per sample in the
  direction ``(dx/dlambda, 1)``).

The expectations are over ``x_lambda = alpha x0 + sigma z`` with ``x0`` from the data
(or from the model's own samples), computed by :func:`model_statistics` and kept with
the model in an ``.npz`` file (:meth:`ModelStatistics.save`, :func:`load_statistics`).
Between the statistics' grid points ``l, s, b`` are linear in ``lambda``: ``L`` and
``S`` are then exact piecewise quadratics, and the remaining integrals use 16-point
Gauss-Legendre quadrature on each step. So any time grid inside the statistics' range
works (the reference implementation rounds the grid to its statistics points).

With degenerate statistics ``l = 1, s = b = 0``: ``f = -x0``, ``g = f`` and the
predictor is DPM-Solver++ (data prediction, exact Taylor/Lagrange coefficients: jdiff's
``dpm_solver_pp(order, solver_type="heun")``) and the corrector UniC with the same exact
coefficients.

Pseudo-order (Sec. 3.3): with ``pseudo=True`` the ``k``-th derivative of ``g`` is
estimated from the ``k + 1`` nearest points only (``k!`` times the divided difference)
instead of the Taylor system through all points; the corrector likewise with
``corrector_pseudo``. The corrector (Sec. 3.4) redoes step ``i - 1`` once the model has
been evaluated at ``x_i``, with that output as an extra node (order ``p_{i-1} + 1``, as
UniC), keeping ``sigma eps - l x`` (hence ``f``) of the new output fixed. The reference
implementation's corrector without pseudo-order uses one node fewer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._core import ei_coefficients
from jdiff.solvers._base import (
    LONG_STEP_RATIO,
    Solver,
    empty_state,
    evaluate,
    geometry_at,
    grid_curves,
    history_lambdas,
    multistep_order,
    network_calls,
    row,
    settings_name,
    steps_of,
)
from jdiff.solvers._v3_statistics import ModelStatistics, load_statistics, model_statistics

__all__ = ["ModelStatistics", "model_statistics", "load_statistics", "dpm_solver_v3", "DPMSolverV3"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)
_GL_X = 0.5 * (_GL_X + 1.0)  # nodes on [0, 1]
_GL_W = 0.5 * _GL_W


# --------------------------------------------------------------------- tables


class _Interp(NamedTuple):
    """The statistics as piecewise-linear functions of lambda (flattened per sample)."""

    lam: jax.Array  # (M + 1,)
    l: jax.Array  # (M + 1, D)  # noqa: E741
    s: jax.Array
    b: jax.Array
    cl: jax.Array  # cumulative integrals at the points (exact for piecewise-linear)
    cs: jax.Array

    @staticmethod
    def build(st: ModelStatistics, dtype):
        lam = jnp.asarray(st.lam, dtype)
        flat = [jnp.asarray(a.reshape(a.shape[0], -1), dtype) for a in (st.l, st.s, st.b)]
        d = jnp.diff(lam)[:, None]

        def cum(a):
            return jnp.concatenate([jnp.zeros_like(a[:1]), jnp.cumsum(0.5 * d * (a[1:] + a[:-1]), 0)], 0)

        return _Interp(lam, *flat, cum(flat[0]), cum(flat[1]))

    def at(self, x):
        """``(l, L, S, b)`` at log-SNR ``x`` (clamped to the range), with
        ``L = \\int_{lam_0}^x l`` and ``S = \\int_{lam_0}^x s`` exact for piecewise-linear ``l, s``."""
        M = self.lam.shape[0] - 1
        j = jnp.clip(jnp.sum(self.lam <= x) - 1, 0, M - 1)  # compiles smaller than searchsorted
        x = jnp.clip(x, self.lam[0], self.lam[-1])
        dx, d = x - self.lam[j], self.lam[j + 1] - self.lam[j]

        def value(a):
            return a[j] + (a[j + 1] - a[j]) * (dx / d)

        def integral(a, ca):
            return ca[j] + a[j] * dx + (a[j + 1] - a[j]) * (dx * dx / (2.0 * d))

        return value(self.l), integral(self.l, self.cl), integral(self.s, self.cs), value(self.b)


def _derivative_weights(lam_nodes, q, pseudo: bool):
    """``M`` with ``g^(k) = sum_j M[k-1, j] g_j`` (``k = 1..K-1``; node 0 is the base)
    from the first ``q`` nodes after the base: the Taylor system through all of them,
    or (``pseudo``) ``k!`` times the divided difference of nodes ``0..k``."""
    K = lam_nodes.shape[0]
    if K == 1:
        return jnp.zeros((0, 1), lam_nodes.dtype)
    dt = lam_nodes.dtype
    active = jnp.arange(1, K) <= q  # (K-1,) node j = 1..K-1
    if pseudo:
        lam = jnp.where(jnp.concatenate([jnp.ones((1,), bool), active]), lam_nodes, lam_nodes[0] - 1.0 - jnp.arange(K))
        rows = []
        for k in range(1, K):
            w = []
            for j in range(K):
                if j > k:
                    w.append(jnp.zeros((), dt))
                    continue
                den = jnp.ones((), dt)
                for m in range(k + 1):
                    if m != j:
                        den = den * (lam[j] - lam[m])
                w.append(math.factorial(k) / den)
            rows.append(jnp.stack(w))
        Mw = jnp.stack(rows)
    else:
        r = jnp.where(active, lam_nodes[1:] - lam_nodes[0], 1.0)
        r = jnp.where(r == 0, 1.0, r)
        powers = jnp.stack([r ** (k + 1) / math.factorial(k + 1) for k in range(K - 1)], axis=1)  # V[j, k]
        mask = active[:, None] & active[None, :]
        V = jnp.where(mask, powers, jnp.eye(K - 1, dtype=dt))
        Vinv = jnp.linalg.inv(V)  # g^(k) = sum_j Vinv[k, j] (g_j - g_0)
        Mw = jnp.concatenate([-jnp.sum(Vinv * active[None, :], 1, keepdims=True), Vinv], 1)
    k_active = jnp.arange(1, K) <= q
    col_active = jnp.arange(K) <= q
    return jnp.where(k_active[:, None] & col_active[None, :], Mw, 0.0)


def _step_coefficients(ip: _Interp, g, lam_nodes, q, Mw):
    """``(E, F, c)`` of ``x_t = E x_s + sum_j F[j] f_j + c`` for one step (geometry
    ``g``), nodes ``lam_nodes`` (node 0 the base ``lambda_s``), ``q`` active nodes after
    the base and derivative weights ``Mw`` (:func:`_derivative_weights`). See the module
    docstring; every integral is 16-point Gauss-Legendre on its interval."""
    dt = g.h.dtype
    K = lam_nodes.shape[0]
    n = _GL_X.shape[0]
    h = g.h_safe
    ls = g.lam_s
    lt = ls + h
    th = jnp.asarray(_GL_X, dt)
    wq = jnp.asarray(_GL_W, dt)
    active = jnp.arange(K) <= q
    ln = jnp.where(active, lam_nodes, ls)
    # every point the statistics are needed at, in one evaluation:
    # [s, t, quadrature on [s, t], inner quadrature on [s, s + th_q h], on [s, node_j]]
    lam_q = ls + th * h
    inner = ls + (th[:, None] * th[None, :] * h).reshape(-1)
    to_nodes = (ls + th[None, :] * (ln - ls)[:, None]).reshape(-1)
    pts = jnp.concatenate([jnp.stack([ls, lt]), lam_q, inner, to_nodes])
    _, L, S, bv = jax.vmap(ip.at)(pts)
    Ls, Lt, Ss = L[0], L[1], S[0]
    Lq, Sq = L[2 : 2 + n], S[2 : 2 + n]
    o = 2 + n
    S_in, b_in = S[o : o + n * n].reshape(n, n, -1), bv[o : o + n * n].reshape(n, n, -1)
    o += n * n
    S_nd, b_nd = S[o:].reshape(K, n, -1), bv[o:].reshape(K, n, -1)
    alpha_t = g.alpha_t
    W = jnp.exp(Lq - Lt + Sq - Ss)  # (n, D)
    E = jnp.exp(g.log_alpha_t - g.log_alpha_s + Ls - Lt)
    c0 = alpha_t * h * jnp.sum(wq[:, None] * W, 0)
    # beta(lambda) = int_s^lambda e^{S_s - S_u} b_u du at the quadrature points and nodes
    beta_q = (th * h)[:, None] * jnp.einsum("r,qrd->qd", wq, jnp.exp(Ss - S_in) * b_in)
    beta_n = (ln - ls)[:, None] * jnp.einsum("r,jrd->jd", wq, jnp.exp(Ss - S_nd) * b_nd)
    Kb = alpha_t * h * jnp.sum(wq[:, None] * W * beta_q, 0)
    G = jnp.zeros((K,) + c0.shape, dt).at[0].add(-c0)
    if K > 1:
        powers = jnp.stack([(th * h) ** k / math.factorial(k) for k in range(1, K)])  # (K-1, n)
        Q = alpha_t * h * jnp.einsum("kq,q,qd->kd", powers, wq, W)
        G = G - jnp.einsum("kd,kj->jd", Q, Mw)
    G = jnp.where(active[:, None], G, 0.0)
    _, _, Sn, _ = jax.vmap(ip.at)(ln)
    F = G * jnp.exp(Ss - Sn)
    c = -jnp.sum(G * beta_n, 0) - Kb
    # an infinite step (alpha_s = 0 or sigma_t = 0) is taken by the caller's fallback
    return jnp.where(g.finite, E, 0.0), jnp.where(g.finite, F, 0.0), jnp.where(g.finite, c, 0.0)


class _Table(NamedTuple):
    E: jax.Array  # (N, D)
    F: jax.Array  # (N, H, D) by ring slot
    c: jax.Array  # (N, D)
    cx: jax.Array  # (N,) the first-order fallback on infinite steps
    cx0: jax.Array
    finite: jax.Array  # (N,)
    f_eps: jax.Array  # (N,) sigma_i / alpha_i (0 where alpha_i = 0)
    f_x: jax.Array  # (N, D) l_i / alpha_i
    Ec: jax.Array  # corrector of x_i from x_{i-1}: (N, D), (N, H, D), (N, D)
    Fc: jax.Array
    cc: jax.Array
    corr: jax.Array  # (N,) whether step i corrects x_i
    order: jax.Array  # (N,) predictor order


@dataclasses.dataclass(frozen=True)
class DPMSolverV3(Solver):
    """DPM-Solver-v3 (multistep, one model call per step); see the module docstring.

    Attributes:
      stats: the :class:`ModelStatistics` of the model.
      order: predictor order 1-3.
      pseudo: estimate the predictor's derivatives by divided differences (pseudo-order).
      corrector: apply the corrector (no extra call).
      corrector_pseudo: the corrector's derivatives by divided differences.
      lower_order_final: lower the order on the last steps of grids shorter than 15 and
        on a long last step of longer grids (:func:`jdiff.solvers._base.multistep_order`).
    """

    stats: ModelStatistics
    order: int = 3
    pseudo: bool = False
    corrector: bool = True
    corrector_pseudo: bool = False
    lower_order_final: bool = True
    shaped_tables = True  # per-dimension coefficients (jdiff.sample_padded builds them per sample shape)

    def __post_init__(self):
        if not isinstance(self.stats, ModelStatistics):
            raise TypeError(f"stats must be ModelStatistics (see model_statistics), got {type(self.stats).__name__}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"dpm_solver_v3 supports order 1, 2 or 3, got {self.order!r}")
        for k in ("pseudo", "corrector", "corrector_pseudo", "lower_order_final"):
            if not isinstance(getattr(self, k), bool):
                raise TypeError(f"{k} must be True or False, got {getattr(self, k)!r}")

    @property
    def name(self) -> str:
        extra = {k: v for k, v in (("pseudo", self.pseudo), ("corrector_pseudo", self.corrector_pseudo)) if v}
        if not self.corrector:
            extra["corrector"] = False
        if not self.lower_order_final:
            extra["lower_order_final"] = False
        return settings_name(f"dpm-v3-{self.order}", **extra)

    def _hist(self) -> int:
        return self.order + int(self.corrector)

    def table(self, process, grid) -> _Table:
        st = self.stats
        if process.name != st.process:
            raise ValueError(
                f"these DPM-Solver-v3 statistics were computed for process {st.process!r}, not {process.name!r}"
            )
        dt = grid.dtype
        ip = _Interp.build(st, dt)
        N = grid.shape[0] - 1
        H = self._hist()
        K = self.order
        gc = grid_curves(process, grid)
        num_steps = steps_of(grid)

        def order_at(i):
            return multistep_order(gc.lam, i, self.order, num_steps, self.lower_order_final, LONG_STEP_RATIO)

        def by_slot(F, steps_back):
            slots = (steps_back % H).astype(jnp.int32)
            return jnp.zeros((H,) + F.shape[1:], F.dtype).at[slots].add(F)

        def one(i):
            g = geometry_at(gc.steps, i)
            p = order_at(i)
            nodes = history_lambdas(gc.lam, i, K)
            first = ei_coefficients(g, mode="data", K=0)
            lam_i = jnp.where(jnp.isfinite(gc.lam[i]), gc.lam[i], ip.lam[0])
            la = gc.log_alpha[i]
            inv_a = jnp.where(jnp.isfinite(la), jnp.exp(-jnp.where(jnp.isfinite(la), la, 0.0)), 0.0)
            f_eps = jnp.exp(gc.log_sigma[i]) * inv_a
            f_x = ip.at(lam_i)[0] * inv_a
            if not self.corrector:
                nodes = jnp.where(jnp.isfinite(nodes), nodes, g.lam_s)
                Mw = _derivative_weights(nodes, p - 1, self.pseudo)
                E, F, c = _step_coefficients(ip, g, nodes, p - 1, Mw)
                F = by_slot(F, i - jnp.arange(K))
                return _Table(E, F, c, first.cx, first.cx0, g.finite, f_eps, f_x, E, F, c, jnp.zeros((), bool), p)
            # the predictor (K nodes, padded to K + 1) and the corrector of step i - 1 (base
            # lambda_{i-1}, then the new lambda_i and lambda_{i-2} .. lambda_{i-K}) as one batch
            ipv = jnp.maximum(i - 1, 0)
            gp = geometry_at(gc.steps, ipv)
            old = history_lambdas(gc.lam, ipv, K)[1:]
            cn = jnp.concatenate([jnp.reshape(gp.lam_s, (1,)), jnp.reshape(gp.lam_t, (1,)), old])
            cn = jnp.where(jnp.isfinite(cn), cn, gp.lam_s)
            pn = jnp.concatenate([jnp.where(jnp.isfinite(nodes), nodes, g.lam_s), g.lam_s[None]])
            qc = order_at(ipv)
            Mp = _derivative_weights(pn, p - 1, self.pseudo)
            Mc = _derivative_weights(cn, qc, self.corrector_pseudo)
            both = jax.tree.map(lambda u, v: jnp.stack([u, v]), (g, pn, p - 1, Mp), (gp, cn, qc, Mc))
            E2, F2, c2 = jax.vmap(lambda gg, nn, qq, mm: _step_coefficients(ip, gg, nn, qq, mm))(*both)
            F = by_slot(F2[0][:K], i - jnp.arange(K))
            back = jnp.concatenate([jnp.array([1, 0]), jnp.arange(2, K + 1)])  # corrector nodes: steps back from i
            Fc = by_slot(F2[1], i - back)
            on = (i > 0) & gp.finite
            return _Table(E2[0], F, c2[0], first.cx, first.cx0, g.finite, f_eps, f_x, E2[1], Fc, c2[1], on, p)

        return jax.vmap(one)(jnp.arange(N))

    def check_inputs(self, process, grid, x_T) -> None:
        """Refuse statistics made for another process or sample shape, and a (concrete)
        grid whose finite log-SNRs leave the statistics' range."""
        st = self.stats
        if process.name != st.process:
            raise ValueError(
                f"these DPM-Solver-v3 statistics were computed for process {st.process!r}, not {process.name!r}"
            )
        got = tuple(np.shape(x_T)[1:])
        if got != st.shape:
            raise ValueError(f"these DPM-Solver-v3 statistics are for samples of shape {st.shape}, x_T has {got}")
        g = concrete(grid)
        if g is None:
            return
        with jax.ensure_compile_time_eval():
            lam = np.asarray(process.lambda_(jnp.asarray(g, jnp.float32)), np.float64)
        inner = lam[np.isfinite(lam)]
        lo, hi = st.lam[0], st.lam[-1]
        tol = 1e-4 * max(1.0, hi - lo)  # float32 grids
        if inner.size and (inner.min() < lo - tol or inner.max() > hi + tol):
            raise ValueError(
                f"the grid's log-SNR range [{inner.min():.4g}, {inner.max():.4g}] leaves the statistics' "
                f"range [{lo:.4g}, {hi:.4g}]: compute the statistics over a wider lambda_range"
            )

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        del key, nfe
        self.check_inputs(process, grid, x_T)
        state = empty_state(x_T, grid, hist_size=self._hist() + int(self.corrector), process=process)
        return state._replace(aux=self.table(process, state.grid))

    def step(self, denoiser, state, cond=None):
        x, i = state.x, state.i
        c = row(state.aux, i)
        dt = x.dtype
        shape = x.shape[1:]
        t = state.grid[i]
        pred = evaluate(denoiser, x, t, cond)
        H = self._hist()

        def r(a):
            return a.astype(dt).reshape(shape)

        f = c.f_eps.astype(dt) * pred.eps - r(c.f_x) * x
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, f.astype(state.hist.dtype), i % H, 0)
        if self.corrector:
            x_prev = hist[H]
            xc = r(c.Ec) * x_prev + r(c.cc)
            for k in range(H):
                xc = xc + r(c.Fc[k]) * hist[k]
            x = jnp.where(c.corr, xc, x)
            hist = jax.lax.dynamic_update_index_in_dim(hist, x.astype(hist.dtype), H, 0)
        x_next = r(c.E) * x + r(c.c)
        for k in range(H):
            x_next = x_next + r(c.F[k]) * hist[k]
        fallback = c.cx.astype(dt) * x + c.cx0.astype(dt) * pred.x0
        x_next = jnp.where(c.finite, x_next, fallback)
        return state._replace(x=x_next, i=i + 1, pred=pred, hist=hist, nfe=state.nfe + network_calls(denoiser, t))


def dpm_solver_v3(
    stats: ModelStatistics,
    order: int = 3,
    *,
    pseudo: bool = False,
    corrector: bool = True,
    corrector_pseudo: bool = False,
    lower_order_final: bool = True,
) -> DPMSolverV3:
    """DPM-Solver-v3 (Zheng et al., NeurIPS 2023) with the statistics ``stats``.

    Args:
      stats: :class:`ModelStatistics` from :func:`model_statistics` or
        :func:`load_statistics` (for this model, process and sample shape).
      order: predictor order 1-3 (one model call per step).
      pseudo: pseudo-order predictor (derivatives by divided differences, Sec. 3.3).
      corrector: the multistep corrector (Sec. 3.4; no extra call).
      corrector_pseudo: pseudo-order corrector.
      lower_order_final: lower the order on the last steps of grids shorter than 15 and
        on a long last step of longer grids (:func:`jdiff.solvers._base.multistep_order`).

    Returns:
      A :class:`DPMSolverV3`. Sampling checks that the process and sample shape are the
      statistics' and that the grid's log-SNR stays inside their range (grid points at
      infinite log-SNR, such as a last step to the data, are exact first-order steps).

    Raises:
      TypeError: ``stats`` is not :class:`ModelStatistics`, or a flag is not a bool.
      ValueError: an order outside 1-3.
    """
    return DPMSolverV3(stats, order, pseudo, corrector, corrector_pseudo, lower_order_final)
