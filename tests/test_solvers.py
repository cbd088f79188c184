"""Solvers against the exact testbed: convergence orders, equivalences, NFE accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS64, EQUIVALENT, deterministic_zoo

import jdiff
from jdiff import solvers as S
from jdiff._random import normal_per_sample
from jdiff.testbed import random_mixture

pytestmark = pytest.mark.usefixtures("x64")

ZOO = deterministic_zoo()
ORDER_ZOO = [name for name in ZOO if name not in EQUIVALENT]
STEPS = (80, 160, 320)


@pytest.fixture(scope="module")
def problem(x64):
    mix = random_mixture(jax.random.key(0), 2, 3, std_range=(0.5, 1.0))
    proc = jdiff.vp_linear()
    x_T = jdiff.prior_sample(proc, jax.random.key(1), (8, 2), jnp.float64)
    ref = mix.reference_ode(proc, x_T, proc.t_max, proc.t_min)
    return mix, proc, x_T, ref


@pytest.mark.parametrize("name", ORDER_ZOO)
def test_convergence_order(problem, name):
    solver, order = ZOO[name]
    mix, proc, x_T, ref = problem
    den = mix.denoiser(proc)
    errs = []
    for n in STEPS:
        grid = jdiff.time_grid(proc, n, kind="logsnr", dtype=jnp.float64)
        # one compiled program for the three grid lengths (sample_padded equals sample up
        # to reassociation, tests/test_padded.py); the other tests here run sample itself
        x = jdiff.sample_padded(solver, den, x_T, grid, max_steps=STEPS[-1])
        errs.append(float(jnp.mean(jnp.linalg.norm(x - ref, axis=-1))))
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    print(f"{name}: errors {errs} order {slope:.2f}")
    assert slope >= order - 0.3, f"{name}: errors {errs}, fitted order {slope:.2f} < {order} - 0.3"
    # and not suspiciously better than theory (a sign of a broken reference or test)
    assert slope <= order + 1.3, f"{name}: fitted order {slope:.2f}"


@pytest.fixture(scope="module")
def one_batch(x64):
    mix = random_mixture(jax.random.key(2), 3, 4)
    proc = jdiff.vp_linear()
    x_T = jdiff.prior_sample(proc, jax.random.key(3), (5, 3), jnp.float64)
    return mix, proc, x_T


def _run(solver, den, x_T, grid, **kw):
    return jdiff.sample(solver, den, x_T, grid, **kw)


@pytest.mark.parametrize("final", ["t_min", "data"])
def test_first_order_solvers_coincide(one_batch, final):
    mix, proc, x_T = one_batch
    grid = jdiff.time_grid(proc, 12, final=final, dtype=jnp.float64)
    # an eps network on one grid and an x0 network on the other: the conversion does not matter
    den = mix.denoiser(proc, "eps" if final == "t_min" else "x0")
    ref = _run(S.ddim(), den, x_T, grid)
    # float64, 12 steps: each step's coefficients (e^-h, expm1, phi_1, ...) differ between the
    # formulas by a few ulps (64 covers ~10 ops of ~3 ulps each); the eps <-> x0 conversion
    # amplifies by up to 1 / sigma(t_min) ~ 100. About 4e-11, while a first-order coefficient
    # error of even 1e-6 relative would show.
    tol = 64 * (grid.shape[0] - 1) * EPS64 * float(jnp.max(jnp.abs(ref))) / float(proc.sigma(proc.t_min))
    for solver in [
        S.dpm_solver(1),
        S.dpm_solver(1, method="multistep"),
        S.dpm_solver_pp(1),
        S.dpm_solver_pp(1, method="singlestep"),
        S.deis(1),
        S.deis(1, basis="log_rho"),
        S.unipc(1, corrector=False),
        S.unipc(1, corrector=False, prediction="noise"),
        S.euler("rho"),
        S.ipndm(1),
    ]:
        np.testing.assert_allclose(_run(solver, den, x_T, grid), ref, rtol=0, atol=tol, err_msg=solver.name)


def test_known_identities(one_batch):
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 10, dtype=jnp.float64)
    # float64, 10 steps, two formulas for the same step: ~1e-14 apart; 1e-10 leaves room for the
    # DEIS quadrature and still sees a coefficient wrong in its 8th digit
    same = lambda a, b: np.testing.assert_allclose(_run(a, den, x_T, grid), _run(b, den, x_T, grid), atol=1e-10)  # noqa
    # UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M); UniP-3 is DPM-Solver++(3M) (square system,
    # and the same midpoint form in its one-node warm-up step)
    same(S.unipc(2, corrector=False, variant="bh2"), S.dpm_solver_pp(2))
    same(S.unipc(3, corrector=False, variant="bh2"), S.dpm_solver_pp(3))
    # DEIS with a log-rho basis is multistep DPM-Solver with exact coefficients
    same(S.deis(3, basis="log_rho"), S.dpm_solver(3, method="multistep", solver_type="heun"))
    same(S.deis(2, basis="log_rho"), S.dpm_solver(2, method="multistep", solver_type="heun"))
    # variable-step iPNDM is rhoAB-DEIS
    same(S.ipndm(3, variable_step=True, lower_order_final=True), S.deis(3, basis="rho"))
    # Euler and Heun in (x/alpha, rho) coincide with the t versions on EDM (alpha = 1, rho = t)
    e = jdiff.edm()
    de = mix.denoiser(e)
    ge = jdiff.time_grid(e, 10, dtype=jnp.float64)
    xe = x_T * 80.0
    np.testing.assert_allclose(_run(S.heun("rho"), de, xe, ge), _run(S.heun("t"), de, xe, ge), atol=1e-9)
    np.testing.assert_allclose(_run(S.deis(3, basis="rho"), de, xe, ge), _run(S.deis(3), de, xe, ge), atol=1e-9)


def test_ddpm_step_is_the_posterior_q(one_batch):
    # DDIM(eta=1) on a discrete table is DDPM: mean and variance of q(x_{n-1} | x_n, x0).
    mix, _, _ = one_batch
    p = jdiff.vp_discrete()
    den = mix.denoiser(p)
    ac = np.cumprod(1 - jdiff.ddpm_betas("linear"))
    n = 500
    grid = jnp.asarray([(n + 1) / 1000, n / 1000], jnp.float64)  # step n -> n - 1 (0-based table)
    x = jax.random.normal(jax.random.key(4), (5, 3), jnp.float64)
    key = jax.random.key(5)
    out = jdiff.sample(S.ddpm(), den, x, grid, key=key)
    x0 = den(x, grid[0]).x0
    a_t, a_prev = ac[n], ac[n - 1]
    beta = 1 - a_t / a_prev
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    var = (1 - a_prev) / (1 - a_t) * beta
    z = normal_per_sample(jdiff.per_sample_keys(key, 5), x.shape, x.dtype, step=0)
    np.testing.assert_allclose(out, mean + np.sqrt(var) * z, rtol=1e-9, atol=1e-10)


def test_sde_dpm_solver_1_is_ddpm(one_batch):
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 9, dtype=jnp.float64)
    key = jax.random.key(9)
    np.testing.assert_allclose(
        jdiff.sample(S.sde_dpm_solver_pp(1), den, x_T, grid, key=key),
        jdiff.sample(S.ddpm(), den, x_T, grid, key=key),
        atol=1e-10,
    )


COUNTED = ["heun(t)", "heun(rho)", "dpm_solver-2", "dpm_solver-3", "dpm_solver++(3S)", "unipc-2(bh2)", "ipndm-4"]


@pytest.mark.parametrize("name", COUNTED)
def test_nfe_counter_matches_static_count(one_batch, name):
    solver, _ = ZOO[name]
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    for final in ("t_min", "data"):
        grid = jdiff.time_grid(proc, 7, final=final, dtype=jnp.float64)
        _, info = jdiff.sample(solver, den, x_T, grid, return_info=True)
        assert int(info.nfe) == solver.nfe(7, final == "data"), (name, final)


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_spends_exactly_the_target_nfe(one_batch, order):
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    for nfe in range(order + 4, order + 7):  # every remainder of nfe modulo the order
        _, info = jdiff.sample(S.dpm_solver(order), den, x_T, nfe=nfe, return_info=True)
        assert int(info.nfe) == nfe
        assert info.grid.shape[0] - 1 == -(-nfe // order)
    assert S.order_schedule(3, 4, 10) == [3, 3, 3, 1]
    assert S.order_schedule(3, 4, 9) == [3, 3, 2, 1]
    assert S.order_schedule(3, 4, 11) == [3, 3, 3, 2]


def test_target_nfe_builds_matching_grids(one_batch):
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    for solver, nfe, want in [(S.unipc(2), 10, 10), (S.heun(), 10, 10), (S.heun(), 9, 8), (S.dpm_solver_pp(3), 6, 6)]:
        _, info = jdiff.sample(solver, den, x_T, nfe=nfe, return_info=True)
        assert int(info.nfe) == want, solver.name
    _, info = jdiff.sample(S.heun(), den, x_T, nfe=9, final="data", return_info=True)
    assert int(info.nfe) == 9 and float(info.grid[-1]) == 0.0


def test_denoise_to_zero_adds_one_call_and_returns_x0(one_batch):
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 6, dtype=jnp.float64)
    x, info = jdiff.sample(S.unipc(2), den, x_T, grid, denoise_to_zero=True, return_info=True)
    x_last = jdiff.sample(S.unipc(2), den, x_T, grid)
    assert int(info.nfe) == 7
    np.testing.assert_allclose(x, den(x_last, grid[-1]).x0, atol=1e-12)


def test_traced_schedule_equals_static_schedule():
    from jdiff.solvers._base import traced_order_schedule

    # order_schedule (NumPy, validated) against the jitted schedule with traced flags and a
    # traced NFE target, as solvers compute it inside a jit
    traced = jax.jit(traced_order_schedule, static_argnames=("order", "lower_order_final"))
    free_traced = jax.jit(
        lambda order, finite: traced_order_schedule(order, finite, None, lower_order_final=True), static_argnums=0
    )
    for order in (2, 3):
        for n in range(1, 7):
            for forced in [(), (0,), (n - 1,), (0, n - 1)]:
                finite = jnp.array([k not in {f % n for f in forced} for k in range(n)])
                free = int(jnp.sum(finite))
                for nfe in [None] + list(range(n, order * free + (n - free) + 1)):
                    want = S.order_schedule(order, n, nfe, lower_order_final=True, forced=forced)
                    if nfe is None:
                        got = free_traced(order, finite)
                    else:
                        got = traced(order=order, finite=finite, nfe=jnp.int32(nfe), lower_order_final=True)
                    assert [int(v) for v in got] == want, (order, n, forced, nfe)


def test_singlestep_exact_nfe_under_jit_with_zero_snr_start(one_batch):
    mix, _, x_T = one_batch
    rf = jdiff.rectified_flow()
    den = mix.denoiser(rf)
    solver = S.dpm_solver(3)
    for nfe in (4, 5, 6, 8):
        grid = jdiff.time_grid(rf, nfe=nfe, solver=solver, kind="uniform", final="data")
        f = jax.jit(lambda x, g, n=nfe: jdiff.sample(solver, den, x, g, nfe=n, return_info=True))
        assert int(f(x_T, grid)[1].nfe) == nfe


@pytest.mark.parametrize("order,variant", [(1, "bh2"), (2, "bh1"), (3, "bh2")])
def test_unipc_matches_a_textbook_predictor_corrector_loop(one_batch, order, variant):
    # UniPC written the plain way (Zhao et al. 2023, Alg. 1-2): keep x_{i-1}, predict x_i
    # with UniP, evaluate the model there, redo the step with UniC (new node at r = 1),
    # then predict from the corrected x_i. The solver folds the corrector into the next
    # predictor's coefficients; both must agree.
    from jdiff._core import ei_step, geometry

    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    grid = jdiff.time_grid(proc, 8, dtype=jnp.float64)
    N = 8
    lam = proc.lambda_(grid)
    x, x_prev, hist = x_T, None, []  # hist: x0 outputs, most recent first, with their lambdas
    p_prev = None
    for i in range(N):
        m = den(x, grid[i]).x0
        if i > 0:
            g = geometry(proc, grid[i - 1], grid[i], jnp.float64)
            m0, l0 = hist[0]
            nodes = [(m, lam[i])] + hist[1:p_prev]
            D = jnp.stack([mm - m0 for mm, _ in nodes])
            r = jnp.stack([(ll - l0) / g.h for _, ll in nodes])
            x = ei_step(x_prev, g, m0, D, r, len(nodes), mode="data", coef=variant)
        hist = [(m, lam[i])] + hist
        p = min(order, len(hist), N - i)  # warm-up and lower_order_final (N < 15)
        g = geometry(proc, grid[i], grid[i + 1], jnp.float64)
        if p > 1:
            D = jnp.stack([mm - m for mm, _ in hist[1:p]])
            r = jnp.stack([(ll - lam[i]) / g.h for _, ll in hist[1:p]])
            x_next = ei_step(x, g, m, D, r, p - 1, mode="data", coef=variant)
        else:
            x_next = ei_step(x, g, m, mode="data")
        x_prev, x, p_prev = x, x_next, p
    np.testing.assert_allclose(jdiff.sample(S.unipc(order, variant=variant), den, x_T, grid), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_singlestep_matches_the_papers_algorithms(one_batch, order):
    # DPM-Solver-2 and -3 written as in Lu et al. 2022 (Algorithms 1 and 2, r1 = 1/2;
    # r1 = 1/3, r2 = 2/3) in plain alpha / sigma / lambda terms, no jdiff core.
    mix, proc, x_T = one_batch
    den = mix.denoiser(proc)
    N = 6
    grid = jdiff.time_grid(proc, N, dtype=jnp.float64)
    a, s, lam = proc.alpha, proc.sigma, proc.lambda_

    def eps(x, t):
        return den(x, t).eps

    x = x_T
    for i in range(N):
        t_s, t_t = grid[i], grid[i + 1]
        h = lam(t_t) - lam(t_s)
        e_s = eps(x, t_s)
        if order == 2:
            s1 = proc.t_of_lambda(lam(t_s) + 0.5 * h)
            u = a(s1) / a(t_s) * x - s(s1) * jnp.expm1(0.5 * h) * e_s
            x = a(t_t) / a(t_s) * x - s(t_t) * jnp.expm1(h) * eps(u, s1)
        else:
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            s1 = proc.t_of_lambda(lam(t_s) + r1 * h)
            s2 = proc.t_of_lambda(lam(t_s) + r2 * h)
            u1 = a(s1) / a(t_s) * x - s(s1) * jnp.expm1(r1 * h) * e_s
            d1 = eps(u1, s1) - e_s
            u2 = (
                a(s2) / a(t_s) * x
                - s(s2) * jnp.expm1(r2 * h) * e_s
                - s(s2) * r2 / r1 * (jnp.expm1(r2 * h) / (r2 * h) - 1.0) * d1
            )
            d2 = eps(u2, s2) - e_s
            x = a(t_t) / a(t_s) * x - s(t_t) * jnp.expm1(h) * e_s - s(t_t) / r2 * (jnp.expm1(h) / h - 1.0) * d2
    got = jdiff.sample(S.dpm_solver(order, lower_order_final=False), den, x_T, grid)
    np.testing.assert_allclose(got, x, rtol=1e-10, atol=1e-12)


def test_registry_identities_are_the_proven_ones():
    # the sweeps report these aliases with their target's numbers: each pair must be one
    # that the tests above prove identical
    from jdiff.solvers._registry import IDENTICAL

    first_order = {
        S.dpm_solver(1),
        S.dpm_solver_pp(1),
        S.deis(1),
        S.deis(1, basis="log_rho"),
        S.unipc(1, corrector=False),
        S.euler("rho"),
        S.ipndm(1),
    }
    proven = {(s, S.ddim()) for s in first_order} | {
        (S.unipc(2, corrector=False, variant="bh2"), S.dpm_solver_pp(2)),
        (S.unipc(3, corrector=False, variant="bh2"), S.dpm_solver_pp(3)),
        (S.sde_dpm_solver_pp(1), S.ddpm()),
    }
    for alias, target in IDENTICAL.items():
        assert (S.get(alias), S.get(target)) in proven, (alias, target)
