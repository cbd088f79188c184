"""Thresholding and classifier-free guidance wrappers."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S
from jdiff.wrappers import chain, dynamic_threshold, guidance, static_threshold

PROC = jdiff.vp_linear()


def big_x0(x, t, c):
    return 3.0 * x


BASE = jdiff.denoiser(big_x0, PROC, "x0")


def test_static_threshold_clips_and_keeps_consistency():
    x = jnp.linspace(-2, 2, 12).reshape(3, 4)
    p = static_threshold(BASE)(x, 0.5)
    np.testing.assert_allclose(p.x0, jnp.clip(3 * x, -1, 1))
    # eps = (x - alpha x0) / sigma and back: ~6 float32 roundings of terms <= |x| + |x0| = 3
    tol = 8 * EPS32 * 3.0
    np.testing.assert_allclose(PROC.alpha(0.5) * p.x0 + PROC.sigma(0.5) * p.eps, x, rtol=0, atol=tol)


def test_dynamic_threshold_formula():
    x = jax.random.normal(jax.random.key(0), (4, 50))
    p = dynamic_threshold(BASE, quantile=0.9)(x, 0.5)
    x0 = 3 * np.asarray(x)
    for i in range(4):
        s = max(1.0, np.quantile(np.abs(x0[i]), 0.9))
        # float32 3x, quantile interpolation and division against float64: a few ulps of
        # values <= 1 (8 ulps); a wrong quantile (0.8 or 0.95) moves s by ~10%
        np.testing.assert_allclose(p.x0[i], np.clip(x0[i], -s, s) / s, rtol=8 * EPS32, atol=8 * EPS32)
    # clip to [-s, s] then divide by s: at most 1 up to the rounding of the division
    assert float(jnp.max(jnp.abs(p.x0))) <= 1.0 + 2 * EPS32
    with pytest.raises(ValueError, match="quantile"):
        dynamic_threshold(BASE, quantile=0.0)


def test_guidance_combines_conditional_and_unconditional():
    calls = []

    def net(x, t, c):
        calls.append(x.shape[0])
        return x * 0 + c[:, None].astype(x.dtype)

    den = jdiff.denoiser(net, PROC, "x0")
    x = jnp.ones((3, 2))
    cond = jnp.array([1, 2, 3])
    null = 10
    for w in (0.0, 1.0, 2.5):
        p = guidance(den, w, null)(x, 0.4, cond)
        want = null + w * (cond - null)
        # x0 combined directly: 3 roundings of terms <= (1 + w) * |null| (= 35)
        scale = (1 + w) * null
        np.testing.assert_allclose(p.x0, np.broadcast_to(want[:, None], (3, 2)), rtol=0, atol=4 * EPS32 * scale)
        # eps combined the same way from eps = (x - alpha x0) / sigma (x0 up to |null|, sigma
        # ~ 0.8, so eps terms up to ~|null| / sigma) and mapped back: ~8 roundings of terms up
        # to (1 + w) * |null| / sigma times sigma; 2x margin
        np.testing.assert_allclose(PROC.alpha(0.4) * p.x0 + PROC.sigma(0.4) * p.eps, x, rtol=0, atol=16 * EPS32 * scale)
    assert set(calls) == {6}  # one batched call of 2B
    with pytest.raises(ValueError, match="needs a conditioning"):
        guidance(den, 2.0, null)(x, 0.4)


def test_wrappers_run_inside_sample():
    den = dynamic_threshold(guidance(jdiff.denoiser(lambda x, t, c: 2 * x + c[:, None], PROC, "x0"), 3.0, 0.0))
    grid = jdiff.time_grid(PROC, 5, final="data")  # ends at x0, which thresholding bounds
    x = jdiff.sample(S.unipc(2), den, jnp.ones((2, 3)), grid, cond=jnp.array([0.5, -0.5]))
    # the last step lands on the data time (sigma = 0, alpha = 1): x is the thresholded x0
    # up to the rounding of the first-order update
    assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.max(jnp.abs(x))) <= 1.0 + 4 * EPS32


def test_chain_applies_wrappers_in_order():
    """chain(a, b)(den) is b(a(den)): equal values, the same predictions, and the order
    matters (clipping before guidance differs from clipping after it)."""
    den = jdiff.denoiser(lambda x, t, c: 3.0 * x * (1.0 + c[:, None]), PROC, "x0")
    clip = partial(static_threshold, lo=-1.0, hi=1.0)

    def cfg(d):
        return guidance(d, 4.0, 0.0, batched=False)

    x, c = jnp.linspace(-1, 1, 8).reshape(2, 4), jnp.asarray([0.5, 1.0])
    inner_clip, outer_clip = chain(clip, cfg)(den), chain(cfg, clip)(den)
    assert inner_clip == cfg(clip(den)) and outer_clip == clip(cfg(den))
    for got, want in ((inner_clip, cfg(clip(den))), (outer_clip, clip(cfg(den)))):
        p, q = got(x, 0.5, c), want(x, 0.5, c)
        np.testing.assert_array_equal(p.x0, q.x0)
        np.testing.assert_array_equal(p.eps, q.eps)
    # guided after clipping leaves [-1, 1]; clipped after guidance does not
    assert float(jnp.max(jnp.abs(inner_clip(x, 0.5, c).x0))) > 1.5
    assert float(jnp.max(jnp.abs(outer_clip(x, 0.5, c).x0))) <= 1.0
    assert chain()(den) is den
    with pytest.raises(TypeError, match="argument 1 must be a callable"):
        chain(clip, 3.0)
