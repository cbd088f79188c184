"""Low-NFE solver variants against closed forms and the exact testbed (issue 10): the
reference/diffusers DPM-Solver++(3M) update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture(scope="module")
def problem(x64):
    mix = random_mixture(jax.random.key(2), 3, 4)
    proc = jdiff.vp_linear()
    x_T = jdiff.prior_sample(proc, jax.random.key(3), (5, 3), jnp.float64)
    return mix, proc, x_T


# ------------------------------------------------------------ DPM-Solver++(3M), diffusers


def _diffusers_3m(den, proc, x_T, grid):
    """DPM-Solver++(3M) written as diffusers' ``DPMSolverMultistepScheduler`` (and the
    reference ``dpm_solver_pytorch.py``) computes it, in plain alpha / sigma / lambda
    terms: first order at step 0 and on the last step, second order (midpoint) at step 1
    and on the second-to-last step (``lower_order_final`` with fewer than 15 steps)."""
    a, s, lam = proc.alpha, proc.sigma, proc.lambda_
    N = grid.shape[0] - 1
    x, ms = x_T, []
    for i in range(N):
        t_s, t = grid[i], grid[i + 1]
        ms.append(den(x, t_s).x0)
        h = lam(t) - lam(t_s)
        order = 1 if i in (0, N - 1) else (2 if i in (1, N - 2) else 3)
        em = jnp.expm1(-h)  # e^{-h} - 1
        x_new = s(t) / s(t_s) * x - a(t) * em * ms[-1]
        if order == 2:
            r0 = (lam(t_s) - lam(grid[i - 1])) / h
            D1 = (ms[-1] - ms[-2]) / r0
            x_new = x_new - 0.5 * a(t) * em * D1
        elif order == 3:
            r0 = (lam(t_s) - lam(grid[i - 1])) / h
            r1 = (lam(grid[i - 1]) - lam(grid[i - 2])) / h
            D1_0, D1_1 = (ms[-1] - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x_new = x_new + a(t) * (em / h + 1.0) * D1 - a(t) * ((em + h) / h**2 - 0.5) * D2
        x = x_new
    return x


def test_diffusers_3m_variant_matches_the_reference_update(problem):
    mix, proc, x_T = problem
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 7, kind="logsnr", dtype=jnp.float64)
    solver = S.dpm_solver_pp(3, variant="diffusers")
    want = jax.jit(lambda x, g: _diffusers_3m(den, proc, x, g))(x_T, grid)
    # float64, 7 steps, the same update in two arrangements: ~1e-15 apart; 1e-10 still sees
    # a coefficient wrong in its 8th digit. The exact form differs by ~1e-3 here.
    np.testing.assert_allclose(jdiff.sample(solver, den, x_T, grid), want, rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(jdiff.sample(S.dpm_solver_pp(3), den, x_T, grid) - want)) > 1e-6
    # names, equality and where the setting applies
    assert S.get(solver.name) == solver and solver.name == "dpm++3m(variant=diffusers)"
    assert solver != S.dpm_solver_pp(3) and S.dpm_solver_pp(2, variant="diffusers") == S.dpm_solver_pp(2)
    with pytest.raises(ValueError, match="variant"):
        S.dpm_solver_pp(3, variant="reference")
    with pytest.raises(ValueError, match="singlestep"):
        S.dpm_solver_pp(3, method="singlestep", variant="diffusers")


def test_3m_local_error_slopes(x64):
    # One third-order step from the exact ODE solution, with the model evaluated on the
    # exact solution at the two previous grid points, on grids uniform in lambda with step
    # h = 0.2, 0.1, 0.05 from lambda = -0.5, using the solver's own coefficient table (row
    # 2 of a 3-step grid without lower_order_final). Data: one Gaussian with 16 dimensions
    # of spread scales, whose probability-flow ODE solution is closed form (x_t = alpha mu +
    # sqrt(alpha^2 s^2 + sigma^2) z). jdiff's exact form has local error O(h^4) (ratio 16
    # per halving), the diffusers form O(h^3) (ratio 8).
    d = 16
    sd = np.exp(np.linspace(np.log(0.05), np.log(3.0), d))[None]
    mu = np.linspace(-1.0, 1.0, d)[None]
    mix = jdiff.testbed.GaussianMixture(np.ones(1), mu, sd)
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)

    def exact(t):
        a, s = proc.alpha(t), proc.sigma(t)
        return a * mu + jnp.sqrt(a**2 * sd**2 + s**2)

    def local_error(solver, h):
        grid = proc.t_of_lambda(-0.5 + h * jnp.arange(4, dtype=jnp.float64))
        xs = [exact(t) for t in grid]
        ms = [den(x, t).x0 for x, t in zip(xs[:3], grid[:3])]
        tab = solver.table(proc, grid)
        x3 = tab.cx[2] * xs[2] + sum(tab.cm[2, k] * ms[k] for k in range(3))
        return jnp.sqrt(jnp.mean((x3 - xs[3]) ** 2)), tab.order[2]

    hs = jnp.asarray([0.2, 0.1, 0.05])
    for variant, local in (("exact", 4), ("diffusers", 3)):
        solver = S.dpm_solver_pp(3, variant=variant, lower_order_final=False)
        errs, order = jax.jit(jax.vmap(lambda h, s=solver: local_error(s, h)))(hs)
        assert np.all(np.asarray(order) == 3)
        ratios = np.asarray(errs[:-1] / errs[1:])
        print(variant, np.asarray(errs), "ratios", ratios)
        # ratio 2^p for local order p; measured 17.6, 17.0 (exact) and 9.2, 8.7 (diffusers):
        # the next term still adds ~10% at h = 0.2. The bands do not overlap.
        assert np.all((2**local * 0.8 <= ratios) & (ratios <= 2**local * 1.25)), (variant, ratios)
