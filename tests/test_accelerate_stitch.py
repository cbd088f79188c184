"""Model stitching (jdiff.accelerate.stitch, T-Stitch): neutral at fraction 0 bit for bit,
the small model on exactly the first steps, network calls per model, guidance on either
model. Tiny random-weight DiTs (built abstractly, weights drawn with NumPy: no init
compile), module-scoped."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
import jdiff.models as M
from jdiff import solvers as S
from jdiff.accelerate import StitchCalls, stitch, stitch_calls, stitch_threshold
from jdiff.wrappers import guidance

PROC = jdiff.vp_cosine()
NULL = 3  # the null class of num_classes=3


def _random_dit(seed, **kw):
    apply, params = M.functional(M.abstract_model(M.DiT, M.dit_tiny(num_classes=3, depth=1, **kw)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(s.dtype)), params)
    return jdiff.Denoiser(apply, params, PROC, "v")


@pytest.fixture(scope="module")
def models():
    large = _random_dit(0)
    small = _random_dit(1, hidden_dim=32, num_heads=2, time_freq_dim=32)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    cond = jnp.array([0, 1, 2])
    return small, large, x, cond


@pytest.mark.parametrize("solver", [S.ddim(), S.unipc(2)], ids=lambda s: s.name)
def test_fraction_zero_is_the_large_sampler_bit_for_bit(models, solver):
    small, large, x, cond = models
    grid = jdiff.time_grid(PROC, nfe=6, solver=solver)
    assert stitch_threshold(grid, 0.0) == math.inf
    den = stitch(small, large, stitch_threshold(grid, 0.0))
    out, info = jdiff.sample(solver, den, x, grid, cond=cond, return_info=True)
    np.testing.assert_array_equal(out, jdiff.sample(solver, large, x, grid, cond=cond))
    assert int(info.nfe) == 6


def test_small_model_runs_exactly_the_first_steps(models):
    # DDIM keeps no history, so stitching at step k is the small sampler over grid[:k+1]
    # followed by the large one over grid[k:]: the same arithmetic on the same values
    small, large, x, cond = models
    solver = S.ddim()
    grid = jdiff.time_grid(PROC, nfe=6, solver=solver)
    thr = stitch_threshold(grid, 0.5)
    assert thr == float(grid[3])
    den = stitch(small, large, thr)
    out, info = jdiff.sample(solver, den, x, grid, cond=cond, return_info=True)
    mid = jdiff.sample(solver, small, x, grid[:4], cond=cond)
    want = jdiff.sample(solver, large, mid, grid[3:], cond=cond)
    # the branch of a lax.cond may be fused differently from the plain program: a few
    # roundings of values of size ~5 per step, over 6 steps
    np.testing.assert_allclose(out, want, rtol=0, atol=64 * EPS32 * 5)
    assert float(jnp.max(jnp.abs(out - jdiff.sample(solver, large, x, grid, cond=cond)))) > 1e-3  # small was used
    assert int(info.nfe) == 6
    assert stitch_calls(solver, den, grid) == StitchCalls(3, 3)


def test_call_counts_of_a_two_evaluation_solver(models):
    # Heun evaluates at t_i and t_{i+1}: with the switch at grid[k], the small model makes
    # k + (k - 1) calls (the corrector of step k - 1 sits at grid[k]: the large model's)
    small, large, _, _ = models
    solver = S.heun()
    grid = jdiff.time_grid(PROC, 8)
    for k in (3,):
        calls = stitch_calls(solver, stitch(small, large, float(grid[k])), grid)
        assert calls == StitchCalls(2 * k - 1, 2 * 8 - (2 * k - 1)), (k, calls)
    assert stitch_calls(solver, stitch(small, large, stitch_threshold(grid, 1.0)), grid) == StitchCalls(16, 0)
    assert StitchCalls(4, 6).large_equivalent(0.25) == 7.0


def test_guidance_on_either_model(models):
    small, large, x, cond = models
    solver = S.ddim()
    grid = jdiff.time_grid(PROC, nfe=6, solver=solver)
    thr = stitch_threshold(grid, 0.5)
    gsmall = guidance(small, 2.0, NULL)
    den = stitch(gsmall, large, thr)
    out, info = jdiff.sample(solver, den, x, grid, cond=cond, return_info=True)
    assert int(info.nfe) == 2 * 3 + 3  # guided small steps make the pair of calls
    assert stitch_calls(solver, den, grid) == StitchCalls(6, 3)
    mid = jdiff.sample(solver, gsmall, x, grid[:4], cond=cond)
    want = jdiff.sample(solver, large, mid, grid[3:], cond=cond)
    np.testing.assert_allclose(out, want, rtol=0, atol=64 * EPS32 * 5)  # as above
    assert stitch_calls(solver, stitch(small, guidance(large, 2.0, NULL), thr), grid) == StitchCalls(3, 6)


def test_per_sample_times_select_per_sample(models):
    small, large, x, cond = models
    den = stitch(small, large, 0.5)
    t = jnp.array([0.9, 0.2, 0.7])
    p = jax.jit(lambda d: d(x, t, cond))(den)
    ps, pl = jax.jit(lambda a, b: (a(x, t, cond), b(x, t, cond)))(small, large)
    want = np.where(np.array([True, False, True])[:, None, None, None], ps.x0, pl.x0)
    np.testing.assert_array_equal(p.x0, want)
    assert int(den.calls(t)) == 2 and int(den.calls(jnp.float32(0.9))) == 1


def test_bad_inputs(models):
    small, large, _, _ = models
    grid = jdiff.time_grid(PROC, 4)
    with pytest.raises(ValueError, match="fraction"):
        stitch_threshold(grid, 1.5)
    with pytest.raises(ValueError, match="decreasing"):
        stitch_threshold(grid[::-1], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        stitch(small, large, float("nan"))
    with pytest.raises(TypeError, match="small must be a jdiff denoiser"):
        stitch(lambda x: x, large)
    with pytest.raises(ValueError, match="one process"):
        stitch(small.replace(process=jdiff.edm()), large)
    with pytest.raises(TypeError, match="concrete grid"):
        jax.jit(lambda g: stitch_threshold(g, 0.5))(grid)
