"""The posterior samplers and inversions on the one sampling engine: the same samples as
the code before the move (values recorded by scripts/record_inverse_samples.py in
tests/data/inverse_samples.npz), the samplers as solvers of jdiff.sample (another
solver's steps, gradient strategies, jit), and the DDIM tables in one place.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recorded_inverse_cases as cases
from conftest import EPS32, EPS64

import jdiff
from jdiff import inverse_problems as IP
from jdiff import solvers as S
from jdiff.metrics import frechet_distance, gaussian_stats
from jdiff.solvers.ddim import ddim_coefficients, ddim_table

DATA = os.path.join(os.path.dirname(__file__), "data", "inverse_samples.npz")

# A subset that touches every sampler, operator kind, process end (data / t_min) and
# inversion, split over the two dtypes (one compiled program each). EDICT and BDIA are
# not compared: their DDIM step had B = sigma_t (1 - e^{-h}) for -sigma_t (e^h - 1) (an
# exact round trip whatever the coefficients, so no test saw it) and was fixed after
# the recording; test_ddim_tables_in_one_place checks the step against the closed form.
# `python scripts/record_inverse_samples.py --check` compares every recorded case.
SUBSET = {
    "f32": [
        "posterior/vp_cosine/inpainting/dps",
        "posterior/image/sr/pigdm",
        "posterior/vp_cosine/projection/ddrm",
        "posterior/vp_cosine/inpainting/red_diff",
        "posterior/vp_cosine/projection/dds_prox",
        "inversion/invert/dpm++2m",
        "inversion/ddpm_eta0.5",
    ],
    "f64": [
        "posterior/edm/nonlinear/dps_xT",
        "posterior/edm/projection/ddrm_sy0",
        "inversion/invert/ddim_refine2",
    ],
}


@pytest.fixture(scope="module")
def recorded():
    with np.load(DATA) as f:
        return dict(f)


# Tolerances, per dtype: DPS, PiGDM and DDS now take DDIM's step from the one table of
# jdiff.solvers.ddim (alpha from log alpha, the eps weight as sigma sqrt(1 - eta^2 (1 -
# e^{-2h})) instead of sqrt(sigma^2 - c^2)), a few ulps per coefficient; over 8 steps of
# O(1) values, with DPS/PiGDM's gradients amplifying them, that stays below 1e3 ulps
# (measured at most 114 in float32, PiGDM on images). DDRM, RED-diff and the inversions
# keep their operations; they are compared to 10 ulps (measured at most 1.8: placed in
# another compiled program, a fusion may round differently).
def _tol(name, eps):
    same_order = any(k in name for k in ("ddrm", "red_diff", "inversion/"))
    return (10 if same_order else 1000) * eps


@pytest.mark.parametrize("prefix", ["f32", "f64"])
def test_same_samples_as_recorded(recorded, prefix):
    x64, dtype = {"f32": (False, jnp.float32), "f64": (True, jnp.float64)}[prefix]
    eps = EPS32 if prefix == "f32" else EPS64
    with jax.enable_x64(x64):
        post = cases.posterior_cases(dtype)
        inv = cases.inversion_cases(dtype)
        table = {f"posterior/{k}": f for k, f in post.items()} | {f"inversion/{k}": f for k, f in inv.items()}
        for name in SUBSET[prefix]:
            thunk = table[name]
            for field, a in thunk().items():
                key = f"{prefix}/{name}/{field}"
                ref = recorded[key]
                a = np.asarray(a)
                assert a.dtype == ref.dtype and a.shape == ref.shape, key
                scale = max(1.0, float(np.max(np.abs(ref))))
                err = float(np.max(np.abs(a - ref)))
                assert err <= _tol(name, eps) * scale, f"{key}: max abs difference {err:.3e}"


# ------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def small():
    mix = cases._mixture()
    process = jdiff.vp_cosine()
    den = mix.denoiser(process)
    op = IP.inpainting(np.array([True, False, True, False]))
    y = jnp.broadcast_to(jnp.asarray([1.45, 0.55], jnp.float32), (4, 2))
    return mix, den, op, y


def test_posterior_solver_is_a_sample_solver(small):
    """dps(...) is jdiff.sample(DPS(ddpm, scale), measured(...)) from the prior draw; a new
    measurement reuses the compiled program; a plain denoiser is refused."""
    _, den, op, y = small
    key = jax.random.key(0)
    x, info = IP.dps(den, op, y, 0.1, key, nfe=4, scale=0.5, return_info=True)
    grid = info.grid
    x_T = IP.DPS(S.ddpm(), 0.5).start(IP.measured(den, op, y, 0.1), grid, key, (4, 4), jnp.float32)
    run = jax.jit(lambda y: jdiff.sample(IP.DPS(S.ddpm(), 0.5), IP.measured(den, op, y, 0.1), x_T, grid, key=key))
    # the same steps compiled inside the caller's jit: equal to a few float32 ulps of O(1)
    # values (measured 4), the fusion of 6 steps of a few flops each may round differently
    np.testing.assert_allclose(np.asarray(run(y)), np.asarray(x), rtol=0, atol=100 * EPS32)
    assert int(info.nfe) == 4
    assert run._cache_size() == 1 and run(y + 0.1).shape == x.shape and run._cache_size() == 1
    with pytest.raises(TypeError, match="needs the measurement"):
        jdiff.sample(IP.DPS(S.ddpm(), 0.5), den, x_T, grid, key=key)
    with pytest.raises(ValueError, match="give eta .* or a solver, not both"):
        IP.dps(den, op, y, 0.1, key, nfe=6, eta=0.5, solver=S.ddim())
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['nfee'\\]"):
        IP.dps(den, op, y, 0.1, key, nfee=6)


def test_gradient_strategies_reach_the_samplers(small):
    """The gradient of a loss on DDRM samples with respect to the measurement is the same
    with Remat as with Backprop (the same reverse pass, steps recomputed); Truncated(1)
    keeps only the last step's path and differs. Adjoint (the unguided probability-flow
    ODE backward) is refused."""
    _, den, op, y = small
    key = jax.random.key(1)

    def loss(y, gradient):
        return jnp.sum(IP.ddrm(den, op, y, 0.1, key, nfe=4, gradient=gradient) ** 2)

    g_b = jax.grad(loss)(y, jdiff.Backprop())
    g_r = jax.grad(loss)(y, jdiff.Remat())
    assert np.all(np.isfinite(np.asarray(g_b))) and float(jnp.max(jnp.abs(g_b))) > 0
    # the same float32 operations recomputed: equal up to a few ulps of O(1-10) values
    np.testing.assert_allclose(g_r, g_b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(jax.grad(loss)(y, jdiff.Truncated(1)), g_b)
    with pytest.raises(ValueError, match="Adjoint"):
        IP.dps(den, op, y, 0.1, key, nfe=4, eta=0.0, gradient=jdiff.Adjoint())


def _fd(x, ref):
    return frechet_distance(*gaussian_stats(np.asarray(x)), *gaussian_stats(np.asarray(ref)))


def test_other_solver_steps(small):
    """DPS taking DPM-Solver++(2M) steps (deterministic, one call per step) lands near the
    exact posterior: Frechet distance of Gaussian fits to exact posterior samples (B = 400,
    NFE 30) far below the unconditional prior's (asserted: a factor 10). PiGDM and DDS hand
    their corrected denoiser to the inner step the same way."""
    mix, den, op, _ = small
    n = 400
    y1 = np.array([1.45, 0.55])
    ref = IP.sample_mixture_posterior(jax.random.key(5), IP.mixture_posterior(mix, op, y1, 0.1), n)
    y = jnp.broadcast_to(jnp.asarray(y1, jnp.float32), (n, 2))
    d_unc = _fd(mix.sample(jax.random.key(6), n), ref)
    x, info = IP.dps(den, op, y, 0.1, jax.random.key(0), nfe=30, solver=S.dpm_solver_pp(2), return_info=True)
    assert int(info.nfe) == 30
    d = _fd(x, ref)
    assert np.all(np.isfinite(np.asarray(x))) and d * 10 < d_unc, (d, d_unc)


def test_ddim_tables_in_one_place():
    """The DDIM solver's table, the inversions' (A, B) form and the closed forms agree:
    ``x_t = a x0 + keep eps + c z`` with ``a = alpha_t``, ``keep^2 + c^2 = sigma_t^2`` and
    ``c = eta sigma_t sqrt(1 - e^{-2h})``; ``A x_s + B eps`` is the eta = 0 step."""
    with jax.enable_x64(True):
        process = jdiff.vp_linear()
        grid = jdiff.time_grid(process, 5, kind="logsnr", dtype=jnp.float64)
        tab = ddim_table(process, grid, 0.3)
        a, s = np.asarray(process.alpha(grid)), np.asarray(process.sigma(grid))
        lam = np.log(a / s)
        c = 0.3 * s[1:] * np.sqrt(1 - np.exp(-2 * (lam[1:] - lam[:-1])))
        np.testing.assert_allclose(tab.a, a[1:], rtol=100 * EPS64)
        np.testing.assert_allclose(tab.c, c, rtol=1e3 * EPS64)
        np.testing.assert_allclose(np.asarray(tab.keep) ** 2 + c**2, s[1:] ** 2, rtol=1e3 * EPS64)
        la, ls = process.log_alpha(grid), process.log_sigma(grid)
        A, Bc = ddim_coefficients(la[:-1], ls[:-1], la[1:], ls[1:])
        # x_t = A x_s + B eps with x_s = a_s x0 + s_s eps equals a_t x0 + s_t eps
        np.testing.assert_allclose(np.asarray(A) * a[:-1], a[1:], rtol=100 * EPS64)
        np.testing.assert_allclose(np.asarray(A) * s[:-1] + np.asarray(Bc), s[1:], rtol=1e3 * EPS64)
