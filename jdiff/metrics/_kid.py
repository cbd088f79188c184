"""The kernel inception distance (Binkowski et al., ICLR 2018), unbiased, in subsets."""

from __future__ import annotations

import jax
import numpy as np

from jdiff.metrics._validation import _features

__all__ = ["kid"]


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    if isinstance(seed, jax.Array):
        data = jax.random.key_data(seed) if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) else seed
        return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
    raise TypeError(f"seed must be an int, a numpy Generator or a JAX PRNG key, got {seed!r}")


def _poly_kernel_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Sums of the cubic polynomial kernel: off-diagonal of K_xx and K_yy, all of K_xy."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        float(kxx.sum() - np.trace(kxx)),
        float(kyy.sum() - np.trace(kyy)),
        float(kxy.sum()),
    )


def kid(feats1, feats2, *, subsets: int = 100, subset_size: int = 1000, seed=0) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2 with a cubic polynomial kernel, in subsets.

    Binkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018. With the
    kernel ``k(x, y) = (x . y / d + 1)^3`` and ``m`` samples drawn without replacement from
    each set, the unbiased estimate is

        MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / m^2,

    averaged over ``subsets`` random subsets (as torch-fidelity and clean-fid do). Unbiased,
    it can be slightly negative when the two distributions are equal. Float64 throughout.

    Args:
      feats1, feats2: features ``(n1, d)`` and ``(n2, d)``, NumPy or JAX.
      subsets: number of random subsets (>= 1).
      subset_size: ``m``, capped at ``min(n1, n2)``; at least 2 after capping.
      seed: an int, a ``numpy.random.Generator`` or a JAX PRNG key: the subsets drawn.

    Returns:
      ``(mean, std)`` of the subset estimates (``std`` with ``ddof=0``, as torch-fidelity).

    Raises:
      ValueError: shapes that are not ``(n, d)`` with the same ``d``, fewer than 2 samples,
        non-finite values, ``subsets < 1`` or ``subset_size < 2``.
    """
    x = _features(feats1, "kid: feats1", 2)
    y = _features(feats2, "kid: feats2", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature dimensions differ: feats1 {x.shape}, feats2 {y.shape}")
    if isinstance(subsets, bool) or not isinstance(subsets, int | np.integer) or subsets < 1:
        raise ValueError(f"kid: subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int | np.integer) or subset_size < 2:
        raise ValueError(f"kid: subset_size must be an int >= 2, got {subset_size!r}")
    rng = _rng(seed)
    m = int(min(subset_size, x.shape[0], y.shape[0]))
    est = np.empty(int(subsets))
    for s in range(int(subsets)):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        sxx, syy, sxy = _poly_kernel_sums(xs, ys)
        est[s] = (sxx + syy) / (m * (m - 1)) - 2.0 * sxy / (m * m)
    return float(est.mean()), float(est.std())
