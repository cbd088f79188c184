"""jdiff.metrics: Gaussian statistics and the Frechet distance."""

import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.metrics import frechet_distance, gaussian_stats


def test_frechet_distance_closed_forms():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    c = np.array([[2.0, 0.3], [0.3, 1.0]])
    # the eigendecomposition square root is exact to a few float64 ulps of tr(c) ~ 3
    assert frechet_distance([0, 0], c, [0, 0], c) == pytest.approx(0.0, abs=1e-12)
    # commuting covariances: tr((sqrt(c1) - sqrt(c2))^2)
    assert frechet_distance([0, 0], np.diag([4.0, 1.0]), [1, 0], np.diag([1.0, 9.0])) == pytest.approx(6, rel=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance([0, 0], c, [0, 0, 0], np.eye(3))


def test_gaussian_stats_accumulate_in_float64_without_cancellation():
    # float32 samples c +- 1 with c = 1e4 (all exactly representable): mean c, unbiased
    # variance n / (n - 1). A float32 E[x^2] - E[x]^2 would lose everything (eps32 * c^2
    # ~ 12 >> 1); centered float64 sums are exact here up to ~n eps64 relative.
    n, c = 10_000, 1e4
    x = jnp.asarray(np.where(np.arange(n) % 2 == 0, c - 1, c + 1)[:, None] * np.ones((1, 2)), jnp.float32)
    mu, cov = gaussian_stats(x)
    assert mu.dtype == np.float64 and cov.shape == (2, 2)
    np.testing.assert_allclose(mu, [c, c], rtol=n * np.finfo(np.float64).eps)
    np.testing.assert_allclose(cov, np.full((2, 2), n / (n - 1)), rtol=n * np.finfo(np.float64).eps)
    # per-sample arrays are flattened
    assert gaussian_stats(np.zeros((5, 2, 3)))[1].shape == (6, 6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_stats(np.zeros((1, 3)))
