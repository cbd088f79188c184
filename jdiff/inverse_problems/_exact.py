"""The exact posterior of a Gaussian-mixture prior under a linear Gaussian measurement
(the reference the posterior samplers are tested against)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.inverse_problems._operators import _check_number, _check_operator, _flat

__all__ = ["mixture_posterior", "sample_mixture_posterior"]


def mixture_posterior(mixture, operator, y, sigma_y):
    """The exact posterior of a Gaussian-mixture prior under ``y = A x + sigma_y n``.

    For ``p(x) = sum_k pi_k N(mu_k, D_k)`` (``D_k`` diagonal) and linear ``A``, Bayes' rule
    component by component gives a mixture of full-covariance Gaussians (the Kalman update):
    with ``S_k = A D_k A^T + sigma_y^2 I`` and ``G_k = D_k A^T S_k^{-1}``,

        mean_k = mu_k + G_k (y - A mu_k),   cov_k = D_k - G_k A D_k,
        w_k  ~  pi_k N(y; A mu_k, S_k).

    This form holds for ``sigma_y = 0`` as long as ``A D_k A^T`` is invertible.

    Args:
      mixture: a :class:`jdiff.testbed.GaussianMixture` with ``d = prod(operator.x_shape)``.
      operator: a linear :class:`Operator`; its matrix is built column by column from ``A``.
      y: one measurement of shape ``operator.y_shape`` (no batch axis).
      sigma_y: its noise std (>= 0).

    Returns:
      ``(weights (K,), means (K, d), covs (K, d, d))`` NumPy float64.

    Raises:
      ValueError: dimension mismatch, bad ``sigma_y``; TypeError: nonlinear operator.
    """
    _check_operator(operator, "mixture_posterior", linear=True)
    sy = float(_check_number("mixture_posterior: sigma_y", float(np.asarray(sigma_y)), lo=0))
    d = mixture.dim
    if operator.n != d:
        raise ValueError(f"the mixture has dimension {d}, the operator acts on {operator.x_shape}")
    with jax.ensure_compile_time_eval():
        eye = jnp.eye(d, dtype=jnp.float32).reshape((d,) + tuple(operator.x_shape))
        A = np.asarray(_flat(operator.A(eye)), np.float64).T  # (m, d)
    yv = np.asarray(y, np.float64).reshape(-1)
    if yv.shape[0] != A.shape[0]:
        raise ValueError(f"y of shape {np.shape(y)} does not fit the operator's y_shape {operator.y_shape}")
    m = A.shape[0]
    logw, means, covs = [], [], []
    for pi, mu, sd in zip(mixture.weights, mixture.means, mixture.stds):
        D = np.diag(sd**2)
        S = A @ D @ A.T + sy**2 * np.eye(m)
        G = np.linalg.solve(S, A @ D).T
        r = yv - A @ mu
        means.append(mu + G @ r)
        c = D - G @ A @ D
        covs.append(0.5 * (c + c.T))
        _, logdet = np.linalg.slogdet(S)
        logw.append(np.log(pi) - 0.5 * (r @ np.linalg.solve(S, r) + logdet + m * np.log(2 * np.pi)))
    logw = np.asarray(logw)
    w = np.exp(logw - logw.max())
    return w / w.sum(), np.asarray(means), np.asarray(covs)


def sample_mixture_posterior(key, posterior, n: int):
    """``n`` exact samples of ``(weights, means, covs)`` from :func:`mixture_posterior`
    (NumPy float64; a component by its weight, then ``mean + L z`` with ``cov = L L^T``
    from an eigendecomposition, so singular covariances work)."""
    w, means, covs = posterior
    kc, kz = jax.random.split(key)
    comp = np.asarray(jax.random.choice(kc, len(w), (n,), p=jnp.asarray(w, jnp.float32)))
    z = np.asarray(jax.random.normal(kz, (n, means.shape[1])), np.float64)
    ev, evec = np.linalg.eigh(covs)
    L = evec * np.sqrt(np.maximum(ev, 0))[:, None, :]
    return means[comp] + np.einsum("nij,nj->ni", L[comp], z)
