"""Bad input raises a clear error before anything runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

MIX = random_mixture(jax.random.key(0), 2, 2)
PROC = jdiff.vp_linear()
DEN = MIX.denoiser(PROC)
X = jnp.zeros((3, 2))


def test_non_monotone_grid():
    with pytest.raises(ValueError, match="strictly decreasing"):
        jdiff.sample(S.ddim(), DEN, X, jnp.array([1.0, 0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        jdiff.sample(S.ddim(), DEN, X, jnp.array([0.1, 0.5, 1.0]))


def test_times_outside_range():
    with pytest.raises(ValueError, match=r"outside the valid range \[0.001, 1.0\]"):
        jdiff.sample(S.ddim(), DEN, X, jnp.array([1.2, 0.5, 0.1]))
    with pytest.raises(ValueError, match="outside the valid range"):
        jdiff.sample(S.ddim(), DEN, X, jnp.array([1.0, 0.5, 1e-4]))
    with pytest.raises(ValueError, match="non-finite"):
        jdiff.sample(S.ddim(), DEN, X, jnp.array([1.0, jnp.nan, 0.1]))
    # t = 0 is allowed only as the final point of a process that reaches sigma = 0
    jdiff.sample(S.ddim(), DEN, X, jnp.array([1.0, 0.5, 0.0]))
    ve = jdiff.ve()
    with pytest.raises(ValueError, match="never reaches sigma = 0"):
        jdiff.time_grid(ve, 5, final="data")


def test_orders_the_solvers_lack():
    for make, bad in [
        (S.dpm_solver, 4),
        (S.dpm_solver_pp, 0),
        (S.unipc, 5),
        (S.deis, 4),
        (S.ipndm, 5),
        (S.sde_dpm_solver_pp, 3),
    ]:
        with pytest.raises(ValueError, match="order"):
            make(bad)
    with pytest.raises(ValueError, match="eta must be in"):
        S.ddim(eta=1.5)
    with pytest.raises(ValueError, match="unknown solver_type"):
        S.dpm_solver_pp(2, solver_type="rk4")
    with pytest.raises(ValueError, match="unknown UniPC variant"):
        S.unipc(2, variant="bh3")
    with pytest.raises(ValueError, match="unknown method"):
        S.dpm_solver(2, method="both")
    with pytest.raises(ValueError, match="unknown DEIS basis"):
        S.deis(2, basis="sigma")
    with pytest.raises(ValueError, match="time must be"):
        S.heun(time="sigma")


def test_too_few_steps_for_the_order():
    with pytest.raises(ValueError, match=r"ipndm4 needs at least 4 steps .* the grid has 2"):
        jdiff.sample(S.ipndm(4), DEN, X, jdiff.time_grid(PROC, 2))
    with pytest.raises(ValueError, match="cannot spend exactly 2 model calls in 3 steps"):
        S.dpm_solver(3).init(X, jdiff.time_grid(PROC, 3), PROC, nfe=2)


def test_mismatched_shapes():
    bad = jdiff.denoiser(lambda x, t, c: x[:, :1], PROC, "eps")
    with pytest.raises(ValueError, match="returned shape"):
        jdiff.sample(S.ddim(), bad, X, jdiff.time_grid(PROC, 3))
    with pytest.raises(ValueError, match="features per sample"):
        jdiff.sample(S.ddim(), DEN, jnp.zeros((3, 5)), jdiff.time_grid(PROC, 3))
    with pytest.raises(ValueError, match="leading batch axis"):
        jdiff.sample(S.ddim(), DEN, jnp.zeros(()), jdiff.time_grid(PROC, 3))
    with pytest.raises(ValueError, match="1-D"):
        jdiff.sample(S.ddim(), DEN, X, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 2 points"):
        jdiff.sample(S.ddim(), DEN, X, jnp.ones((1,)))
    with pytest.raises(TypeError, match="floating point"):
        jdiff.sample(S.ddim(), DEN, jnp.zeros((3, 2), jnp.int32), jdiff.time_grid(PROC, 3))
    with pytest.raises(ValueError, match="per-sample keys"):
        jdiff.sample(S.ddpm(), DEN, X, jdiff.time_grid(PROC, 3), key=jdiff.per_sample_keys(jax.random.key(0), 4))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown parameterization"):
        jdiff.denoiser(lambda x, t, c: x, PROC, "noise")
    with pytest.raises(ValueError, match="unknown grid kind"):
        jdiff.time_grid(PROC, 4, kind="cosine")
    with pytest.raises(ValueError, match="final must be"):
        jdiff.time_grid(PROC, 4, final="zero")
    with pytest.raises(TypeError, match="jdiff Solver"):
        jdiff.sample("ddim", DEN, X, jdiff.time_grid(PROC, 3))
    with pytest.raises(TypeError, match="jdiff Denoiser"):
        jdiff.sample(S.ddim(), lambda x, t, c: x, X, jdiff.time_grid(PROC, 3))
    with pytest.raises(ValueError, match="give a time grid or a target nfe"):
        jdiff.sample(S.ddim(), DEN, X)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        jdiff.time_grid(jdiff.rectified_flow(), 5, kind="logsnr")


def test_errors_come_before_any_model_call():
    calls = []

    def apply(x, t, c):
        calls.append(1)
        return x

    den = jdiff.denoiser(apply, PROC, "eps")
    for grid in [np.array([1.0, 0.5, 0.7]), np.array([2.0, 0.5])]:
        with pytest.raises(ValueError):
            jdiff.sample(S.ddim(), den, X, grid)
    assert not calls


# ----------------------------------------------------------------- checks under jit
# (bad input, what the message must say); each is checked eagerly (ValueError before any
# model call) and inside the caller's own jit (a runtime error with the same words).
GOOD_GRID = np.array([1.0, 0.5, 0.1])
BAD_VALUES = {
    "increasing grid": (np.array([0.1, 0.5, 1.0]), None, "strictly decreasing"),
    "non-monotone grid": (np.array([1.0, 0.3, 0.6]), None, "strictly decreasing"),
    "grid above t_max": (np.array([1.2, 0.5, 0.1]), None, r"outside the valid range \[0.001, 1.0\]"),
    "grid below t_min": (np.array([1.0, 0.5, 1e-4]), None, "outside the valid range"),
    "NaN in grid": (np.array([1.0, np.nan, 0.1]), None, "non-finite"),
    "inf in grid": (np.array([np.inf, 0.5, 0.1]), None, "non-finite"),
    "NaN in x_T": (GOOD_GRID, (0, 1, np.nan), r"x_T .* non-finite values \(NaN or inf\)"),
    "inf in x_T": (GOOD_GRID, (2, 0, -np.inf), r"x_T .* non-finite values \(NaN or inf\)"),
}


def _bad_input(case):
    grid, x_bad, msg = BAD_VALUES[case]
    x = np.zeros((3, 2), np.float32)
    if x_bad is not None:
        x[x_bad[0], x_bad[1]] = x_bad[2]
    return jnp.asarray(x), jnp.asarray(grid, jnp.float32), msg


@pytest.fixture(scope="module")
def counted():
    """A denoiser that records its calls, and the user's own jit of sample (one compile
    for every case: all share the shapes)."""
    calls = []

    def apply(x, t, c):
        calls.append(1)
        return x

    den = jdiff.denoiser(apply, PROC, "eps")
    return calls, den, jax.jit(lambda x_T, grid: jdiff.sample(S.ddim(), den, x_T, grid))


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_raise_eagerly_before_any_model_call(counted, case):
    calls, den, _ = counted
    x, grid, msg = _bad_input(case)
    calls.clear()
    with pytest.raises(ValueError, match=msg):
        jdiff.sample(S.ddim(), den, x, grid)
    assert not calls


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_raise_under_the_users_jit(counted, case):
    _, _, run = counted
    x, grid, msg = _bad_input(case)
    with pytest.raises(jax.errors.JaxRuntimeError, match=msg):
        jax.block_until_ready(run(x, grid))


def test_checks_under_jit_pass_good_input(counted):
    _, den, run = counted
    x = jax.random.normal(jax.random.key(1), (3, 2))
    for grid in (GOOD_GRID, np.array([1.0, 0.5, 0.0])):  # t_data = 0 allowed as the last point
        g = jnp.asarray(grid, jnp.float32)
        # the same computation with and without the runtime checks: bitwise equal
        np.testing.assert_array_equal(run(x, g), jdiff.sample(S.ddim(), den, x, g))


def test_conditioning_batch_must_match_x_T():
    den = jdiff.denoiser(lambda x, t, c: x * c["w"][:, None], PROC, "eps")
    grid = jdiff.time_grid(PROC, 3)
    jdiff.sample(S.ddim(), den, X, grid, cond={"w": jnp.ones(3), "scale": 2.0})  # matching batch, a scalar leaf
    with pytest.raises(ValueError, match=r"^cond\['w'\] has shape \(4,\), .* batch 3 of x_T of shape \(3, 2\)"):
        jdiff.sample(S.ddim(), den, X, grid, cond={"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"cond\['w'\] has shape \(4,\)"):
        jax.jit(lambda c: jdiff.sample(S.ddim(), den, X, grid, cond=c))({"w": jnp.ones(4)})


def test_conditioning_batch_through_guidance_names_the_users_batch():
    den = jdiff.denoiser(lambda x, t, c: x * c[:, None], PROC, "eps")
    guided = jdiff.wrappers.guidance(den, 2.0, 0.0)
    grid = jdiff.time_grid(PROC, 3)
    for call in (
        lambda: jdiff.sample(S.ddim(), guided, X, grid, cond=jnp.ones(6)),
        lambda: guided(X, 0.5, jnp.ones(6)),
    ):
        with pytest.raises(ValueError, match=r"^cond has shape \(6,\), .* batch 3 of x") as e:
            call()
        assert "\n" not in str(e.value) and "(6,)" in str(e.value) and "batch 3" in str(e.value)
