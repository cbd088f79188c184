"""Stream batching (jdiff.accelerate.stream, StreamDiffusion): a stream's outputs are
jdiff.sample's for the same noises (to float32 rounding), one batched
call per tick, per-slot multistep history, guidance, the throughput measurement. Tiny
random-weight DiT (built abstractly, weights drawn with NumPy), module-scoped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
import jdiff.models as M
from jdiff import solvers as S
from jdiff.accelerate import stream, stream_throughput
from jdiff.wrappers import guidance

PROC = jdiff.vp_cosine()
NULL = 3
M_IN = 5  # inputs in the stream
NFE = 4  # steps = slots


def _random(cls, config, seed):
    apply, params = M.functional(M.abstract_model(cls, config))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(s.dtype)), params)
    return jdiff.Denoiser(apply, params, PROC, "v")


class _ToNoise(type(S.ddim())):
    direction = "to_noise"  # a solver that runs toward noise (an inversion's direction)


@pytest.fixture(scope="module")
def dit():
    den = _random(M.DiT, M.dit_tiny(num_classes=3, depth=1), 0)
    x = jax.random.normal(jax.random.key(0), (M_IN, 8, 8, 1))
    return den, x, jnp.array([0, 1, 2, 0, 1])


@pytest.mark.parametrize("solver", [S.ddim(), S.euler(), S.dpm_solver_pp(2)], ids=lambda s: s.name)
def test_stream_outputs_are_the_samplers(dit, solver):
    den, x, cond = dit
    grid = jdiff.time_grid(PROC, nfe=NFE, solver=solver)
    ref, rinfo = jdiff.sample(solver, den, x, grid, cond=cond, return_info=True)
    out, info = stream(solver, den, x, grid, cond=cond, return_info=True)
    assert info.slots == NFE and info.ticks == M_IN + NFE - 1
    np.testing.assert_array_equal(info.nfe, np.full(M_IN, int(rinfo.nfe)))
    # the same solver arithmetic on the same per-sample values; the network's raw output
    # is the same too, but each slot converts it (x0, eps from v) at its own time, so XLA
    # vectorizes that conversion over a vector of times instead of one scalar time and
    # may contract multiply-adds differently: ~1 ulp of values ~|x| per step, carried
    # through NFE steps with coefficients ~1 (measured: up to ~20 ulp of max|x| here,
    # ~40 for UniPC on a toy model)
    np.testing.assert_allclose(out, ref, rtol=0, atol=64 * EPS32 * float(jnp.max(jnp.abs(ref))))


def test_stream_with_guidance_shorter_than_the_pipeline(dit):
    base, _, _ = dit
    den = guidance(base, 2.0, NULL)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))  # 2 inputs, 4 slots: flushed by dummies
    cond = jnp.array([2, 0])
    solver = S.ddim()
    grid = jdiff.time_grid(PROC, nfe=NFE, solver=solver)
    ref, rinfo = jdiff.sample(solver, den, x, grid, cond=cond, return_info=True)
    out, info = stream(solver, den, x, grid, cond=cond, return_info=True)
    assert info.ticks == 2 + NFE - 1 and int(rinfo.nfe) == 2 * NFE
    np.testing.assert_array_equal(info.nfe, [2 * NFE, 2 * NFE])
    np.testing.assert_allclose(out, ref, rtol=0, atol=64 * EPS32 * float(jnp.max(jnp.abs(ref))))  # as above


def test_throughput_measurement(dit):
    den, x, cond = dit
    grid = jdiff.time_grid(PROC, nfe=NFE, solver=S.ddim())
    r = stream_throughput(S.ddim(), den, x, grid, cond=cond, repeats=1)
    assert (r.outputs, r.stream_calls, r.sample_calls) == (M_IN, M_IN + NFE - 1, NFE)
    assert (r.stream_evaluations, r.sample_evaluations) == (NFE * (M_IN + NFE - 1), NFE * M_IN)
    assert r.stream_seconds > 0 and r.sample_seconds > 0
    assert r.stream_outputs_per_call == M_IN / (M_IN + NFE - 1)
    assert "| stream |" in r.table()


def test_bad_inputs(dit):
    den, x, cond = dit
    with pytest.raises(ValueError, match="stochastic"):
        stream(S.ddim(eta=1.0), den, x, nfe=NFE, cond=cond)
    with pytest.raises(ValueError, match="toward noise"):
        stream(_ToNoise(), den, x, nfe=NFE, cond=cond)
    with pytest.raises(ValueError, match="batch"):
        stream(S.ddim(), den, x, nfe=NFE, cond=cond[:3])
    with pytest.raises(ValueError, match="repeats"):
        stream_throughput(S.ddim(), den, x, nfe=NFE, cond=cond, repeats=0)
