"""sample() under jit, vmap and grad; compiled size; retracing; trajectories."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

pytestmark = pytest.mark.usefixtures("x64")
BACKPROP = jdiff.Backprop()


@pytest.fixture(scope="module")
def setup(x64):
    mix = random_mixture(jax.random.key(0), 3, 3)
    proc = jdiff.vp_linear()
    x_T = jdiff.prior_sample(proc, jax.random.key(1), (4, 3), jnp.float64)
    return mix, proc, x_T


def scaled_denoiser(mix, proc):
    """A denoiser with parameters: x0_hat = w * exact_x0 + b + cond."""

    def apply(params, x, t, cond):
        x0 = mix.posterior(x, t[0], proc).x0
        out = params["w"] * x0 + params["b"]
        return out if cond is None else out + cond

    return jdiff.denoiser(apply, proc, "x0", params={"w": jnp.asarray(1.1), "b": jnp.asarray(0.05)})


@pytest.mark.parametrize("solver", [S.unipc(2), S.dpm_solver(3), S.heun(), S.deis(2)], ids=lambda s: s.name)
def test_vmap_with_a_grid_per_sample(setup, solver):
    mix, proc, x_T = setup
    den = mix.denoiser(proc)
    grids = jnp.stack(
        [jdiff.time_grid(proc, 6, kind=k, dtype=jnp.float64) for k in ("logsnr", "uniform", "quadratic", "karras")]
    )
    f = jax.vmap(lambda x, g: jdiff.sample(solver, den, x[None], g)[0])
    got = jax.jit(f)(x_T, grids)
    for i in range(4):
        np.testing.assert_allclose(
            got[i], jdiff.sample(solver, den, x_T[i : i + 1], grids[i])[0], rtol=1e-10, atol=1e-12
        )


# tests/test_gradients.py checks every gradient strategy, also w.r.t. the grid, for
# multistep (data prediction) and Heun; this keeps the singlestep noise-prediction family
@pytest.mark.parametrize("solver", [S.dpm_solver(2)], ids=lambda s: s.name)
def test_grad_wrt_x_T_params_and_cond_matches_finite_differences(setup, solver):
    mix, proc, x_T = setup
    den = scaled_denoiser(mix, proc)
    grid = jdiff.time_grid(proc, 6, dtype=jnp.float64)
    cond = jnp.asarray(0.02)

    def loss(x, params, c, gradient=BACKPROP):
        d = den.replace(params=params)
        return jnp.sum(jnp.sin(jdiff.sample(solver, d, x, grid, cond=c, gradient=gradient)))

    gx, gp, gc = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x_T, den.params, cond)
    loss = jax.jit(loss, static_argnames="gradient")
    remat = jdiff.Remat()
    gx2, gp2, gc2 = jax.jit(jax.grad(lambda *a: loss(*a, gradient=remat), argnums=(0, 1, 2)))(x_T, den.params, cond)
    np.testing.assert_allclose(gx2, gx, rtol=1e-12)
    np.testing.assert_allclose(gp2["w"], gp["w"], rtol=1e-12)
    # float64 central differences with step 1e-6: rounding EPS64 |loss| / eps ~ 3e-9 (|loss|
    # <= 12) and truncation eps^2 |f^(3)| / 6 ~ 1e-12, so rel=1e-6 of O(1) gradients leaves
    # 100x, while a missing term in the reverse pass is O(1) relative
    eps = 1e-6
    d = jnp.zeros_like(x_T).at[1, 2].set(eps)
    fd = (loss(x_T + d, den.params, cond) - loss(x_T - d, den.params, cond)) / (2 * eps)
    assert float(gx[1, 2]) == pytest.approx(float(fd), rel=1e-6)
    pw = lambda w: {"w": w, "b": den.params["b"]}  # noqa: E731
    fd = (loss(x_T, pw(1.1 + eps), cond) - loss(x_T, pw(1.1 - eps), cond)) / (2 * eps)
    assert float(gp["w"]) == pytest.approx(float(fd), rel=1e-6)
    fd = (loss(x_T, den.params, cond + eps) - loss(x_T, den.params, cond - eps)) / (2 * eps)
    assert float(gc) == pytest.approx(float(fd), rel=1e-6)


def test_grad_through_stochastic_sampler(setup):
    mix, proc, x_T = setup
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 5, dtype=jnp.float64)
    key = jax.random.key(3)
    f = jax.jit(lambda x: jnp.sum(jdiff.sample(S.sde_dpm_solver_pp(2), den, x, grid, key=key) ** 2))
    g = jax.grad(f)(x_T)
    eps = 1e-6  # float64 central difference: error ~ EPS64 |f| / eps + eps^2, far below rel=1e-6
    d = jnp.zeros_like(x_T).at[0, 0].set(eps)
    assert float(g[0, 0]) == pytest.approx(float((f(x_T + d) - f(x_T - d)) / (2 * eps)), rel=1e-6)


@pytest.mark.parametrize(
    "solver", [S.unipc(3), S.dpm_solver(3), S.heun(), S.sde_dpm_solver_pp(2), S.deis(3)], ids=lambda s: s.name
)
def test_compiled_program_does_not_grow_with_steps(setup, solver):
    mix, proc, x_T = setup
    den = mix.denoiser(proc)
    key = jax.random.key(0)
    f = jax.jit(lambda x, g: jdiff.sample(solver, den, x, g, key=key))
    sizes = {}
    for n in (5, 50, 500):
        hlo = f.lower(x_T, jdiff.time_grid(proc, n, dtype=jnp.float64)).as_text()
        sizes[n] = len(hlo.splitlines())
    # 5 steps and 50 differ by the few ops of lower_order_final's two rules (< 15 steps: the
    # steps left; longer grids: the log-SNR step ratio); an unrolled loop would be 10x
    assert abs(sizes[50] - sizes[5]) <= 0.1 * sizes[5], sizes
    assert sizes[500] == sizes[50], sizes


def test_no_retrace_for_another_grid_of_the_same_length(setup):
    mix, proc, x_T = setup
    den = mix.denoiser(proc)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, g):
        return jdiff.sample(S.unipc(2), den, x, g)

    for kind in ("logsnr", "uniform", "karras", "quadratic"):
        run(x_T, jdiff.time_grid(proc, 8, kind=kind, dtype=jnp.float64)).block_until_ready()
    with pytest.raises(AssertionError):
        run(x_T, jdiff.time_grid(proc, 9, dtype=jnp.float64))  # a new length is a new program


def test_trajectory(setup):
    mix, proc, x_T = setup
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 5, dtype=jnp.float64)
    x, info = jdiff.sample(S.dpm_solver_pp(2), den, x_T, grid, return_info=True, trajectory=True)
    assert info.xs.shape == (6,) + x_T.shape and info.x0s.shape == (5,) + x_T.shape
    np.testing.assert_allclose(info.xs[0], x_T)
    np.testing.assert_allclose(info.xs[-1], x)
    for i in range(5):  # recorded outputs are the model's predictions at the recorded states
        p = den(info.xs[i], grid[i])
        np.testing.assert_allclose(info.x0s[i], p.x0, rtol=1e-12)
        np.testing.assert_allclose(info.epss[i], p.eps, rtol=1e-12)


def test_conditioning_pytree_reaches_the_denoiser(setup):
    mix, proc, x_T = setup
    seen = []

    def apply(x, t, cond):
        seen.append(jax.tree.structure(cond))
        return mix.posterior(x, t[0], proc).x0 * cond["scale"] + cond["shift"]

    den = jdiff.denoiser(apply, proc, "x0")
    # a scalar leaf is shared; arrays with ndim >= 1 are per sample (leading axis = batch)
    cond = {"scale": jnp.asarray(1.0), "shift": jnp.zeros_like(x_T)}
    out = jdiff.sample(S.ddim(), den, x_T, jdiff.time_grid(proc, 4, dtype=jnp.float64), cond=cond)
    ref = jdiff.sample(S.ddim(), mix.denoiser(proc), x_T, jdiff.time_grid(proc, 4, dtype=jnp.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    assert seen and seen[0] == jax.tree.structure(cond)


def test_manual_init_step_loop_equals_sample(setup):
    # the optax-style protocol: init / step by hand gives the same as sample()
    mix, proc, x_T = setup
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 6, dtype=jnp.float64)
    solver = S.unipc(2)
    # each call jitted on its own (eager op-by-op dispatch would compile every small op)
    state = jax.jit(solver.init)(x_T, grid, proc)
    step = jax.jit(lambda st: solver.step(den, st, None))
    for _ in range(6):
        state = step(state)
    np.testing.assert_allclose(state.x, jdiff.sample(solver, den, x_T, grid), rtol=1e-13)
    assert int(state.nfe) == 6 and int(state.i) == 6
