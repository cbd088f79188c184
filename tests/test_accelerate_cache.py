"""Feature caching of jdiff.accelerate (issue 25): DeepCache, TaylorSeer, the confidence
gate and the calibrated (ERTACache-style) schedule."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_models import randomized, tiny_unet
from conftest import EPS32
from flax import nnx

import jdiff
from jdiff import accelerate as A
from jdiff import models as M
from jdiff import solvers as S
from jdiff.wrappers import guidance


@pytest.fixture(scope="module")
def den():
    return M.to_denoiser(tiny_unet(), jdiff.vp_cosine(), "v")


@pytest.fixture(scope="module")
def dit_den():
    model = randomized(M.DiT(M.dit_tiny(num_classes=3, depth=4, hidden_dim=32), rngs=nnx.Rngs(0)))
    return M.to_denoiser(model, jdiff.vp_cosine(), "v")


@pytest.fixture(scope="module")
def inputs():
    return jax.random.normal(jax.random.key(2), (3, 8, 8, 1)), jnp.array([0, 2, 1])


# -- the forecast, on a fake network whose deep feature is a known path -------------------


@dataclasses.dataclass(frozen=True)
class _PathNet:
    """front/deep/back of a "network" whose deep feature is ``p(t) * x`` (``p`` a
    polynomial, or ``exp``) and whose output is the feature itself."""

    coeffs: tuple = ()
    num_cuts = 4

    def front(self, params, x, t, cond, cut):
        return x, t

    def deep(self, params, h, t, cut):
        p = jnp.exp(3 * t) if not self.coeffs else sum(c * t**i for i, c in enumerate(self.coeffs))
        return p * h

    def back(self, params, f, t, cut):
        return f


def _run(method, net, times, x):
    """The method's outputs and exact features over the calls at ``times`` (one compiled
    call, run once per time)."""
    cache = method.init(net, None, x, times[0], None)
    call = jax.jit(type(method).call, static_argnums=(0, 1))
    outs = []
    for t in times:
        out, cache = call(method, net, None, x, jnp.asarray(t), None, cache)
        outs.append(out)
    exact = [net.deep(None, x, jnp.asarray(t), 0) for t in times]
    return np.array(outs), np.array(exact), method.stats(cache)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_taylor_forecast_is_exact_on_polynomials_of_its_order(order):
    with jax.enable_x64(True):
        _exact_on_polynomials(order)


def _exact_on_polynomials(order):
    """A deep-feature path that is a polynomial of degree <= k in the variable is forecast
    exactly by order k (float64 rounding) once k + 1 full calls are stored, in the call
    index and in uneven times with uneven full calls; degree k + 1 is not; order 0 is
    reuse of the last full feature."""
    x = jnp.linspace(0.5, 1.5, 6, dtype=jnp.float64).reshape(1, 6)
    coeffs = (0.3, -1.2, 0.8, 0.5)[: order + 1]
    tol = 1e-9  # values O(10), a few float64 roundings per Lagrange weight (eps 2.2e-16)
    n = 12
    steps = np.arange(n, dtype=np.float64)
    uneven = np.cumsum(np.linspace(0.05, 0.2, n)) - 0.05
    sched = (True, False, True, True, False, False, True, False, True, False, False, False)
    for method, times, start in [  # start: the call after the (k + 1)-th full one
        (A.TaylorSeer(order, interval=2, variable="step"), steps, 2 * order + 1),
        (A.TaylorSeer(order, variable="time", schedule=sched), uneven, (0, 2, 3, 6)[order] + 1),
    ]:
        out, exact, st = _run(method, _PathNet(coeffs), times, x)
        np.testing.assert_allclose(out[start:], exact[start:], rtol=0, atol=tol)
        assert int(st["calls"]) == n and int(st["full"]) < n
        # one degree more is not forecast exactly (the test can fail)
        out, exact, _ = _run(method, _PathNet((*coeffs, 0.7)), times, x)
        assert np.abs(out[start:] - exact[start:]).max() > 1e-4
    # order 0 is DeepCache's reuse: the output of a cached call is the last full feature
    out, exact, _ = _run(A.TaylorSeer(0, interval=3), _PathNet((1.0, 2.0)), steps, x)
    np.testing.assert_array_equal(out[1:3], np.broadcast_to(exact[0], out[1:3].shape))
    out_dc, _, _ = _run(A.DeepCache(3), _PathNet((1.0, 2.0)), steps, x)
    np.testing.assert_array_equal(out_dc, out)


def test_confidence_gate_forecasts_when_confident_and_falls_back_when_not():
    """The gate's estimate (order k minus order k - 1) vanishes on a path of degree
    k - 1: after k + 1 full calls every call is forecast (exactly); on a fast-changing path
    it falls back to full calls; threshold 0 is neutral."""
    with jax.enable_x64(True):
        _gate()


def _gate():
    x = jnp.ones((2, 3), jnp.float64)
    times = np.arange(10, dtype=np.float64) * 0.1
    gate = A.ConfidenceGate(threshold=1e-6, order=2, interval=100)
    out, exact, st = _run(gate, _PathNet((0.4, 1.1)), times, x)
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-12)
    assert int(st["full"]) == 3
    out, exact, st = _run(gate, _PathNet(), times, x)  # exp(3t): the estimate is ~1e-2
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-12)
    assert int(st["full"]) == 10
    assert A.ConfidenceGate(threshold=0.0).neutral and not gate.neutral


# -- on the samplers ------------------------------------------------------------------------


def test_neutral_settings_are_the_plain_solver_and_bad_settings_are_refused(den, inputs):
    x, y = inputs
    s = S.get("dpm++2m")
    for m in [
        A.DeepCache(1),
        A.DeepCache(3, schedule=(True, True)),
        A.TaylorSeer(2, interval=1),
        A.ConfidenceGate(threshold=0.0),
    ]:
        assert m.neutral and A.accelerate(s, m, den, x, y) is s
    for bad in [
        lambda: A.DeepCache(0),
        lambda: A.DeepCache(2, cut=-1),
        lambda: A.DeepCache(schedule=(False, True)),
        lambda: A.TaylorSeer(4),
        lambda: A.TaylorSeer(1, variable="sigma"),
        lambda: A.ConfidenceGate(threshold=-1.0),
        lambda: A.ConfidenceGate(order=0),
        lambda: A.nonuniform_schedule(4, 5),
    ]:
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="num_cuts"):
        A.accelerate(s, A.DeepCache(2, cut=9), den, x, y)
    with pytest.raises(TypeError, match="tuple of bools"):
        A.DeepCache(schedule=[True, False])
    sched = A.nonuniform_schedule(20, 8)
    assert len(sched) == 20 and sum(sched) == 8 and sched[0]
    assert sum(sched[:10]) > sum(sched[10:])  # denser at the start


@pytest.mark.parametrize(
    "solver, method, nfe, calls, full, model",
    [
        ("ddim", A.DeepCache(2), 4, 4, 2, "dit_den"),
        ("dpm++2m", A.TaylorSeer(2, interval=3), 6, 6, 2, "den"),
        ("heun", A.DeepCache(schedule=(True, False, True)), 6, 3, 2, "den"),
    ],
)
def test_cached_sampling_on_solvers(solver, method, nfe, calls, full, model, request, inputs):
    """The carried cache sees the solver's top-level calls and runs the deep part exactly
    at the scheduled ones (Heun's corrector, inside lax.cond, stays plain); the result
    differs from the plain sampler (something was cached) but stays near it."""
    x, y = inputs
    d = request.getfixturevalue(model)
    s = S.get(solver)
    ref = jdiff.sample(s, d, x, nfe=nfe, cond=y)
    out, stats = A.sample(method, s, d, x, nfe=nfe, cond=y, report=True)
    assert (int(stats[0][0]["calls"]), int(stats[0][0]["full"])) == (calls, full)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 1e-5 < err < 0.5, err


def test_all_full_under_guidance_is_the_plain_sampler(den, inputs):
    """A non-neutral carried method whose every call is full (report=True keeps the carry)
    gives the guided plain sampler to float32 rounding; the batched cond + uncond call is
    one call site of batch 2B."""
    x, y = inputs
    g = guidance(den, 2.0, 3)
    s = S.get("dpm++2m")
    ref = jdiff.sample(s, g, x, nfe=4, cond=y)
    out, stats = A.sample(A.TaylorSeer(1, interval=1), s, g, x, nfe=4, cond=y, report=True)
    # the same operations in another compiled program (front/deep/back under lax.cond,
    # one more carried value): XLA may fuse them differently, a few float32 roundings per
    # step over 4 steps, relative to the output's magnitude
    np.testing.assert_allclose(out, ref, rtol=0, atol=100 * EPS32 * float(jnp.abs(ref).max()))
    assert [(int(c["calls"]), int(c["full"])) for c in stats[0]] == [(4, 4)]


def test_vmap_under_jit_is_per_sample(den, inputs):
    """Vmapped over a batch of x_T under the caller's jit, the confidence gate decides per
    sample, as if each were sampled alone (jdiff.sample's own jit)."""
    x, y = inputs
    s = S.get("dpm++2m")
    gate = A.ConfidenceGate(threshold=0.05, order=1, interval=4)
    xs, ys = x[:, None], y[:, None]
    vm = jax.jit(jax.vmap(lambda x, y: A.sample(gate, s, den, x, nfe=6, cond=y)))(xs, ys)
    per = jnp.stack([A.sample(gate, s, den, xs[i], nfe=6, cond=ys[i]) for i in range(3)])
    # the same operations in another compiled program: float32 fusion differences, a few
    # roundings per step over 6 steps
    np.testing.assert_allclose(vm, per, rtol=0, atol=100 * EPS32 * float(jnp.abs(per).max()))


def test_grad_through_the_cache_matches_finite_differences(den, inputs):
    """The gradient of a scalar of the cached sample w.r.t. x_T flows through the carried
    features (forecasts from earlier full calls) and matches a central finite difference."""
    x, y = inputs
    s, m = S.get("dpm++2m"), A.TaylorSeer(2, interval=2)

    def f(x):
        return jnp.sum(A.sample(m, s, den, x, nfe=5, cond=y) ** 2)

    g = jax.jit(jax.grad(f))(x)
    v = jax.random.normal(jax.random.key(5), x.shape)
    v = v / jnp.linalg.norm(v)
    fj, h = jax.jit(f), 1e-2
    fd = (fj(x + h * v) - fj(x - h * v)) / (2 * h)
    # the network computes in float32 (its norms always do, so float64 would not help):
    # central difference truncation O(h^2) ~ 1e-4 relative, rounding EPS32 * |f| / h
    # ~ 1e-5 relative
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=2e-3)


def test_calibrated_schedule(den, inputs):
    """ERTACache-style calibration: threshold 0 keeps every call full (neutral, the plain
    sampler), a larger threshold caches more calls, an infinite one all but the first; the
    schedule is a static tuple that DeepCache then follows."""
    x, y = inputs
    s = S.get("dpm++2m")
    cal = [A.calibrate(A.DeepCache(), s, den, x, nfe=6, cond=y, threshold=th) for th in (0.0, 0.2, float("inf"))]
    assert cal[0].schedule == (True,) * 6 and cal[0].neutral and A.accelerate(s, cal[0], den, x, y) is s
    assert cal[2].schedule == (True,) + (False,) * 5
    assert 1 <= sum(cal[1].schedule) <= 6
    ts = A.calibrate(A.TaylorSeer(1), s, den, x, nfe=6, cond=y, threshold=0.2)
    assert len(ts.schedule) == 6 and ts.schedule[0]
    with pytest.raises(TypeError, match="DeepCache or TaylorSeer"):
        A.calibrate(A.ConfidenceGate(), s, den, x, nfe=6, cond=y, threshold=0.1)
