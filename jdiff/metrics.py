"""Sample-quality metrics on Gaussian statistics.

- :func:`gaussian_stats`: the mean and covariance of a set of samples (or features).
- :func:`frechet_distance`: the Frechet distance between two Gaussians, which is FID
  (Heusel et al., NeurIPS 2017) when the statistics are those of Inception features.

Precision: both functions accumulate in float64 on the host with NumPy, whatever the
input dtype and whether or not ``jax_enable_x64`` is set: the covariance is computed
from centered samples (two passes, no ``E[x^2] - E[x]^2`` cancellation), and the matrix
square roots through symmetric eigendecompositions. A metric is computed once per
evaluation, so the host copy is not a cost that matters.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gaussian_stats", "frechet_distance"]


def gaussian_stats(x):
    """Mean ``(d,)`` and covariance ``(d, d)`` (NumPy float64, unbiased ``n - 1``
    normalization) of samples ``x`` of shape ``(n, ...)``, flattened per sample."""
    x = np.asarray(x, np.float64)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples along the first axis, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:
    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2})``
    (Dowson & Landau 1982; the FID of Heusel et al. 2017 on Inception features).
    Symmetric square roots through eigendecompositions, in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance: shapes do not match: means {mu1.shape}, {mu2.shape}; covariances {c1.shape}, {c2.shape}"
        )

    def sqrtm_psd(c):
        w, v = np.linalg.eigh(0.5 * (c + c.T))
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrtm_psd(c1)
    mid = sqrtm_psd(r1 @ c2 @ r1)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(mid))
    return max(d, 0.0)
