"""Processes: closed forms, inverses, derivatives, SDE consistency, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, NSIGMA

import jdiff

pytestmark = pytest.mark.usefixtures("x64")


def all_processes():
    betas = jdiff.ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "vp_linear": jdiff.vp_linear(),
        "vp_cosine": jdiff.vp_cosine(),
        "vp_discrete": jdiff.vp_discrete(),
        "vp_discrete_zsnr": jdiff.vp_discrete(jdiff.rescale_zero_terminal_snr(betas)),
        "sub_vp": jdiff.sub_vp(),
        "ve": jdiff.ve(),
        "edm": jdiff.edm(),
        "rectified_flow": jdiff.rectified_flow(),
    }


PROCS = all_processes()


def interior(p, n=41):
    # interior times (avoid exact zero-SNR endpoints, where lambda = -inf)
    return (
        jnp.linspace(p.t_min, p.t_max, n)[:-1]
        if p.alpha(jnp.asarray(p.t_max)) == 0
        else jnp.linspace(p.t_min, p.t_max, n)
    )


@pytest.mark.parametrize("name", list(PROCS))
def test_lambda_inverse(name):
    p = PROCS[name]
    t = interior(p)
    lam = p.lambda_(t)
    assert jnp.all(jnp.diff(lam) < 0), "lambda must decrease in t"
    np.testing.assert_allclose(p.t_of_lambda(lam), t, rtol=1e-9, atol=1e-11)
    # and the other way round
    lam2 = jnp.linspace(lam.min(), lam.max(), 17)
    np.testing.assert_allclose(p.lambda_(p.t_of_lambda(lam2)), lam2, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", list(PROCS))
def test_lambda_is_log_alpha_over_sigma(name):
    p = PROCS[name]
    t = interior(p)
    np.testing.assert_allclose(p.lambda_(t), jnp.log(p.alpha(t) / p.sigma(t)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.rho(t), p.sigma(t) / p.alpha(t), rtol=1e-12)


@pytest.mark.parametrize("name", list(PROCS))
def test_derivatives_match_finite_differences(name):
    p = PROCS[name]
    t = interior(p)[1:-1]
    d = 1e-6 * (p.t_max - p.t_min)
    # float64 central differences: rounding EPS64 |f| / d ~ 1e-9 and truncation d^2 |f^(3)| / 6
    # are far below 2e-5, which allows the slope jumps of the discrete tables (piecewise
    # linear in log alpha) when t +- d straddles a table node
    for f, df in [(p.alpha, p.d_alpha), (p.sigma, p.d_sigma), (p.lambda_, p.d_lambda)]:
        fd = (f(t + d) - f(t - d)) / (2 * d)
        np.testing.assert_allclose(df(t), fd, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(PROCS))
def test_forward_sde_reproduces_marginal_variance(name):
    # For dx = f x dt + g dW the variance of x_t | x_0 obeys d(sigma^2)/dt = 2 f sigma^2 + g^2,
    # and the mean alpha obeys d alpha/dt = f alpha.
    p = PROCS[name]
    t = interior(p)[1:-1]
    s2 = lambda u: p.sigma(u) ** 2  # noqa: E731
    ds2 = jax.vmap(jax.grad(s2))(t)
    np.testing.assert_allclose(ds2, 2 * p.drift_coef(t) * s2(t) + p.diffusion2(t), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.d_alpha(t), p.drift_coef(t) * p.alpha(t), rtol=1e-9, atol=1e-12)


def test_closed_forms():
    t = jnp.linspace(0.01, 0.99, 9)
    vp = PROCS["vp_linear"]
    np.testing.assert_allclose(vp.alpha(t), jnp.exp(-0.25 * t**2 * 19.9 - 0.05 * t), rtol=1e-12)
    np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(PROCS["vp_cosine"].alpha(t) ** 2 + PROCS["vp_cosine"].sigma(t) ** 2, 1.0, rtol=1e-12)
    sub = PROCS["sub_vp"]
    np.testing.assert_allclose(sub.sigma(t), 1 - vp.alpha(t) ** 2, rtol=1e-12)
    np.testing.assert_allclose(sub.alpha(t), vp.alpha(t), rtol=1e-12)
    rf = PROCS["rectified_flow"]
    np.testing.assert_allclose(rf.alpha(t), 1 - t)
    np.testing.assert_allclose(rf.sigma(t), t)
    e = PROCS["edm"]
    np.testing.assert_allclose(e.sigma(t * 80), t * 80)
    np.testing.assert_allclose(e.alpha(t), 1.0)
    ve = PROCS["ve"]
    np.testing.assert_allclose(ve.sigma(t), 0.01 * (50 / 0.01) ** t, rtol=1e-12)
    # cosine: alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)
    s = 0.008
    np.testing.assert_allclose(
        PROCS["vp_cosine"].alpha(t), np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2), rtol=1e-12
    )


def test_discrete_process_hits_table():
    betas = jdiff.ddpm_betas("linear")
    ac = np.cumprod(1 - betas)
    p = jdiff.vp_discrete(betas)
    n = np.arange(1000)
    t = (n + 1) / 1000.0
    np.testing.assert_allclose(p.alpha(t) ** 2, ac, rtol=1e-10)
    np.testing.assert_allclose(p.timestep(t), n, atol=1e-9)
    assert p.t_min == pytest.approx(1e-3)
    # alphas_cumprod directly gives the same process
    q = jdiff.vp_discrete(alphas_cumprod=ac)
    np.testing.assert_allclose(q.lambda_(t), p.lambda_(t), rtol=1e-12)


def test_zero_terminal_snr_table():
    betas = jdiff.rescale_zero_terminal_snr(jdiff.ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012))
    ac = np.cumprod(1 - betas)
    assert ac[-1] == pytest.approx(0.0, abs=1e-20)
    p = PROCS["vp_discrete_zsnr"]
    assert p.zero_terminal_snr
    assert float(p.alpha(1.0)) == 0.0 and float(p.sigma(1.0)) == 1.0
    assert float(p.lambda_(1.0)) == -np.inf
    assert float(p.t_of_lambda(-np.inf)) == pytest.approx(1.0)
    t = (np.arange(999) + 1) / 1000.0
    np.testing.assert_allclose(p.alpha(t) ** 2, ac[:-1], rtol=1e-9)
    assert np.isfinite(float(p.d_alpha(1.0))) and np.isfinite(float(p.d_sigma(1.0)))


def test_data_end_and_prior():
    for name, p in PROCS.items():
        if p.t_data is not None:
            assert float(p.sigma(p.t_data)) == 0.0, name
            assert float(p.lambda_(p.t_data)) == np.inf, name
            assert float(p.t_of_lambda(np.inf)) == pytest.approx(p.t_data, abs=1e-12), name
    assert PROCS["ve"].t_data is None
    # sqrt(alpha^2 + sigma^2): a few roundings, in float32 at worst
    assert float(PROCS["vp_linear"].prior_std()) == pytest.approx(1.0, abs=4 * EPS32)
    assert float(PROCS["edm"].prior_std()) == pytest.approx(np.sqrt(1 + 80.0**2), rel=4 * EPS32)
    x = jdiff.prior_sample(PROCS["edm"], jax.random.key(0), (4000, 3))
    # the std of n iid normals has relative standard error 1 / sqrt(2 n) (0.65% for n = 12000)
    n = x.size
    assert float(jnp.std(x)) == pytest.approx(80.0, rel=NSIGMA / np.sqrt(2 * n))


def test_prior_sample_is_batch_independent():
    p = PROCS["vp_linear"]
    key = jax.random.key(7)
    batch = jdiff.prior_sample(p, key, (64, 5))
    # bitwise: integer key derivation and random bits, then elementwise float ops only (no
    # reduction or matmul that XLA could vectorize differently for a batch of 1)
    for i in (0, 17, 63):
        alone = jdiff.prior_sample(p, jdiff.per_sample_keys(key, 1, offset=i), (1, 5))
        np.testing.assert_array_equal(alone[0], batch[i])


def test_check_times_errors():
    p = PROCS["vp_linear"]
    with pytest.raises(ValueError, match="outside the valid range"):
        p.check_times(np.array([1.5]))
    with pytest.raises(ValueError, match="outside the valid range"):
        p.check_times(np.array([1e-4]))
    p.check_times(np.array([0.0]))  # the data time is allowed
    with pytest.raises(ValueError, match="outside the valid range"):
        p.check_times(np.array([0.0]), allow_data=False)


def test_bad_tables():
    with pytest.raises(ValueError, match="strictly decreasing"):
        jdiff.vp_discrete(alphas_cumprod=np.array([0.5, 0.9]))
    with pytest.raises(ValueError, match="betas"):
        jdiff.vp_discrete(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        jdiff.ddpm_betas("quartic")


def test_cosine_inverse_accurate_near_the_data_in_float32():
    with jax.enable_x64(False):
        p = jdiff.vp_cosine(t_max=1.0)
        for rho in (1e-6, 1e-4, 1e-2, 1.0, 100.0):
            t = p.t_of_rho(jnp.float32(rho))
            # ~16 float32 ops each way plus the rounding of t, which near t = 1 is amplified
            # by |d log rho / dt| ~ pi/2 (rho + 1/rho): 32 ulps times (1 + pi/2 rho), 6e-4 at
            # rho = 100 and 4e-6 near the data, where an arccos form would lose every digit
            assert float(p.rho(t)) == pytest.approx(rho, rel=32 * EPS32 * (1 + np.pi / 2 * rho))
        assert float(p.t_of_lambda(jnp.float32(-jnp.inf))) == pytest.approx(1.0, abs=8 * EPS32)
