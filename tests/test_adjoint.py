"""The Adjoint gradient strategy (jdiff._adjoint): exact where nothing is reconstructed,
close to backprop, converging at the solver's order, finite in float32 at both grid
ends, memory flat in the number of steps, clear errors for what it does not support.

Every compiled function is built once (module scope) and reused across grids of one
length; compile time dominates, so the shapes are tiny and the NFE lists short."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S
from jdiff._adjoint import Adjoint, adjoint_sample, check_adjoint
from jdiff.testbed import GaussianMixture

pytestmark = pytest.mark.usefixtures("x64")

PROC = jdiff.vp_linear()
B = 4


def mixture_x0(params, x, t, cond):
    """E[x0 | x_t] for the mixture with means, log-stds and log-weights taken from
    ``params`` (so that they are differentiable), shifted per sample by ``cond``."""
    a = PROC.alpha(t)[:, None, None]
    s = PROC.sigma(t)[:, None, None]
    mu, sd2 = params["means"][None], jnp.exp(2.0 * params["log_std"])[None]
    v = a * a * sd2 + s * s
    diff = (x - a[:, 0] * cond)[:, None, :] - a * mu
    logw = params["log_w"][None] - 0.5 * jnp.sum(diff * diff / v + jnp.log(v), -1)
    w = jax.nn.softmax(logw, -1)[..., None]
    return cond + jnp.sum(w * (mu + a * sd2 / v * diff), axis=1)


def mixture_params(mix):
    return {
        "means": jnp.asarray(mix.means),
        "log_std": jnp.log(jnp.asarray(mix.stds)),
        "log_w": jnp.log(jnp.asarray(mix.weights)),
    }


DEN = jdiff.denoiser(mixture_x0, PROC, "x0")


def loss(x):
    return jnp.sum(jnp.sin(x) + (x - 0.3) ** 2)


def adjoint_grad(solver, strategy=None):
    """d loss / d (x_T, params, cond, grid) through the adjoint (jitted once)."""
    strategy = strategy or Adjoint()

    def f(x, params, cond, grid):
        return loss(adjoint_sample(strategy, solver, DEN.replace(params=params), x, grid, cond))

    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))


def backprop_grad(solver):
    """The same by plain autodiff through jdiff.sample (x_T, params and cond)."""

    def f(x, params, cond, grid):
        return loss(jdiff.sample(solver, DEN.replace(params=params), x, grid, cond=cond))

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))


def rel(a, b):
    """Relative error ||a - b|| / ||b|| over all leaves of a pytree."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(la, lb))
    return float(np.sqrt(num / sum(float(jnp.sum(v**2)) for v in lb)))


@pytest.fixture(scope="module")
def bed(x64):
    # A mixture with components wide enough (std 0.4-0.8) that a third-order solver at
    # NFE 20 is within about 1e-2 of the exact gradient, so that the comparison at NFE 20
    # measures the adjoint rather than how stiff the testbed is (on sharper mixtures the
    # adjoint and backprop both move away from the exact gradient, by similar amounts).
    # Drawn with NumPy: no eager JAX programs to compile.
    rs = np.random.RandomState(0)
    mix = GaussianMixture(rs.dirichlet(np.ones(3)), rs.randn(3, 3), rs.uniform(0.4, 0.8, (3, 3)))
    x_T = jnp.asarray(rs.randn(B, 3))
    cond = jnp.asarray(0.1 * rs.randn(B, 3))
    return mixture_params(mix), x_T, cond


def grid_for(solver, nfe, **kw):
    return jdiff.time_grid(PROC, nfe=nfe, solver=solver, dtype=jnp.float64, **kw)


# --------------------------------------------------------- agreement, order


@pytest.fixture(scope="module")
def unipc_nfe20(bed):
    solver = S.unipc(2)
    return solver, grid_for(solver, 20), adjoint_grad(solver)


def test_agrees_with_backprop_at_nfe_20(bed, unipc_nfe20):
    params, x_T, cond = bed
    solver, grid, adj = unipc_nfe20
    ga = adj(x_T, params, cond, grid)
    gb = backprop_grad(solver)(x_T, params, cond, grid)
    # measured: x_T 2.7e-3, params 5.2e-3, cond 1.7e-5. (With dpm++2m, 1.9e-2, 1.5e-2 and
    # 1.2e-4: about backprop's own distance to the exact gradient at NFE 20.)
    for k, name in enumerate(("x_T", "params", "cond")):
        assert rel(ga[k], gb[k]) < 1e-2, (name, rel(ga[k], gb[k]))


def test_grid_gradient_is_the_flow_maps_on_a_gaussian(bed, unipc_nfe20):
    # Three identical components make the mixture one Gaussian N(m, diag(s^2)), m = mu +
    # cond, whose flow map is affine and known: x_N = alpha_N m + r_N / r_0 (x_0 -
    # alpha_0 m), r = sqrt(alpha^2 s^2 + sigma^2). The adjoint's end-time gradients are
    # dL/dt_N = g . dx_N/dt_N and dL/dt_0 = g . dx_N/dt_0 (g = L'(x_N)), zero inside;
    # its x_T gradient is g r_N / r_0. The grid (20 steps, as compiled) spans lambda in
    # [-1.2, 2.6], so the solver's own error is small: measured 9e-4 for x_T, 6e-4 for
    # t_0 and 2.5e-3 for t_N, whose velocity holds eps = (x_N - alpha D) / sigma_N and so
    # magnifies the forward error in x_N by 1 / sigma_N ~ 13. A wrong sign or a missing
    # term would be O(1).
    _, x_T, cond = bed
    solver, _, adj = unipc_nfe20
    grid = jdiff.time_grid(PROC, 20, t_start=0.5, t_end=0.02, dtype=jnp.float64)
    rs = np.random.RandomState(5)
    one = GaussianMixture(np.ones(3), np.repeat(rs.randn(1, 3), 3, 0), np.repeat(rs.uniform(0.4, 0.8, (1, 3)), 3, 0))
    params = mixture_params(one)
    gx, _, _, gt = adj(x_T, params, cond, grid)

    m = params["means"][0] + cond
    s2 = jnp.exp(2 * params["log_std"][0])

    def coefs(t):
        a, sg = PROC.alpha(t), PROC.sigma(t)
        da, ds = PROC.d_alpha(t), PROC.d_sigma(t)
        r = jnp.sqrt(a * a * s2 + sg * sg)
        return a, da, r, (a * da * s2 + sg * ds) / r

    a0, da0, r0, dr0 = coefs(grid[0])
    aN, daN, rN, drN = coefs(grid[-1])
    xN = aN * m + rN / r0 * (x_T - a0 * m)
    g = jax.grad(loss)(xN)
    want_t0 = jnp.sum(g * (-rN * dr0 / r0**2 * (x_T - a0 * m) - rN / r0 * da0 * m))
    want_tN = jnp.sum(g * (daN * m + drN / r0 * (x_T - a0 * m)))
    assert rel(gx, g * rN / r0) < 5e-3
    np.testing.assert_allclose(gt[0], want_t0, rtol=5e-3)
    np.testing.assert_allclose(gt[-1], want_tN, rtol=3e-2)
    assert np.all(np.asarray(gt[1:-1]) == 0.0)


@pytest.fixture(scope="module")
def reference(bed):
    # the exact gradient to about 1e-7: DPM-Solver++(3M), 640 steps, by backprop
    params, x_T, cond = bed
    solver = S.dpm_solver_pp(3)
    return backprop_grad(solver)(x_T, params, cond, grid_for(solver, 640))


@pytest.mark.parametrize(("solver", "order"), [(S.ddim(), 1), (S.dpm_solver_pp(2), 2)], ids=["ddim", "dpm++2m"])
def test_error_falls_at_the_solvers_order(bed, reference, solver, order):
    params, x_T, cond = bed
    adj = adjoint_grad(solver)
    nfes = (40, 160)
    errs = np.array(
        [[rel(g, r) for g, r in zip(adj(x_T, params, cond, grid_for(solver, n))[:3], reference)] for n in nfes]
    )
    # slope of log error against log NFE, for x_T, params and cond apart; measured: ddim
    # 0.97, 0.97, 1.00; dpm++2m 1.81, 2.10, 2.05 (x_T nears 2 from below: 1.65 over NFE
    # 20-80, 1.88 over 80-160). A wrong adjoint term
    # stalls the error at O(1) (slope 0); a wrong history adjoint makes 2M first order.
    slopes = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert np.all(np.abs(slopes - order) < 0.4), (slopes, errs)
    assert np.all(errs[-1] < 0.05 / order**2), errs


# ------------------------------------------------- float32, memory, errors


def _mlp_setup():
    # rectified flow: alpha(1) = 0 (zero terminal SNR) and a grid to t = 0 (sigma = 0)
    proc = jdiff.rectified_flow()
    Bm, d, H = 256, 64, 256
    k = jax.random.split(jax.random.key(3), 3)
    params = {
        "w1": jax.random.normal(k[0], (d + 1, H), jnp.float32) * d**-0.5,
        "w2": jax.random.normal(k[1], (H, d), jnp.float32) * H**-0.5,
    }

    def mlp(p, x, t, cond):
        h = jnp.tanh(jnp.concatenate([x, t[:, None].astype(x.dtype)], 1) @ p["w1"])
        return h @ p["w2"] + cond

    den = jdiff.denoiser(mlp, proc, "flow", params=params)
    x_T = jax.random.normal(k[2], (Bm, d), jnp.float32)
    cond = jnp.zeros((Bm, d), jnp.float32)
    return proc, den, params, x_T, cond


def test_float32_finite_at_both_ends_and_memory_flat_in_nfe():
    proc, den, params, x_T, cond = _mlp_setup()

    def compiled(solver, nfe):
        grid = jdiff.time_grid(proc, nfe=nfe, solver=solver, kind="uniform", final="data", dtype=jnp.float32)
        assert float(proc.alpha(grid[0])) == 0.0 and float(proc.sigma(grid[-1])) == 0.0

        def f(x, p, c, g):
            return jnp.sum(adjoint_sample(Adjoint(), solver, den.replace(params=p), x, g, c) ** 2)

        c = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(x_T, params, cond, grid).compile()
        return c, grid

    temps = {}
    for solver, nfe in ((S.dpm_solver_pp(2), 10), (S.dpm_solver_pp(2), 100), (S.heun(), 3)):
        c, grid = compiled(solver, nfe)
        temps[(solver.name, nfe)] = c.memory_analysis().temp_size_in_bytes
        grads = c(x_T, params, cond, grid)
        for leaf in jax.tree.leaves(grads):
            assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf))), (solver.name, nfe)
        assert float(jnp.max(jnp.abs(grads[0]))) > 0

    # Heun at NFE 3 takes two steps (the last, into sigma = 0, without correction): the
    # adjoint linearizes them at x_T and at the stored x_1, reconstructing nothing, so it
    # is backprop in another order: equal to float32 rounding (measured: x_T exact, the
    # parameters and cond 4e-8; their sums over the batch of 256 run in another order,
    # which can move a few float32 roundings per term: 64 EPS32 leaves a wide margin
    # while a missing or wrong term would be O(1)).
    def bp(x, p, c, g):
        return jnp.sum(jdiff.sample(S.heun(), den.replace(params=p), x, g, cond=c) ** 2)

    assert grid.shape == (3,)
    want = jax.jit(jax.grad(bp, argnums=(0, 1, 2)))(x_T, params, cond, grid)
    for g, w, name in zip(grads[:3], want, ("x_T", "params", "cond")):
        assert rel(g, w) < 64 * EPS32, (name, rel(g, w))
    # measured 1.252 and 1.255 MiB at NFE 10 and 100 (backprop: 6.5 and 57 MiB)
    t10, t100 = temps[("dpm++2m", 10)], temps[("dpm++2m", 100)]
    assert t100 <= 1.1 * t10, (t10, t100)


@pytest.mark.parametrize(
    "solver", [S.ddpm(), S.ddim(eta=0.5), S.sde_dpm_solver_pp(2), S.euler_maruyama()], ids=lambda s: s.name
)
def test_stochastic_solver_raises(solver):
    with pytest.raises(ValueError, match="stochastic"):
        check_adjoint(Adjoint(), solver, trajectory=False, denoise_to_zero=False)


def test_unsupported_settings_raise():
    with pytest.raises(ValueError, match="trajectory"):
        check_adjoint(Adjoint(), S.dpm_solver_pp(2), trajectory=True, denoise_to_zero=False)
    for bad in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match="order"):
            Adjoint(order=bad)
    with pytest.raises(TypeError, match="Adjoint"):
        check_adjoint("adjoint", S.ddim())

    class Mine(S.Solver):  # a solver the adjoint knows nothing about
        order = 1
        name = "mine"

    with pytest.raises(ValueError, match="mine"):
        check_adjoint(Adjoint(), Mine())
    # denoise_to_zero is applied after the solver and differentiated exactly: accepted
    for solver in (S.ddim(), S.heun("rho"), S.dpm_solver(3), S.deis(3), S.unipc(3), S.ipndm(4), S.euler()):
        check_adjoint(Adjoint(), solver, trajectory=False, denoise_to_zero=True)
    assert Adjoint().resolve_order(S.unipc(2)) == 3 and Adjoint().resolve_order(S.ipndm(4)) == 3
    assert Adjoint().resolve_order(S.ddim()) == 1 and Adjoint(2).resolve_order(S.ddim()) == 2
