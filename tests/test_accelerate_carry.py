"""The seam of jdiff.accelerate: a model's internals as values and a cache carried in the
sampler's scan state (jdiff/models/_internals.py, jdiff/accelerate/_carry.py)."""

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
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def dit():
    return randomized(M.DiT(M.dit_tiny(num_classes=3, depth=4, hidden_dim=32), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    return x, jnp.array([0.2, 0.5, 0.9]), jnp.array([0, 2, 3])  # label 3 is the null class


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_parts_compose_to_the_model_at_every_cut(which, request, inputs):
    model = request.getfixturevalue(which)
    apply, params = M.functional(model)
    net = M.internals(apply, params)
    x, t, y = inputs
    assert net.num_cuts == model.num_cuts >= 2

    @jax.jit
    def every_cut(params, x, t, y):  # one compiled program for all cuts
        outs, feats = [], []
        for cut in range(net.num_cuts):
            h, ctx = net.front(params, x, t, y, cut)
            feats.append(net.deep(params, h, ctx, cut))
            outs.append(net.back(params, feats[-1], ctx, cut))
        if net.kind == "dit":
            h, ctx = net.embed(params, x, t, y)
            for i in range(net.depth):
                h = net.block(params, i, h, ctx)
            outs.append(net.head(params, h, ctx))
        h, ctx = net.front(params, x, t, y, 0)
        changed = net.back(
            params, jnp.roll(feats[0], 1, axis=1), ctx, 0
        )  # (a scaled feature: the DiT head normalizes it away)
        return apply(params, x, t, y), outs, changed

    ref, outs, changed = every_cut(params, x, t, y)
    for out in outs:
        np.testing.assert_array_equal(out, ref)
    # the cached feature is a real intermediate: changing it changes the output
    assert not np.allclose(changed, ref)
    with pytest.raises(ValueError, match="cut"):
        net.front(params, x, t, y, net.num_cuts)


def test_internals_refuses_other_networks(unet):
    with pytest.raises(TypeError, match="UNet or DiT"):
        M.internals(lambda x: x)
    apply, _ = M.functional(unet)
    with pytest.raises(TypeError, match="params"):
        M.internals(apply)
    with pytest.raises(ValueError, match="DiT"):
        M.internals(unet).embed(None, None, None)


@dataclasses.dataclass(frozen=True)
class _Count(A.Method):
    """Plain calls that count themselves in the carried cache."""

    name = "count"

    def init(self, net, params, x, t, cond):
        return {"n": jnp.zeros((), jnp.int32), "b": jnp.zeros((), jnp.int32)}

    def call(self, net, params, x, t, cond, cache):
        return net(params, x, t, cond), {"n": cache["n"] + 1, "b": jnp.int32(x.shape[0])}

    def stats(self, cache):
        return cache


@dataclasses.dataclass(frozen=True)
class _Neutral(_Count):
    @property
    def neutral(self):
        return True


@pytest.fixture(scope="module")
def den(unet):
    return M.to_denoiser(unet, jdiff.vp_cosine(), "v")


def test_carried_cache_counts_calls_and_changes_nothing(den, inputs):
    """A method that calls the network plainly gives the plain sampler, and its carried
    counter sees every call (Heun's corrector, inside lax.cond, stays plain: that case is
    in tests/test_accelerate_cache.py)."""
    x, _, y = inputs
    s = S.get("dpm++2m")
    ref, info = jdiff.sample(s, den, x, nfe=6, cond=y, return_info=True)
    out, stats = A.sample(_Count(), s, den, x, nfe=6, cond=y, report=True)
    # the same operations in another compiled program (one more carried value): XLA may
    # fuse them differently, a few float32 roundings per step over 6 steps
    np.testing.assert_allclose(out, ref, rtol=0, atol=100 * EPS32 * float(jnp.abs(ref).max()))
    assert int(stats[0][0]["n"]) == int(info.nfe) == 6


def test_call_sites_of_guidance(den, inputs):
    """Unbatched guidance calls one network twice per evaluation: two call sites of batch
    B, so the conditional and unconditional calls keep separate caches (batched guidance,
    one site of batch 2B, is in tests/test_accelerate_cache.py)."""
    x, _, y = inputs
    for batched, sites, batch in [(False, 2, 3)]:
        g = guidance(den, 2.0, 3, batched=batched)
        ref = jdiff.sample(S.get("dpm++2m"), g, x, nfe=4, cond=y)
        out, stats = A.sample(_Count(), S.get("dpm++2m"), g, x, nfe=4, cond=y, report=True)
        np.testing.assert_allclose(out, ref, rtol=0, atol=100 * EPS32 * float(jnp.abs(ref).max()))
        assert [int(c["b"]) for c in stats[0]] == [batch] * sites
        assert [int(c["n"]) for c in stats[0]] == [4] * sites


def test_accelerate_checks(den, inputs):
    x, _, y = inputs
    s = S.get("dpm++2m")
    assert A.accelerate(s, _Neutral(), den, x, y) is s  # a neutral method is the plain sampler
    acc = A.accelerate(s, _Count(), den, x, y)
    assert acc == A.accelerate(s, _Count(), den, x, y) and hash(acc) == hash(A.accelerate(s, _Count(), den, x, y))
    assert acc.name == "dpm++2m+count" and acc.nfe(5) == s.nfe(5)
    with pytest.raises(TypeError, match="no jdiff U-Net or DiT"):
        A.accelerate(s, _Count(), jdiff.denoiser(lambda x, t, c: x, jdiff.vp_cosine()), x, y)
    with pytest.raises(TypeError, match="method"):
        A.accelerate(s, object(), den, x, y)
    with pytest.raises(ValueError, match="guidance interval"):
        A.accelerate(s, _Count(), guidance(den, 2.0, 3, interval=(0.1, 1.0)), x, y)
