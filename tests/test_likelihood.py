"""PF-ODE log-likelihood, bits per dimension, the Ito density estimator and SuperDiff,
checked against the exact Gaussian-mixture testbed."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS64

import jdiff
from jdiff import likelihood as L
from jdiff import solvers as S
from jdiff.likelihood._integrators import _node_weights
from jdiff.superdiff import sample_superdiff
from jdiff.testbed import GaussianMixture, random_mixture

pytestmark = pytest.mark.usefixtures("x64")

D = 3
B = 6


@pytest.fixture(scope="module")
def bed(x64):
    mix = random_mixture(jax.random.key(0), D, 3, std_range=(0.2, 0.5))
    proc = jdiff.vp_linear()
    x = mix.sample(jax.random.key(1), B, jnp.float64)
    return mix, proc, mix.denoiser(proc), x


def _exact_prior(mix, proc):
    # the exact marginal at t_max: the test then measures the ODE and divergence alone
    return lambda x_T: mix.log_prob(x_T, proc.t_max, proc)


# ------------------------------------------------------------------ PF-ODE likelihood
@pytest.fixture(scope="module")
def exact_run(bed):
    mix, proc, den, x = bed
    kw = dict(rtol=1e-9, atol=1e-9, time="rho", t_start=0.0, prior_log_prob=_exact_prior(mix, proc))
    return kw, L.log_likelihood(den, x, **kw)


def test_exact_divergence_matches_data_log_prob(bed, exact_run):
    mix, proc, den, x = bed
    _, res = exact_run
    # integrated from t_data (rho = 0): the data density itself. Tsit5 at rtol = atol = 1e-9
    # over ~100 steps leaves a global error of order 1e-8 nats; the bound is 1e-3
    # nats per dimension, asserted here with 100x margin below it
    err = np.abs(np.asarray(res.log_prob - mix.data_log_prob(x))) / D
    assert err.max() < 1e-5, err
    assert res.per_probe.shape == (B, 1)
    np.testing.assert_allclose(res.prior_log_prob + res.delta, res.log_prob, rtol=1e-13)


def _assert_unbiased(per, exact, log_prob):
    K = per.shape[1]
    np.testing.assert_allclose(per.mean(1), np.asarray(log_prob), rtol=1e-12)
    # pooled over samples (independent given x: one probe each): the mean error is within
    # 3 standard errors of the probe noise; the ODE error (< 1e-5) is far below it
    dev = per - exact[:, None]
    se = np.sqrt(np.sum(dev.var(1, ddof=1) / K)) / per.shape[0]
    assert abs(dev.mean()) <= 3 * se, (dev.mean(), se)
    assert dev.std() > 0  # the estimator is random (it is not the exact trace)


def test_hutchinson_rademacher_unbiased(bed):
    mix, proc, den, x = bed
    K = 48
    res = L.log_likelihood(
        den,
        x,
        key=jax.random.key(3),
        divergence="hutchinson",
        num_probes=K,
        rtol=1e-7,
        atol=1e-7,
        time="rho",
        t_start=0.0,
        prior_log_prob=_exact_prior(mix, proc),
    )
    assert res.per_probe.shape == (B, K)
    _assert_unbiased(np.asarray(res.per_probe), np.asarray(mix.data_log_prob(x)), res.log_prob)


def test_fixed_grid_gaussian_hutchinson_unbiased(bed):
    mix, proc, den, x = bed
    # Heun on 100 log-SNR steps in t from t_min (global error O(h^2), measured 6e-4 nats
    # per dimension with the exact divergence, far below the probes' standard error) with
    # Gaussian probes: unbiased for the marginal at t_min
    res = L.log_likelihood(
        den,
        x,
        key=jax.random.key(4),
        divergence="hutchinson",
        probe="gaussian",
        num_probes=48,
        method="heun",
        num_steps=100,
        prior_log_prob=_exact_prior(mix, proc),
    )
    assert int(res.steps) == 100
    _assert_unbiased(np.asarray(res.per_probe), np.asarray(mix.log_prob(x, proc.t_min, proc)), res.log_prob)


def test_node_weights_integrate_cubics_exactly_and_converge_at_fourth_order(x64):
    # the divergence rule of the jdiff-solver path: exact for cubics on any monotone
    # nodes (either direction), O(h^4) for a smooth integrand
    weights = jax.jit(_node_weights)
    s = jnp.asarray([3.0, 2.6, 1.9, 1.5, 0.4, -0.3, -1.0])  # decreasing, uneven, as lambda
    cubic = lambda u: 0.7 * u**3 - 1.3 * u**2 + 0.5 * u - 2.0
    F = lambda u: 0.175 * u**4 - 1.3 / 3 * u**3 + 0.25 * u**2 - 2.0 * u
    # 1e3 EPS64 of the terms' size (|F| ~ 20) bounds the rounding of a few O(1) weights
    tol = 1e3 * EPS64 * 20
    assert abs(float(weights(s) @ cubic(s)) - float(F(s[-1]) - F(s[0]))) < tol
    # two intervals (the short-grid fallback): exact for quadratics
    quad, G = (lambda u: 0.5 * u - 2.0 - 1.3 * u**2), (lambda u: 0.25 * u**2 - 2.0 * u - 1.3 / 3 * u**3)
    assert abs(float(weights(s[:3]) @ quad(s[:3])) - float(G(s[2]) - G(s[0]))) < tol
    # exp on [3, 0] (decreasing nodes): halving h divides the error by ~2^4 (measured
    # 2^3.89 for this pair; a trapezoid gives 2^2, a third-order rule 2^3)
    u1, u2 = np.linspace(3.0, 0.0, 65), np.linspace(3.0, 0.0, 129)
    e1, e2 = (abs(float(weights(jnp.asarray(u)) @ np.exp(u)) + math.expm1(3.0)) for u in (u1, u2))
    assert math.log2(e1 / e2) > 3.6, (e1, e2)


@pytest.fixture(scope="module")
def solver_runs(bed):
    mix, proc, den, x = bed
    # UniPC-3 (one compiled program per grid length), exact divergence, exact p_T
    prior = _exact_prior(mix, proc)
    return {n: L.log_likelihood(den, x, method=S.unipc(3), num_steps=n, prior_log_prob=prior) for n in (32, 128)}


def test_jdiff_solver_on_a_grid_matches_log_prob_and_converges(bed, solver_runs):
    mix, proc, den, x = bed
    exact = np.asarray(jax.jit(mix.log_prob, static_argnums=2)(x, proc.t_min, proc))  # the path starts at t_min
    err = {n: np.abs(np.asarray(r.log_prob) - exact).max() / D for n, r in solver_runs.items()}
    res = solver_runs[128]
    assert int(res.steps) == 128 and res.per_probe.shape == (B, 1)
    np.testing.assert_allclose(res.prior_log_prob + res.delta, res.log_prob, rtol=1e-13)
    # the bound, 1e-3 nats per dimension, at 128 log-SNR steps (measured 4e-5)
    assert err[128] < 1e-3, err
    # UniPC-3 is third order: 4x the steps divides the error by ~64 (measured 180 on this
    # pre-asymptotic pair); asserting 16 (second order) still fails a first-order path or
    # a divergence rule whose error does not fall
    assert err[128] < err[32] / 16, err


def test_jdiff_solver_errors(bed):
    mix, proc, den, x = bed
    for bad in (S.ddpm(), S.ddim(eta=1.0), S.sde_dpm_solver_pp(2), S.heun()):
        with pytest.raises(ValueError, match="cannot integrate the PF-ODE from data to noise"):
            L.log_likelihood(den, x, method=bad, num_steps=8)
    with pytest.raises(ValueError, match="is not a jdiff solver value: call it"):
        L.log_likelihood(den, x, method=S.unipc, num_steps=8)
    with pytest.raises(ValueError, match="runs on a grid"):
        L.log_likelihood(den, x, method=S.unipc(3))
    with pytest.raises(ValueError, match="leave time='t'"):
        L.log_likelihood(den, x, method=S.unipc(3), num_steps=8, time="rho")
    with pytest.raises(ValueError, match="cannot start at t_data"):
        L.log_likelihood(den, x, method=S.unipc(3), num_steps=8, t_start=0.0)
    to_data = jdiff.time_grid(proc, 8, final="data", dtype=jnp.float64)
    with pytest.raises(ValueError, match="finite log-SNR at both grid ends"):
        L.log_likelihood(den, x, method=S.dpm_solver_pp(2), grid=to_data)


def test_bits_per_dim_offset_and_dequantization(bed, exact_run):
    mix, proc, den, x = bed
    kw, _ = exact_run
    deq = L.Dequantization(17)  # the digits: v / 8 - 1, v = 0..16
    assert deq.delta == 1 / 8 and deq.bits_offset == 3.0
    assert L.Dequantization(256).bits_offset == pytest.approx(math.log2(127.5))
    assert L.Dequantization(256, -1 + 1 / 256, 1 - 1 / 256).bits_offset == pytest.approx(7.0)
    # quantize the data to the digits' levels and dequantize: y stays in its bin
    xq = jnp.clip(jnp.round((x + 1) * 8) / 8 - 1, -1, 1)
    res = L.bits_per_dim(den, xq, jax.random.key(4), dequantization=deq, **kw)
    off = np.asarray(res.y - xq)
    assert off.min() >= -1 / 16 and off.max() < 1 / 16 and np.abs(off).max() > 1e-3
    # bpd = -log p(y) / (D ln 2) + log2(8), with log p(y) the exact data density here
    lp = np.asarray(mix.data_log_prob(res.y))
    np.testing.assert_allclose(np.asarray(res.bpd), -lp / (D * math.log(2)) + 3.0, atol=1e-5 / math.log(2))


def test_clear_errors(bed):
    mix, proc, den, x = bed
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1, got 0"):
        L.log_likelihood(den, x, key=jax.random.key(0), divergence="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="pass key"):
        L.log_likelihood(den, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        L.log_likelihood(den, x, divergence="trace")
    with pytest.raises(ValueError, match="unknown probe"):
        L.log_likelihood(den, x, key=jax.random.key(0), divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="cannot start at t_data"):
        L.log_likelihood(den, x, t_start=0.0)
    with pytest.raises(ValueError, match="t_start"):
        L.log_likelihood(den, x, t_start=2.0)
    with pytest.raises(ValueError, match="rtol"):
        L.log_likelihood(den, x, rtol=0.0)
    with pytest.raises(ValueError, match="fixed steps"):
        L.log_likelihood(den, x, num_steps=10)  # tsit5 is adaptive
    with pytest.raises(ValueError, match="non-finite"):
        L.log_likelihood(den, x.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="alpha > 0"):
        L.log_likelihood(mix.denoiser(jdiff.rectified_flow(), "flow"), x, time="rho", t_end=1.0)
    deq = L.Dequantization(17)
    with pytest.raises(ValueError, match=r"outside the dequantization range \[-1.0, 1.0\]"):
        L.bits_per_dim(den, jnp.full((2, D), 1.5), jax.random.key(0), dequantization=deq)
    with pytest.raises(ValueError, match="not quantized to the declared 17 levels"):
        L.bits_per_dim(den, jnp.full((2, D), 0.01), jax.random.key(0), dequantization=deq)
    with pytest.raises(ValueError, match="needs key"):
        L.bits_per_dim(den, jnp.zeros((2, D)), dequantization=deq)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        L.Dequantization(1)
    with pytest.raises(ValueError, match="low < high"):
        L.Dequantization(4, 1.0, -1.0)


# ------------------------------------------------------- Ito density and SuperDiff
_PROC = jdiff.vp_linear()
_MIX_A = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [[0.3, 0.3], [0.3, 0.3]])
_MIX_B = GaussianMixture([0.5, 0.5], [[2.0, 0.0], [0.0, 2.0]], [[0.3, 0.3], [0.3, 0.3]])


def _mixture_eps(params, x, t, cond):
    # the exact eps of a mixture given as arrays: every mixture shares this function, so
    # denoisers of different mixtures differ only in their parameters (one compilation)
    m = object.__new__(GaussianMixture)
    for name, v in zip(("weights", "means", "stds"), params):
        object.__setattr__(m, name, v)
    return m.posterior(x, t, _PROC).eps


def _param_denoiser(mix):
    params = tuple(jnp.asarray(v) for v in (mix.weights, mix.means, mix.stds))
    return jdiff.Denoiser(apply_fn=_mixture_eps, params=params, process=_PROC, prediction="eps")


@pytest.fixture(scope="module")
def two_beds(x64):
    proc = _PROC
    a, b = _MIX_A, _MIX_B
    # one grid and batch for the Ito and SuperDiff tests: DDPM compiles once for all
    grid = jdiff.time_grid(proc, 200, dtype=jnp.float64)
    x_T = jdiff.prior_sample(proc, jax.random.key(2), (512, 2), jnp.float64)
    return proc, _param_denoiser(a), _param_denoiser(b), grid, x_T


def test_ito_density_along_ddpm_trajectory(two_beds):
    """The Ito estimate of log p_t(x_t) along DDPM trajectories against the exact marginal.

    Tolerance, derived: the estimator is the Euler scheme of ``d log p`` (Ito's lemma), so
    per step it misses ``1/2 (dx^T H dx - c^2 tr H)`` (``H`` the Hessian of ``log p_t``,
    ``c^2`` the step's noise variance) plus an O(dtau^2) drift term. The first is
    zero-mean with variance ``c^4 |H|_F^2 / 2`` (``Var(z^T A z) = 2 |A|_F^2`` for
    ``z ~ N(0, I)``), so after n steps the error has standard deviation ``sqrt(V_n)``,
    ``V_n = sum_m c_m^4 |H_m|_F^2 / 2``, computed here from the exact Hessians, and a
    bias O(max dtau) (measured 0.3 sqrt(V) at 200 steps, shrinking as 1/N). At every
    step the root-mean-square of ``error / sqrt(V_n)`` over 512 trajectories must be
    below 1.5 (measured 1.11): 1 from the leading term, the rest for the bias and the sampling error of
    an RMS over 512 trajectories (relative standard error ~ 1/sqrt(2 * 512) = 3%).
    A wrong estimator (a missing term or sign) is off by nats per unit time: tens of sigma.
    """
    proc, den, _, grid, x_T = two_beds
    mix = _MIX_A
    _, info = jdiff.sample(S.ddpm(), den, x_T, grid, key=jax.random.key(5), return_info=True, trajectory=True)

    @jax.jit
    def analyse(xs, epss, grid):
        est = L.ito_log_density(proc, xs, epss, grid, log_prob_T=mix.log_prob(xs[0], grid[0], proc))
        exact = jax.vmap(lambda xx, t: mix.log_prob(xx, t, proc))(xs, grid)
        hess = jax.hessian(lambda v, t: mix.log_prob(v[None], t, proc)[0])
        H = jax.vmap(lambda xx, t: jax.vmap(lambda v: hess(v, t))(xx))(xs[:-1], grid[:-1])
        lam = proc.lambda_(grid)
        c2 = proc.sigma(grid[1:]) ** 2 * -jnp.expm1(-2 * (lam[1:] - lam[:-1]))  # DDPM's noise variance
        V = jnp.cumsum(0.5 * c2[:, None] ** 2 * jnp.sum(H**2, (2, 3)), axis=0)
        return est, exact - est, V

    est, err, V = (np.asarray(a) for a in analyse(info.xs, info.epss, grid))
    assert np.abs(err[0]).max() < 1e-13  # the same starting value
    z_rms = np.sqrt(np.mean(err[1:] ** 2 / V, axis=1))
    assert z_rms.max() < 1.5, z_rms.max()
    # not vacuous: leaving out the increments (log p_t(x_t) = log p_T(x_T)) fails it
    # (measured 4.7)
    triv = np.sqrt(np.mean((err[1:] + (est[1:] - est[:1])) ** 2 / V, axis=1))
    assert triv.max() > 3


def test_ito_density_errors(x64):
    proc = jdiff.vp_linear()
    xs = jnp.zeros((5, 2, 2))
    grid = jdiff.time_grid(proc, 4, dtype=jnp.float64)
    with pytest.raises(ValueError, match="epss has shape"):
        L.ito_log_density(proc, xs, jnp.zeros((5, 2, 2)), grid)
    with pytest.raises(ValueError, match="does not fit xs"):
        L.ito_log_density(proc, xs, jnp.zeros((4, 2, 2)), grid[:-1])
    with pytest.raises(ValueError, match="end the grid at t_min"):
        L.ito_log_density(proc, xs, jnp.zeros((4, 2, 2)), grid.at[-1].set(0.0))


# -------------------------------------------------------------------------- SuperDiff
def test_superdiff_of_identical_models_is_the_sampler(two_beds):
    proc, den, _, grid, x_T = two_beds
    key = jax.random.key(7)
    ref, _ = jdiff.sample(S.ddpm(), den, x_T, grid, key=key, return_info=True, trajectory=True)  # as the Ito test
    # softmax of equal log-densities is exactly 1/2, and the AND system is degenerate
    # (uniform weights): the composite step is the model's own step up to rounding in
    # two separately compiled programs (a few ulp per step over 60 steps)
    for mode in ("or", "and"):
        x, info = sample_superdiff([den, den], x_T, grid, key=key, mode=mode, return_info=True)
        np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(info.kappa), 0.5, atol=1e-12)
        assert int(info.nfe) == 2 * 200


def test_superdiff_or_samples_the_mixture_and_keeps_and_equal(two_beds):
    proc, da, db, grid, x_T = two_beds
    x = np.asarray(sample_superdiff([da, db], x_T, grid, key=jax.random.key(7), mode="or"))
    # OR = 1/2 a + 1/2 b: modes (-2, 0), (2, 0), (0, 2) with mass 1/4, 1/2, 1/4
    n = x.shape[0]
    for c, p in (((-2.0, 0.0), 0.25), ((2.0, 0.0), 0.5), ((0.0, 2.0), 0.25)):
        frac = np.mean(np.linalg.norm(x - np.asarray(c), axis=1) < 1.2)  # 4 std: all of a mode
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n), (c, frac, p)
    x, info = sample_superdiff([da, db], x_T, grid, key=jax.random.key(7), mode="and", return_info=True)
    lq = np.asarray(info.log_q)
    # the AND weights keep the two estimated log-densities equal at every step, up to
    # rounding amplified by the weights: where the models nearly agree |kappa| reaches
    # ~3e7, and 3e7 * EPS64 * (|log q| ~ 10) ~ 6e-8 per step (measured 2.5e-7 at most)
    np.testing.assert_allclose(lq[:, 0], lq[:, 1], rtol=0, atol=2e-5)
    assert np.abs(lq[-1, 0] - lq[0, 0]).mean() > 1.0  # log q moved: equality is not trivial
    # most AND samples sit at the mode the two models share
    assert np.mean(np.linalg.norm(np.asarray(x) - np.asarray([2.0, 0.0]), axis=1) < 1.2) > 0.5


def test_superdiff_errors(two_beds):
    proc, den, _, grid, x_T = two_beds
    key = jax.random.key(0)
    other = den.replace(process=jdiff.vp_cosine())
    with pytest.raises(ValueError, match=r"denoisers\[1\] has process"):
        sample_superdiff([den, other], x_T, grid, key=key)
    wide = _param_denoiser(GaussianMixture([1.0], [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]))  # 3-D data
    with pytest.raises(ValueError, match=r"denoisers\[1\]"):
        sample_superdiff([den, wide], x_T, grid, key=key)
    with pytest.raises(ValueError, match="two or more"):
        sample_superdiff([den], x_T, grid, key=key)
    with pytest.raises(ValueError, match="unknown mode"):
        sample_superdiff([den, den], x_T, grid, key=key, mode="xor")
    with pytest.raises(ValueError, match="reverse-SDE solver"):
        sample_superdiff([den, den], x_T, grid, key=key, solver=S.ddim())
    with pytest.raises(ValueError, match="one conditioning per denoiser"):
        sample_superdiff([den, den], x_T, grid, key=key, conds=[None])
    with pytest.raises(ValueError, match="end the grid at t_min"):
        sample_superdiff([den, den], x_T, grid.at[-1].set(0.0), key=key)
