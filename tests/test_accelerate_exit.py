"""Early exit with learned uncertainty (DeeDiff): heads, their loss on the train seam, and
the carried sampler method (jdiff/accelerate/_exit.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_models import randomized
from conftest import EPS32
from flax import nnx

import jdiff
from jdiff import accelerate as A
from jdiff import models as M
from jdiff import solvers as S
from jdiff.train import train
from jdiff.wrappers import guidance

DEPTH = 3


@pytest.fixture(scope="module")
def den():
    dit = M.DiT(M.dit_tiny(num_classes=3, depth=DEPTH, hidden_dim=16, num_heads=2, time_freq_dim=16), rngs=nnx.Rngs(0))
    return M.to_denoiser(randomized(dit), jdiff.vp_cosine(), "v")


@pytest.fixture(scope="module")
def net(den):
    return M.internals(den.apply_fn, den.params)


@pytest.fixture(scope="module")
def heads(den):
    h = A.exit_heads(den, width=8, seed=3)
    h["adapt"] = 0.3 * jax.random.normal(jax.random.key(4), h["adapt"].shape)  # a trained-looking adapter
    h["w2"] = 30 * h["w2"]  # uncertainties that differ between samples
    return h


@pytest.fixture(scope="module")
def forced(heads):
    """Heads whose uncertainty ignores the input: ~1 after block 0, ~0 after block 1, so
    a threshold of 0.5 stops every call after block 1."""
    return dict(heads, w2=jnp.zeros_like(heads["w2"]), b2=jnp.array([10.0, -10.0]))


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    return x, jnp.array([0, 1, 2, 3])  # label 3 is the null class


def _atol(ref, steps=1):
    # the same float32 operations in another compiled program (a while_loop over the
    # blocks, a carry): XLA may fuse and reassociate differently, a few roundings of the
    # output's magnitude per network call
    return 100 * steps * EPS32 * max(1.0, float(jnp.abs(ref).max()))


def test_one_call_stops_at_the_first_block_confident_for_the_whole_batch(den, net, heads, inputs):
    x, y = inputs
    t = jnp.linspace(0.2, 0.9, 4)
    outs, u, full = jax.jit(lambda p: (*A.exit_outputs(net, p, heads, x, t, y), den.apply_fn(p, x, t, y)))(den.params)
    assert outs.shape == (DEPTH,) + x.shape and u.shape == (DEPTH - 1, 4)
    # the last output is the model's call (the blocks one by one compose to it; in one
    # compiled program with the heads beside it XLA may fuse differently)
    np.testing.assert_allclose(outs[-1], full, rtol=0, atol=_atol(full))
    # thresholds: between u[0]'s min and max (some samples confident, not all: no exit
    # there), above every u[0] (exit 0), above every u[1] only (exit 1 or none)
    umax, umin = np.asarray(u.max(axis=1)), np.asarray(u.min(axis=1))
    assert np.all(umin < umax)
    methods = [A.early_exit(heads, thr) for thr in (0.5 * (umin[0] + umax[0]), umax[0] + 1e-3, umax[1] + 1e-3)]

    @jax.jit
    def calls(params, x, t, y):  # one compiled program for the three thresholds
        return [m.call(net, params, x, t, y, m.init(net, params, x, t, y)) for m in methods]

    seen = set()
    for m, (out, cache) in zip(methods, calls(den.params, x, t, y)):
        below = np.flatnonzero(umax < m.threshold)
        k = int(below[0]) if below.size else DEPTH - 1  # the exit taken (DEPTH - 1: none)
        seen.add(k)
        np.testing.assert_allclose(out, outs[k], rtol=0, atol=_atol(outs[k]))
        assert int(cache["blocks"]) == k + 1 and int(cache["calls"]) == 1
        assert int(cache["full"]) == (k == DEPTH - 1)
        assert cache["exits"].tolist() == np.eye(DEPTH, dtype=int)[k].tolist()
    assert len(seen) >= 2  # the thresholds really exercise different exits
    # exiting changes the output (the test below would not see a wrong exit otherwise)
    assert not np.allclose(outs[1], outs[-1], atol=1e-2)


def test_threshold_zero_is_the_plain_sampler_bit_for_bit(den, heads, inputs):
    x, y = inputs
    off = A.early_exit(heads, 0.0)
    for s in map(S.get, ("euler", "dpm++2m", "heun", "ipndm3", "unipc2")):  # no carry at all: the solver itself
        assert off.neutral and A.accelerate(s, off, den, x, y) is s
    s = S.get("euler")
    ref = jdiff.sample(s, den, x, nfe=4, cond=y)
    np.testing.assert_array_equal(A.sample(off, s, den, x, nfe=4, cond=y), ref)
    # with the counters carried (report=True): every call full, the plain calls in another
    # compiled program
    out, stats = A.sample(off, s, den, x, nfe=4, cond=y, report=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=_atol(ref, 4))
    st = stats[0][0]
    assert int(st["calls"]) == int(st["full"]) == 4 and int(st["blocks"]) == 4 * DEPTH


def _truncated(den, net, heads, k):
    """The network that always exits after block ``k``, as a plain denoiser."""
    return den.replace(apply_fn=lambda p, x, t, c=None: A.exit_outputs(net, p, heads, x, t, c)[0][k])


@pytest.mark.parametrize("solver, batched", [("dpm++2m", True), ("unipc2", False)])
def test_forced_exit_is_the_guided_sampler_of_the_truncated_network(solver, batched, den, net, forced, inputs):
    """Every call stops after block 1 (2 of 3 blocks computed): the sample is the plain
    sample of the network cut there, with deterministic solvers and with batched (one
    call of 2B) or unbatched (two calls of B) classifier-free guidance."""
    x, y = inputs
    s = S.get(solver)
    g, cut = (guidance(d, 2.0, 3, batched=batched) for d in (den, _truncated(den, net, forced, 1)))
    ref = jdiff.sample(s, cut, x, nfe=4, cond=y)
    out, stats = A.sample(A.early_exit(forced, 0.5), s, g, x, nfe=4, cond=y, report=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=_atol(ref, 4))
    sites = stats[0]
    assert len(sites) == (1 if batched else 2)
    for st in sites:
        calls = int(st["calls"])
        assert calls == 4 and int(st["blocks"]) == 2 * calls and int(st["full"]) == 0
        assert st["exits"].tolist() == [0, calls, 0]


def test_heun_corrector_calls_stay_full(den, forced, inputs):
    """Heun's corrector runs inside lax.cond: those calls are plain (full), the others exit."""
    x, y = inputs
    _, stats = A.sample(A.early_exit(forced, 0.5), S.get("heun"), den, x, nfe=6, cond=y, report=True)
    st = stats[0][0]
    assert int(st["calls"]) == 3 and int(st["blocks"]) == 6 and st["exits"].tolist() == [0, 3, 0]


def test_jit_vmap_equal_per_sample(den, net, heads, inputs):
    """Under vmap each sample is a batch of one with its own exit decisions: the jitted,
    vmapped sampler equals the sampler run on each sample alone."""
    x, y = inputs
    # a threshold that splits the samples at the first call's first exit
    t0 = den.model_time(jnp.full((4,), den.process.t_max))
    u0 = np.asarray(jax.jit(lambda p: A.exit_outputs(net, p, heads, x, t0, y)[1][0])(den.params))
    m, s = A.early_exit(heads, float(np.median(u0))), S.get("euler")

    def one(xi, yi):
        return A.sample(m, s, den, xi[None], nfe=4, cond=yi[None], report=True)

    out, stats = jax.jit(jax.vmap(one))(x, y)
    blocks = []
    for i in range(x.shape[0]):
        ref, st = one(x[i], y[i])
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=_atol(ref, 4))
        assert int(stats[0][0]["blocks"][i]) == int(st[0][0]["blocks"])
        blocks.append(int(st[0][0]["blocks"]))
    assert len(set(blocks)) > 1 and min(blocks) < 4 * DEPTH  # samples exit at different blocks


def _hand_loss(den, net, heads, batch, key, lam, dropout):
    """The loss written out with numpy for the heads' math (the network's parts jitted)."""
    x0, y = batch["x"], np.asarray(batch["label"])
    t, _, xt = jdiff.train.noise_batch(den.process, x0, key)
    keys = jdiff.per_sample_keys(key, x0.shape[0])
    coin = np.array([float(jax.random.uniform(jax.random.fold_in(k, 0x657874))) for k in keys])
    y = jnp.asarray(np.where(coin < dropout, 3, y))
    t_in = den.model_time(t)

    @jax.jit
    def features(p):
        h, ctx = net.embed(p, xt, t_in, y)
        hs = []
        for i in range(DEPTH - 1):
            h = net.block(p, i, h, ctx)
            hs.append(h)
        return hs, ctx.cvec, den.apply_fn(p, xt, t_in, y)

    @jax.jit
    def heads_out(p, hs):
        ctx = net.embed(p, xt, t_in, y)[1]
        return [net.head(p, h, ctx) for h in hs]

    hs, c, full = features(den.params)
    hp = {k: np.asarray(v, np.float64) for k, v in heads.items()}

    def ln(a):
        a = np.asarray(a, np.float64)
        return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)

    c = np.asarray(c, np.float64)
    c = c / (1 + np.exp(-c))
    us, adapted = [], []
    for i, h in enumerate(hs):
        a = ln(h) @ hp["wh"][i] + (c @ hp["wc"][i])[:, None, :] + hp["b1"][i]
        a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))  # gelu, tanh form
        us.append(1 / (1 + np.exp(-(a.mean(1) @ hp["w2"][i] + hp["b2"][i]))))
        adapted.append(jnp.asarray(np.asarray(h, np.float64) + ln(h) @ hp["adapt"][i], jnp.float32))
    full = np.asarray(full, np.float64)
    total_u = total_l = 0.0
    for u, out in zip(us, heads_out(den.params, adapted)):
        e = ((np.asarray(out, np.float64) - full) ** 2).reshape(len(u), -1).mean(1)
        total_u += np.mean((u - np.tanh(np.sqrt(e))) ** 2)
        total_l += np.mean((1 - u) * e)
    return total_u + lam * total_l


def test_loss_is_the_hand_computation_and_training_lowers_it(den, net, heads, inputs):
    x, y = inputs
    batch = {"x": x, "label": y % 3}
    key = jax.random.key(5)
    loss_fn = A.exit_loss(den, layer_weight=0.5, label_dropout=0.5, num_classes=3)
    evaluate = jax.jit(lambda hd: loss_fn(hd, batch, key, frozen=den.params))
    loss, metrics = evaluate(heads)
    # float32 network and heads against float64 numpy heads: the sums run over a few
    # hundred terms of magnitude <= 1 (the tanh targets and sigmoid outputs)
    np.testing.assert_allclose(float(loss), _hand_loss(den, net, heads, batch, key, 0.5, 0.5), rtol=1e-5)
    assert set(metrics) == {"loss", "uncertainty", "layer", "exit_rms"}

    def eval_loss(hd):
        return evaluate(hd)[0]

    fresh = A.exit_heads(den, width=8)
    before = float(eval_loss(fresh))
    result = train(
        loss_fn, fresh, lambda step: batch, 25, optimizer=optax.adam(3e-2), frozen=den.params,
        ema_decay=None, handle_sigterm=False,
    )  # fmt: skip
    trained = result.state.params
    after = float(eval_loss(trained))
    assert after < 0.7 * before
    np.testing.assert_array_equal(jax.tree.leaves(result.state.frozen)[0], jax.tree.leaves(den.params)[0])


def test_save_load_and_errors(den, heads, inputs, tmp_path):
    x, y = inputs
    path = tmp_path / "heads.npz"
    A.save_exit_heads(path, heads)
    back = A.load_exit_heads(path)
    assert set(back) == set(heads)
    shipped = A.load_exit_heads("digits_dit")  # the digits DiT's: 5 exits, width 128, head width 32
    assert shipped["adapt"].shape == (5, 128, 128) and shipped["wh"].shape == (5, 128, 32)
    assert A.early_exit(back, 0.3) == A.early_exit(heads, 0.3)  # compared by content
    assert hash(A.early_exit(back, 0.3)) == hash(A.early_exit(heads, 0.3))
    assert A.early_exit(back, 0.3) != A.early_exit(dict(heads, b2=heads["b2"] + 1), 0.3)
    s = S.get("dpm++2m")
    with pytest.raises(ValueError, match="threshold"):
        A.early_exit(heads, -0.1)
    with pytest.raises(TypeError, match="exit_heads"):
        A.early_exit([heads], 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        A.accelerate(s, A.early_exit({k: v[:1] for k, v in heads.items()}, 0.3), den, x, y)
    unet = M.UNet(
        M.UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                     attn_resolutions=(), num_groups=2),
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    with pytest.raises(ValueError, match="DiT"):
        A.exit_heads(unet)
    with pytest.raises(ValueError, match="num_classes"):
        A.exit_loss(den, label_dropout=0.1)
