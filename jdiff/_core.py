r"""The one exponential-integrator core every solver is written on.

Over a step ``s -> t`` with ``h = lambda_t - lambda_s`` the probability-flow ODE has
the exact solutions (Lu et al., "DPM-Solver", NeurIPS 2022, Prop. 3.1; Lu et al.,
"DPM-Solver++", 2022, Eq. 8)

    x_t = (sigma_t / sigma_s) x_s + sigma_t \int_{lambda_s}^{lambda_t} e^{l} x0(l) dl     (data)
    x_t = (alpha_t / alpha_s) x_s - alpha_t \int_{lambda_s}^{lambda_t} e^{-l} eps(l) dl  (noise)

Write the prediction ``m`` (x0 or eps) around ``lambda_s`` as
``m(lambda_s + u) = m_0 + sum_{k>=1} g_k (u/h)^k / k!``. The weighted integral of each
monomial is a phi-function, ``phi_j(z) = \int_0^1 e^{(1-th) z} th^{j-1}/(j-1)! dth``:

    x_t = c_x x_s + P * h * [ phi_1(z) m_0 + sum_{k>=1} phi_{k+1}(z) g_k ]

with ``(c_x, P, z) = (sigma_t/sigma_s, alpha_t, -h)`` for data prediction and
``(alpha_t/alpha_s, -sigma_t, +h)`` for noise prediction. Every solver differs only in
how it estimates ``g_k`` from other model outputs ("nodes") ``m_j`` at
``lambda_s + r_j h`` (``r_j < 0`` for past steps, ``0 < r_j <= 1`` for intermediate or
corrector points), ``D_j = m_j - m_0``. Matching the polynomial through the nodes gives
``sum_k g_k r_j^k / k! = D_j``, so the correction is ``P h sum_j w_j D_j`` with

    V^T w = (phi_2(z), ..., phi_{q+1}(z)),   V_{jk} = r_j^k / k!,   j, k = 1..q.

That is exact integration of the Lagrange interpolant in lambda (DEIS with a log-rho
basis, Zhang & Chen, ICLR 2023; DPM-Solver++(3M); UniPC's square systems, Zhao et al.,
NeurIPS 2023). With one node, UniPC's B(h) variants replace ``phi_2(z)`` by ``B/2`` with
``B = 1`` ("bh1") or ``B = phi_1(z)`` ("bh2"); bh2 is DPM-Solver's "midpoint" form
(DPM-Solver-2, DPM-Solver++(2S/2M)), while "exact" is DPM-Solver's "heun"/Taylor form.

With two nodes, the reference implementation of DPM-Solver(++)(3M) (Lu et al.,
``dpm_solver_pytorch.py``) and diffusers' ``DPMSolverMultistepScheduler`` estimate the
second difference as ``D2 = (D1_0 - D1_1) / (r0 + r1)``, which is ``g_2 / 2`` in the
notation above, and weight it with ``phi_3`` as if it were ``g_2``: the ``g_2`` term
gets half its exact weight. The local error is then ``O(h^3)`` instead of ``O(h^4)``
(globally second order instead of third). ``half_second=True`` in :func:`ei_weights`
reproduces it (``phi_3 / 2`` on the right-hand side of a two-node system).

The SDE variant (SDE-DPM-Solver++, Lu et al. 2022, Sec. 5 / App.) integrates the
reverse SDE in data prediction: ``c_x = sigma_t/sigma_s e^{-h}``, ``z = -2h`` and the
polynomial part scaled by ``2h``, plus the noise ``sigma_t sqrt(1 - e^{-2h}) z``.

Robustness rule shared by all solvers: a step with infinite ``h`` (it starts at
``alpha = 0``, zero terminal SNR, or ends at ``sigma = 0``, the data) is taken as the
exact first-order data-prediction step ``x_t = (sigma_t/sigma_s) x_s + alpha_t x0``,
which is finite at both ends. All inputs of the masked-out branch are made finite so
that gradients stay finite too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "phi",
    "Geometry",
    "geometry",
    "geometry_from",
    "ei_weights",
    "EICoef",
    "ei_coefficients",
    "ei_apply",
    "ei_step",
    "MODES",
    "COEFS",
]

MODES = ("data", "noise", "sde_data")
COEFS = ("exact", "bh1", "bh2")


# --------------------------------------------------------------------------- phi


def phi(j: int, z):
    """``phi_j(z) = sum_{n>=0} z^n / (n + j)!`` (``phi_0 = e^z``), computed stably.

    For ``|z| < 1`` a 16-term series; otherwise the recurrence
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z`` from ``phi_1 = expm1(z) / z``. Both
    branches see finite inputs, so ``jax.grad`` is finite everywhere.
    """
    z = jnp.asarray(z)
    if j == 0:
        return jnp.exp(z)
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, 0.0)
    series = jnp.zeros_like(z)
    for n in reversed(range(16)):
        series = series * zs + 1.0 / math.factorial(n + j)
    zl = jnp.where(small, 1.0, z)
    big = jnp.expm1(zl) / zl
    for k in range(1, j):
        big = (big - 1.0 / math.factorial(k)) / zl
    return jnp.where(small, series, big)


# ---------------------------------------------------------------------- geometry


class Geometry(NamedTuple):
    """Scalars of one step ``s -> t``. ``h`` may be +inf; ``finite`` says it is not."""

    log_alpha_s: jax.Array
    log_sigma_s: jax.Array
    log_alpha_t: jax.Array
    log_sigma_t: jax.Array
    lam_s: jax.Array
    lam_t: jax.Array
    h: jax.Array
    finite: jax.Array

    @property
    def alpha_t(self):
        return jnp.exp(self.log_alpha_t)

    @property
    def sigma_t(self):
        return jnp.exp(self.log_sigma_t)

    @property
    def alpha_s(self):
        return jnp.exp(self.log_alpha_s)

    @property
    def sigma_s(self):
        return jnp.exp(self.log_sigma_s)

    @property
    def h_safe(self):
        return jnp.where(self.finite, self.h, 1.0)


def geometry(process, s, t, dtype=jnp.float32) -> Geometry:
    s = jnp.asarray(s, dtype)
    t = jnp.asarray(t, dtype)
    las, lss = process.log_alpha(s), process.log_sigma(s)
    lat, lst = process.log_alpha(t), process.log_sigma(t)
    lam_s, lam_t = las - lss, lat - lst
    h = lam_t - lam_s
    finite = jnp.isfinite(h)
    return Geometry(las, lss, lat, lst, lam_s, lam_t, h, finite)


def geometry_from(log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t) -> Geometry:
    """:class:`Geometry` from log alpha / log sigma values (e.g. precomputed on a grid)."""
    lam_s, lam_t = log_alpha_s - log_sigma_s, log_alpha_t - log_sigma_t
    h = lam_t - lam_s
    return Geometry(log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t, lam_s, lam_t, h, jnp.isfinite(h))


# ----------------------------------------------------------------------- weights


def _mode_z(mode: str, h):
    if mode == "data":
        return -h
    if mode == "noise":
        return h
    if mode == "sde_data":
        return -2.0 * h
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def ei_weights(r, q, z, coef: str = "exact", *, half_second: bool = False):
    """Weights ``w`` of the node differences (see module docstring).

    Args:
      r: ``(K,)`` node positions relative to the step, ``(lambda_j - lambda_s) / h``.
      q: number of active nodes (traced int, ``0 <= q <= K``); nodes ``>= q`` get 0.
      z: the signed phi argument of the mode (``-h``, ``h`` or ``-2h``), finite.
      coef: ``"exact"``, ``"bh1"`` or ``"bh2"`` (only differs when ``q == 1``).
      half_second: with ``q == 2``, put ``phi_3 / 2`` on the second-difference term (the
        reference implementation's and diffusers' DPM-Solver(++)(3M); see the module).
    Returns:
      ``(K,)`` weights.
    """
    if coef not in COEFS:
        raise ValueError(f"unknown coefficient variant {coef!r}; expected one of {COEFS}")
    K = r.shape[0]
    if K == 0:
        return jnp.zeros((0,), z.dtype)
    idx = jnp.arange(K)
    active = idx < q
    r = jnp.where(active & jnp.isfinite(r) & (r != 0), r, 1.0)
    # V[j, k] = r_j^(k+1) / (k+1)!
    powers = jnp.stack([r ** (k + 1) / math.factorial(k + 1) for k in range(K)], axis=1)
    mask = active[:, None] & active[None, :]
    V = jnp.where(mask, powers, jnp.eye(K, dtype=powers.dtype))
    rhs = jnp.stack([phi(k + 2, z) for k in range(K)])
    if coef != "exact":
        B = jnp.ones_like(z) if coef == "bh1" else phi(1, z)
        rhs = rhs.at[0].set(jnp.where(q == 1, 0.5 * B, rhs[0]))
    if half_second and K >= 2:
        rhs = rhs.at[1].set(jnp.where(q == 2, 0.5 * rhs[1], rhs[1]))
    rhs = jnp.where(active, rhs, 0.0)
    if K == 1:
        return rhs / V[0, 0]
    return jnp.linalg.solve(V.T, rhs)


class EICoef(NamedTuple):
    """One exponential-integrator step as a linear combination:

        x_t = cx * x_s + sum_j cm[j] * m_j + cx0 * x0,

    with ``m_0`` the prediction at ``(x_s, s)`` and ``m_1..m_K`` the nodes. ``cx0`` is
    nonzero only for the infinite-h fallback (which needs the x0 prediction in noise
    mode). All entries are scalars (or batched over steps when precomputed)."""

    cx: jax.Array
    cm: jax.Array
    cx0: jax.Array


def ei_coefficients(
    g: Geometry,
    r=None,
    q=0,
    *,
    mode: str = "data",
    coef: str = "exact",
    w=None,
    K: int | None = None,
    half_second: bool = False,
) -> EICoef:
    """Coefficients of :func:`ei_step` (see :class:`EICoef`).

    Args:
      g: :func:`geometry` of the step.
      r: ``(K,)`` node positions ``(lambda_j - lambda_s) / h`` (or None).
      q: number of active nodes (traced or static int).
      mode: ``"data"``, ``"noise"`` or ``"sde_data"``.
      coef: ``"exact"``, ``"bh1"`` or ``"bh2"`` node weights.
      w: precomputed node weights replacing ``ei_weights`` (``(K,)``).
      K: number of nodes when ``r`` is None and ``w`` is None (default 0).
      half_second: see :func:`ei_weights`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if K is None:
        K = r.shape[0] if r is not None else (w.shape[0] if w is not None else 0)
    h = g.h_safe
    fin = g.finite
    dt = g.h.dtype
    # the exact first-order data step: the limit at infinite h, finite at both ends
    e_neg_h = jnp.exp(jnp.minimum(g.lam_s - g.lam_t, 0.0))
    sig_ratio = jnp.exp(g.log_sigma_t - g.log_sigma_s)
    if mode == "sde_data":
        fx, fx0 = sig_ratio * e_neg_h, g.alpha_t * (1.0 - e_neg_h * e_neg_h)
    else:
        fx, fx0 = sig_ratio, g.alpha_t * (1.0 - e_neg_h)

    if mode == "data":
        cx = jnp.exp(g.log_sigma_t - jnp.where(fin, g.log_sigma_s, 0.0))
        pref, he = g.alpha_t, h
    elif mode == "noise":
        # alpha_s may be 0 and sigma_t may be 0 only when h is infinite: guard both
        cx = jnp.exp(jnp.where(fin, g.log_alpha_t, 0.0) - jnp.where(fin, g.log_alpha_s, 0.0))
        pref, he = -jnp.where(fin, g.sigma_t, 0.0), h
    else:
        cx = jnp.exp(g.log_sigma_t - jnp.where(fin, g.log_sigma_s, 0.0) - h)
        pref, he = g.alpha_t, 2.0 * h
    z = _mode_z(mode, h)
    c0 = pref * he * phi(1, z)
    if K > 0:
        if w is None:
            w = ei_weights(r, jnp.where(fin, q, 0), z, coef, half_second=half_second)
        w = jnp.where(fin & (jnp.arange(K) < q), w, 0.0)
        cn = pref * he * w
        cm = jnp.concatenate([jnp.reshape(c0 - jnp.sum(cn), (1,)), cn])
    else:
        cm = jnp.reshape(c0, (1,))
    return EICoef(
        cx=jnp.where(fin, cx, fx).astype(dt),
        cm=jnp.where(fin, cm, 0.0).astype(dt),
        cx0=jnp.where(fin, 0.0, fx0).astype(dt),
    )


def ei_apply(c: EICoef, x, ms, x0=None):
    """Apply :class:`EICoef` to ``x``, the predictions ``ms`` (a sequence or a stacked
    array, ``ms[0]`` at ``(x_s, s)``) and the x0 prediction (default ``ms[0]``)."""
    dt = x.dtype
    out = c.cx.astype(dt) * x
    for j in range(c.cm.shape[0]):
        out = out + c.cm[j].astype(dt) * ms[j]
    return out + c.cx0.astype(dt) * (ms[0] if x0 is None else x0)


def ei_step(x, g: Geometry, m0, D=None, r=None, q=0, *, mode: str = "data", coef: str = "exact", x0=None):
    """One exponential-integrator step ``x_s -> x_t`` (noise not included for SDE).

    Args:
      x: the state at ``s``.
      g: :func:`geometry` of the step.
      m0: the prediction at ``(x_s, s)`` in the mode's form (x0 for data modes, eps
        for noise mode).
      D: ``(K, *x.shape)`` node differences ``m_j - m0`` (or None for first order).
      r: ``(K,)`` node positions ``(lambda_j - lambda_s) / h``.
      q: number of active nodes (traced or static int).
      mode: ``"data"``, ``"noise"`` or ``"sde_data"``.
      coef: ``"exact"``, ``"bh1"`` or ``"bh2"``.
      x0: the x0 prediction at ``(x_s, s)``; needed for the infinite-h fallback in
        noise mode (defaults to ``m0`` in data modes).
    Returns:
      ``x_t`` in ``x``'s dtype.
    """
    if x0 is None:
        if mode == "noise":
            raise ValueError("noise mode needs x0 for the infinite-step fallback")
        x0 = m0
    if D is None or D.shape[0] == 0:
        return ei_apply(ei_coefficients(g, mode=mode, K=0), x, [m0], x0)
    c = ei_coefficients(g, r, q, mode=mode, coef=coef)
    ms = [m0] + [m0 + D[j] for j in range(D.shape[0])]
    return ei_apply(c, x, ms, x0)
