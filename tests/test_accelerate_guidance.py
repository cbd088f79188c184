"""Adaptive guidance (jdiff.accelerate: adaptive_guidance, adaptive_solver; Castillo et
al. 2023): gamma = 1 is the plain CFG sampler bit for bit, the calibrated switch drops
the unconditional call on exactly the steps after it (network calls and samples), the
dynamic decision drops it from the step after the similarity first reaches gamma. A tiny
random-weight DiT inside an eps model whose class effect fades toward the data (so the
predictions come to agree, as a trained model's do), module-scoped."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
import jdiff.models as M
from jdiff import solvers as S
from jdiff.accelerate import adaptive_guidance, adaptive_solver, guidance_similarity, switch_step
from jdiff.wrappers import autoguidance, guidance

PROC = jdiff.vp_cosine()
NULL = 3
N = 8


@pytest.fixture(scope="module")
def setup():
    apply, params = M.functional(M.abstract_model(M.DiT, M.dit_tiny(num_classes=3, depth=1)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(s.dtype)), params)

    def fading(p, x, t, c):  # eps = x + 0.3 t net(x, t, c): the class matters less as t -> 0
        return x + 0.3 * t[:, None, None, None] * apply(p, x, t, c)

    den = jdiff.Denoiser(fading, params, PROC, "eps")
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    cond = jnp.array([0, 1, 2, 0])
    guided = guidance(den, 2.0, NULL)
    grid = jdiff.time_grid(PROC, nfe=N, solver=S.ddim())
    sim = guidance_similarity(S.ddim(), guided, x, grid, cond=cond)
    return den, guided, x, cond, grid, sim


def test_similarity_is_the_cosine_of_the_eps_pair(setup):
    den, guided, x, cond, grid, sim = setup
    assert sim.shape == (N, 4)
    # step 0 starts at x_T: the similarity there, computed directly in float64
    eps = jax.jit(lambda c: den(x, grid[0], c).eps)
    pc = np.asarray(eps(cond), np.float64).reshape(4, -1)
    pu = np.asarray(eps(jnp.full_like(cond, NULL)), np.float64).reshape(4, -1)
    want = np.sum(pc * pu, 1) / np.linalg.norm(pc, axis=1) / np.linalg.norm(pu, axis=1)
    # float32 dot products of length 64 over values ~1: ~64 roundings each, relative
    np.testing.assert_allclose(sim[0], want, rtol=0, atol=256 * EPS32)
    assert np.all(sim < 1.0) and sim.min(1)[-1] > sim.min(1)[0]  # they come to agree


@pytest.mark.parametrize("solver", [S.ddim(), S.dpm_solver_pp(2)], ids=lambda s: s.name)
def test_gamma_one_is_plain_cfg_bit_for_bit(setup, solver):
    _, guided, x, cond, grid, _ = setup
    grid = jdiff.time_grid(PROC, nfe=N, solver=solver)
    ref, info = jdiff.sample(solver, guided, x, grid, cond=cond, return_info=True)
    out, ainfo = jdiff.sample(adaptive_solver(solver, 1.0), guided, x, grid, cond=cond, return_info=True)
    np.testing.assert_array_equal(out, ref)
    assert int(ainfo.nfe) == int(info.nfe) == 2 * N
    if solver == S.ddim():
        ag = adaptive_guidance(solver, guided, x, grid, cond=cond, gamma=1.0)
        assert ag.denoiser is guided and ag.step == N and ag.time == -math.inf


def test_calibrated_switch_drops_the_unconditional_call(setup):
    den, guided, x, cond, grid, sim = setup
    gamma = float(sim.min(1)[N // 2])
    k = switch_step(sim, gamma)
    assert 0 < k <= N // 2
    ag = adaptive_guidance(S.ddim(), guided, x, grid, cond=cond, gamma=gamma)
    assert ag.step == k and ag.time == float(grid[k])
    np.testing.assert_array_equal(ag.similarity, sim)
    out, info = jdiff.sample(S.ddim(), ag.denoiser, x, grid, cond=cond, return_info=True)
    assert int(info.nfe) == 2 * k + (N - k) < 2 * N
    # DDIM keeps no history: guided over grid[:k+1], then the conditional model alone
    mid = jdiff.sample(S.ddim(), guided, x, grid[: k + 1], cond=cond)
    want = jdiff.sample(S.ddim(), den, mid, grid[k:], cond=cond)
    # a lax.cond branch may round differently from the plain program: a few roundings
    # of values ~3 per step over 8 steps
    np.testing.assert_allclose(out, want, rtol=0, atol=64 * EPS32 * 3)


def test_dynamic_decision_drops_after_first_agreement(setup):
    _, guided, x, cond, grid, sim = setup
    gamma = float(sim.min(1)[N // 2])
    j = int(np.argmax(sim.min(1) >= gamma))  # first step whose whole batch agrees
    out, info = jdiff.sample(adaptive_solver(S.ddim(), gamma), guided, x, grid, cond=cond, return_info=True)
    assert int(info.nfe) == 2 * (j + 1) + (N - j - 1)  # the measuring step is still guided
    static = dataclasses.replace(guided, interval=(float(grid[j + 1]), math.inf), interval_on="t")
    want = jdiff.sample(S.ddim(), static, x, grid, cond=cond)
    np.testing.assert_allclose(out, want, rtol=0, atol=64 * EPS32 * 3)  # as above


def test_switch_step_and_errors(setup):
    den, guided, x, cond, grid, _ = setup
    s = np.array([0.5, 0.99, 0.95, 0.99, 0.995])
    assert switch_step(s, 0.98) == 3 and switch_step(s, 0.9) == 1 and switch_step(s, 0.4) == 0
    assert switch_step(s, 0.999) == 5 and switch_step(np.ones(5), 1.0) == 5  # >= 1: never
    two = np.stack([s, np.full(5, 0.99)], axis=1)
    assert switch_step(two, 0.97, "min") == 3 and switch_step(two, 0.97, "mean") == 1
    with pytest.raises(ValueError, match="reduce"):
        switch_step(s, 0.9, "max")
    with pytest.raises(ValueError, match="NaN"):
        adaptive_solver(S.ddim(), float("nan"))
    with pytest.raises(ValueError, match="on must be one of"):
        adaptive_solver(S.ddim(), 0.9, on="v")
    assert adaptive_solver(S.ddim(), 0.9, on="x0").name == "adaptive_cfg(ddim, gamma=0.9, on=x0)"
    with pytest.raises(ValueError, match="one network evaluation per step"):
        adaptive_solver(S.heun(), 0.9)
    with pytest.raises(ValueError, match="deterministic"):
        adaptive_solver(S.ddim(eta=1.0), 0.9)
    with pytest.raises(TypeError, match="classifier-free guidance"):
        adaptive_guidance(S.ddim(), autoguidance(den, den, 2.0), x, grid, cond=cond, gamma=0.9)
    with pytest.raises(ValueError, match="interval"):
        adaptive_guidance(S.ddim(), guidance(den, 2.0, NULL, interval=(0.1, 1.0)), x, grid, cond=cond, gamma=0.9)
