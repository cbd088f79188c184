"""Input checks shared by the metrics: real float64 arrays, finite values, valid Gaussian
statistics, feature matrices."""

from __future__ import annotations

import math

import numpy as np

# A covariance read from a file or passed in may have been stored in float32: its two
# triangles then agree to float32 rounding (~1.2e-7 relative). Anything farther apart than
# this (relative to the largest entry) is not a covariance matrix.
_SYMMETRY_RTOL = 1e-5


def _real_float64(x, what: str) -> np.ndarray:
    """``x`` as a float64 NumPy array; a TypeError for non-numeric or complex data."""
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{what} has {bad} non-finite value(s) (NaN or inf) out of {a.size}")


def _check_stats(mu, sigma, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 ``(mu (d,), sigma (d, d))`` of a Gaussian."""
    mu = _real_float64(mu, f"{what}: mu")
    sigma = _real_float64(sigma, f"{what}: sigma")
    if mu.ndim == 0:  # one dimension given as scalars
        mu = mu.reshape(1)
    if sigma.ndim == 0:
        sigma = sigma.reshape(1, 1)
    if mu.ndim != 1:
        raise ValueError(f"{what}: mu must be a vector of shape (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"{what}: sigma must have shape (d, d) = {(d, d)} to match mu of shape {mu.shape}, got {sigma.shape}"
        )
    _check_finite(mu, f"{what}: mu")
    _check_finite(sigma, f"{what}: sigma")
    scale = float(np.max(np.abs(sigma))) if d else 0.0
    asym = float(np.max(np.abs(sigma - sigma.T))) if d else 0.0
    if asym > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{what}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}, "
            f"max |sigma| = {scale:.3g}): not a covariance matrix"
        )
    if d and float(np.min(np.diag(sigma))) < 0:
        raise ValueError(
            f"{what}: sigma has a negative diagonal entry ({float(np.min(np.diag(sigma))):.3g}): "
            "not a covariance matrix"
        )
    return mu, sigma


def _features(x, what: str, min_rows: int = 1) -> np.ndarray:
    """Validated float64 ``(n, d)`` features (per-sample arrays are flattened)."""
    a = _real_float64(x, what)
    if a.ndim < 2:
        raise ValueError(f"{what} must have shape (n, d), got shape {a.shape}")
    a = a.reshape(a.shape[0], math.prod(a.shape[1:]))
    if a.shape[0] < min_rows:
        raise ValueError(f"{what} needs at least {min_rows} samples, got {a.shape[0]} (shape {a.shape})")
    _check_finite(a, what)
    return a
