"""Stochastic solvers: per-sample keys (batch independence) and correct distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, assert_moments_match, stochastic_zoo

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

ZOO = stochastic_zoo()


@pytest.fixture(scope="module")
def mix():
    return random_mixture(jax.random.key(0), 2, 3, std_range=(0.3, 0.6))


@pytest.mark.parametrize("name", list(ZOO))
def test_sample_does_not_depend_on_its_batch(mix, name):
    solver = ZOO[name]
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)
    key = jax.random.key(11)
    grid = jdiff.time_grid(proc, 8)
    x_T = jdiff.prior_sample(proc, key, (64, 2))
    f = jax.jit(lambda x, k: jdiff.sample(solver, den, x, grid, key=k))
    batch = f(x_T, key)
    # XLA may vectorize a batch of 64 differently from a batch of 1 (the mixture's softmax
    # and sums, FMA contraction), so a row is not bitwise its lone twin: allow float32
    # rounding of 8 steps of ~32 roundings each (one denoiser call plus the update) at the
    # scale of the samples, about 1e-4. A noise stream that depended on the batch would move
    # a sample by the size of the injected noise, O(0.1).
    tol = 32 * (grid.shape[0] - 1) * EPS32 * max(1.0, float(jnp.max(jnp.abs(batch))))
    for i in (0, 5, 63):
        k_i = jdiff.per_sample_keys(key, 1, offset=i)
        x_i = jdiff.prior_sample(proc, k_i, (1, 2))
        # the starting noise is bitwise the same: integer key derivation and random bits,
        # then elementwise float ops (no reduction or matmul), identical per element
        np.testing.assert_array_equal(x_i[0], x_T[i])
        alone = f(x_i, k_i)
        np.testing.assert_allclose(alone[0], batch[i], rtol=0, atol=tol)
    # a different key gives a different sample
    other = f(x_T, jax.random.key(12))
    assert float(jnp.max(jnp.abs(other - batch))) > 1e-3


@pytest.mark.parametrize("name", ["ddpm", "sde_dpm_solver++(2M)", "euler_maruyama", "ddim(eta=0.5)"])
def test_stochastic_solvers_sample_the_data_distribution(mix, name):
    solver = ZOO[name]
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)
    key = jax.random.key(5)
    n = 4000
    x_T = jdiff.prior_sample(proc, key, (n, 2))
    steps = 400 if name == "euler_maruyama" else 100
    x = jax.jit(lambda x, k: jdiff.sample(solver, den, x, jdiff.time_grid(proc, steps), key=k))(x_T, jax.random.key(6))
    # n independent samples (per-sample keys): mean and covariance within 5 standard errors
    # of the data's (se ~ 0.01 for n = 4000), which sees a noise scale off by ~5%
    assert_moments_match(x, mix.mean(), mix.cov())


def test_stochastic_solver_needs_a_key(mix):
    proc = jdiff.vp_linear()
    with pytest.raises(ValueError, match="stochastic: pass key"):
        jdiff.sample(S.ddpm(), mix.denoiser(proc), jnp.zeros((2, 2)), jdiff.time_grid(proc, 4))


def test_per_sample_keys_argument(mix):
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 5)
    key = jax.random.key(1)
    x_T = jnp.zeros((3, 2))
    keys = jdiff.per_sample_keys(key, 3)
    # bitwise: the same program on the same batch shape, given the same keys two ways
    np.testing.assert_array_equal(
        jdiff.sample(S.ddpm(), den, x_T, grid, key=keys), jdiff.sample(S.ddpm(), den, x_T, grid, key=key)
    )
    with pytest.raises(ValueError, match="got 2 per-sample keys for a batch of 3"):
        jdiff.sample(S.ddpm(), den, x_T, grid, key=keys[:2])
