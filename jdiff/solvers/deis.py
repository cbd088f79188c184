"""DEIS: diffusion exponential integrator sampler (Zhang & Chen, "Fast Sampling of
Diffusion Models with Exponential Integrator", ICLR 2023, Sec. 4, Eqs. 14-16).

In noise prediction, ``x_t / alpha_t = x_s / alpha_s + \\int_{rho_s}^{rho_t} eps drho``
with ``rho = sigma / alpha``. DEIS fits the Lagrange polynomial through the current and
``order - 1`` past noise predictions and integrates it exactly against ``drho``:

- ``basis="t"``: polynomial in time (the paper's tAB-DEIS). The weights
  ``\\int_0^1 e^{h(1-th)} l_j(t(lambda_s + th h)) dth`` are computed with 16-point
  Gauss-Legendre quadrature inside the step.
- ``basis="rho"``: polynomial in ``rho`` (rhoAB-DEIS), same quadrature.
- ``basis="log_rho"``: polynomial in ``log rho = -lambda`` (diffusers' DEIS); its weights
  have the closed form of :mod:`jdiff._core`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jdiff.solvers._base import settings_name
from jdiff.solvers._multistep import Multistep, multistep

__all__ = ["deis", "lagrange_quadrature_weights", "quadrature_weights_fn", "QuadratureWeights"]

_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)
_GL_X = 0.5 * (_GL_X + 1.0)  # nodes on [0, 1]
_GL_W = 0.5 * _GL_W


def lagrange_quadrature_weights(tau_fn, g, lam_nodes, q, dtype=None):
    """Weights ``w_j = \\int_0^1 e^{h(1-th)} l_j(tau(lambda_s + th h)) dth`` of the node
    differences ``eps_j - eps_0`` (``j = 1..K``) for the Lagrange basis ``l_j`` in the
    variable ``tau = tau_fn(lambda)`` through the current node and the first ``q`` past
    nodes. Returned weights of inactive nodes are 0."""
    K = lam_nodes.shape[0]
    dtype = dtype or g.h.dtype
    h = g.h_safe
    active = jnp.arange(K) < q
    lam_all = jnp.concatenate([jnp.reshape(g.lam_s, (1,)), jnp.where(active, lam_nodes, g.lam_s - 1.0 - jnp.arange(K))])
    act_all = jnp.concatenate([jnp.ones((1,), bool), active])
    tau = tau_fn(lam_all.astype(dtype))
    th = jnp.asarray(_GL_X, dtype)
    wq = jnp.asarray(_GL_W, dtype) * jnp.exp(h * (1.0 - th))
    tau_q = tau_fn(g.lam_s + th * h)  # (n,)
    weights = []
    for j in range(1, K + 1):
        basis = jnp.ones_like(tau_q)
        for k in range(K + 1):
            if k == j:
                continue
            denom = jnp.where(act_all[k], tau[j] - tau[k], 1.0)
            denom = jnp.where(denom == 0, 1.0, denom)
            basis = basis * jnp.where(act_all[k], (tau_q - tau[k]) / denom, 1.0)
        weights.append(jnp.sum(wq * basis))
    return jnp.where(active, jnp.stack(weights), 0.0)


@dataclasses.dataclass(frozen=True)
class QuadratureWeights:
    """The ``weights`` setting of :class:`jdiff.solvers._multistep.Multistep` for a
    Lagrange basis in ``"t"`` or ``"rho"``: a hashable value, so that two DEIS solvers
    with the same basis are equal."""

    basis: str

    def __call__(self, process, g, lam_nodes, q):
        tau_fn = process.t_of_lambda if self.basis == "t" else _rho_of_lambda
        return lagrange_quadrature_weights(tau_fn, g, lam_nodes, jnp.where(g.finite, q, 0))


def _rho_of_lambda(lam):
    return jnp.exp(-lam)


def quadrature_weights_fn(basis: str) -> QuadratureWeights:
    """The ``weights`` hook of :func:`jdiff.solvers._multistep.multistep` for a
    Lagrange basis in ``"t"`` or ``"rho"``."""
    if basis not in ("t", "rho"):
        raise ValueError(f"unknown quadrature basis {basis!r}; expected 't' or 'rho'")
    return QuadratureWeights(basis)


def deis(order: int = 3, *, basis: str = "t", lower_order_final: bool = True) -> Multistep:
    """DEIS of ``order`` 1-3 (one model call per step). See the module docstring."""
    if basis not in ("t", "rho", "log_rho"):
        raise ValueError(f"unknown DEIS basis {basis!r}; expected 't', 'rho' or 'log_rho'")
    base = f"deis{order}" + ("" if basis == "t" else f"-{basis}")
    name = settings_name(base, **({} if lower_order_final else {"lower_order_final": False}))
    return multistep(
        order,
        mode="noise",
        coef="exact",
        weights=None if basis == "log_rho" else QuadratureWeights(basis),
        lower_order_final=lower_order_final,
        name=name,
    )
