"""The exact Gaussian-mixture testbed against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NSIGMA, assert_moments_match

import jdiff
from jdiff.testbed import GaussianMixture, frechet_distance, gaussian_stats, random_mixture

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture(scope="module")
def mix(x64):
    return random_mixture(jax.random.key(0), 2, 3, std_range=(0.2, 0.6))


@pytest.mark.parametrize("proc", [jdiff.vp_linear(), jdiff.edm(), jdiff.rectified_flow()], ids=lambda p: p.name)
def test_score_is_gradient_of_log_prob(mix, proc):
    x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    for t in (0.05 * proc.t_max, 0.5 * proc.t_max):
        g = jax.grad(lambda y: jnp.sum(mix.log_prob(y, t, proc)))(x)
        np.testing.assert_allclose(mix.score(x, t, proc), g, rtol=1e-9, atol=1e-12)


def test_log_prob_normalizes(mix):
    proc = jdiff.vp_linear()
    # a Riemann sum of a smooth density on [-6, 6]^2 (spectrally accurate): the error is the
    # mass outside the box, not rounding
    u = np.linspace(-6, 6, 301)
    X, Y = np.meshgrid(u, u)
    pts = jnp.asarray(np.stack([X.ravel(), Y.ravel()], 1))
    for t in (0.1, 0.5):
        dens = np.exp(np.asarray(mix.log_prob(pts, t, proc)))
        assert dens.sum() * (u[1] - u[0]) ** 2 == pytest.approx(1.0, abs=2e-4)


def test_posterior_limits(mix):
    rf = jdiff.rectified_flow()
    x = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    p0 = mix.posterior(x, 0.0, rf)  # sigma = 0: x0 = x, eps = 0
    np.testing.assert_allclose(p0.x0, x, atol=1e-12)
    np.testing.assert_allclose(p0.eps, 0.0, atol=1e-12)
    p1 = mix.posterior(x, 1.0, rf)  # alpha = 0: x0 = data mean, eps = x
    np.testing.assert_allclose(p1.x0, np.broadcast_to(mix.mean(), (5, 2)), atol=1e-12)
    np.testing.assert_allclose(p1.eps, x, atol=1e-12)
    # consistency x = alpha x0 + sigma eps everywhere in between
    for t in (0.2, 0.7):
        p = mix.posterior(x, t, rf)
        np.testing.assert_allclose(rf.alpha(t) * p.x0 + rf.sigma(t) * p.eps, x, atol=1e-12)


def test_posterior_mean_by_monte_carlo():
    # E[x0 | x_t] by importance weighting of many true-data samples.
    mix = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[0.3], [0.5]])
    proc = jdiff.vp_linear()
    t = 0.4
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    x0 = np.asarray(mix.sample(jax.random.key(3), 400_000, jnp.float64))[:, 0]
    for xt in (-0.5, 0.3, 1.2):
        w = np.exp(-0.5 * (xt - a * x0) ** 2 / s**2)
        mc = np.sum(w * x0) / np.sum(w)
        # standard error of the self-normalized importance-sampling estimate (delta method)
        se = np.sqrt(np.sum(w**2 * (x0 - mc) ** 2)) / np.sum(w)
        exact = float(mix.posterior(jnp.array([[xt]]), t, proc).x0[0, 0])
        assert abs(exact - mc) <= NSIGMA * se, (exact, mc, se)


def test_mean_and_cov_match_samples(mix):
    x = mix.sample(jax.random.key(4), 200_000, jnp.float64)
    m, c = gaussian_stats(x)
    assert m.shape == (2,) and c.shape == (2, 2)
    assert_moments_match(x, mix.mean(), mix.cov())


@pytest.mark.parametrize(
    "proc",
    [jdiff.vp_linear(), jdiff.edm(), jdiff.rectified_flow(), jdiff.vp_cosine(t_max=1.0)],
    ids=["vp", "edm", "rf", "cosine_zsnr"],
)
def test_reference_ode_exact_for_one_gaussian(proc):
    # For one Gaussian N(mu, s^2) the probability-flow ODE is the affine map
    # x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) / sqrt(alpha_T^2 s^2 + sigma_T^2) (x_T - alpha_T mu).
    mu, s = np.array([0.7, -1.2]), np.array([0.4, 0.9])
    g = GaussianMixture([1.0], [mu], [s])
    xT = jax.random.normal(jax.random.key(5), (4, 2), jnp.float64) * float(proc.prior_std())
    for t_end in (proc.t_min, proc.t_data):
        out = g.reference_ode(proc, xT, proc.t_max, t_end)
        aT, sT = proc.alpha(proc.t_max), proc.sigma(proc.t_max)
        at, st = proc.alpha(t_end), proc.sigma(t_end)
        want = at * mu + jnp.sqrt(at**2 * s**2 + st**2) / jnp.sqrt(aT**2 * s**2 + sT**2) * (xT - aT * mu)
        # float64; the error is the ODE solver's: local tolerance 1e-10, global error within 100x
        np.testing.assert_allclose(out, want, rtol=1e-8, atol=1e-8)


def test_reference_ode_transports_prior_to_data(mix):
    proc = jdiff.vp_linear()
    xT = jdiff.prior_sample(proc, jax.random.key(6), (2000, 2), jnp.float64)
    x0 = mix.reference_ode(proc, xT, proc.t_max, 0.0, rtol=1e-7, atol=1e-7)
    # 2000 independent samples (the ODE error, ~1e-6, is far below the standard errors)
    assert_moments_match(x0, mix.mean(), mix.cov())
    # and the exact log-likelihood of the ODE samples matches the data log-density on
    # average, within 5 standard errors of the difference of the two sample means
    ll = np.asarray(mix.data_log_prob(x0))
    ll_true = np.asarray(mix.data_log_prob(mix.sample(jax.random.key(7), 20000, jnp.float64)))
    se = np.sqrt(ll.var() / ll.size + ll_true.var() / ll_true.size)
    assert abs(ll.mean() - ll_true.mean()) <= NSIGMA * se, (ll.mean(), ll_true.mean(), se)


def test_metrics_keep_their_old_home():
    import jdiff.metrics

    assert frechet_distance is jdiff.metrics.frechet_distance and gaussian_stats is jdiff.metrics.gaussian_stats


def test_exact_denoiser_parameterizations_agree(mix):
    proc = jdiff.vp_linear()
    x = jax.random.normal(jax.random.key(8), (3, 2), jnp.float64)
    ref = mix.denoiser(proc)(x, 0.3)
    for kind in jdiff.PREDICTIONS:
        p = mix.denoiser(proc, kind)(x, 0.3)
        np.testing.assert_allclose(p.x0, ref.x0, rtol=1e-9)
        np.testing.assert_allclose(p.eps, ref.eps, rtol=1e-9)


def test_bad_mixture():
    with pytest.raises(ValueError, match="shapes"):
        GaussianMixture([1.0], [[0.0, 1.0]], [[1.0]])
    with pytest.raises(ValueError, match="stds positive"):
        GaussianMixture([1.0], [[0.0]], [[0.0]])
