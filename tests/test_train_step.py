"""The pure train step: accumulation, EMA, optimizer, determinism, the NNX contract."""

import _train_worker as W  # tiny MLP, deterministic data (tests/ is on sys.path under pytest)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdiff
from jdiff import train as T


def _loss():
    cfg = T.LossConfig(
        jdiff.vp_cosine(), prediction="v", weighting="min_snr", label_dropout=0.2, num_classes=W.NUM_CLASSES
    )
    return T.make_loss_fn(W.apply, cfg)


def _leaves_close(a, b, atol, rtol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


# The micro-batch gradients are the full-batch gradient summed in another order: relative
# error ~ u sqrt(B) (u = eps / 2, B = 16) of the summed per-sample gradients. Adam's
# update m / (sqrt(v) + eps) is scale-free, so a parameter moves by lr (1e-2) times that
# relative error per step: 2 steps * 1e-2 * 4 u ~ 1e-2 * 4 eps, i.e. ~5e-9 in float32
# and ~1e-17 in float64. The tolerances leave two orders of magnitude for the optimizer
# state, the clipping and the EMA (same bound) and for gradients that nearly cancel.
@pytest.mark.parametrize("dtype, atol", [("float64", 1e-13), ("float32", 1e-6)])
def test_gradient_accumulation_equals_full_batch_step(dtype, atol):
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        mesh = T.make_mesh(jax.devices()[:1])
        opt = T.make_optimizer(1e-2, warmup_steps=1, total_steps=10, weight_decay=1e-3, clip_norm=0.5)
        params = jax.tree.map(lambda p: p.astype(dt), W.init_params(0))
        state0 = T.replicate(T.init_train_state(params, opt, 7), mesh)
        out = {}
        for k in (1, 4):
            step = T.make_train_step(_loss(), opt, mesh=mesh, accum_steps=k, ema_decay=0.9, donate=False)
            state = state0
            for s in range(2):
                b = W.global_batch(s, 16)
                b["x"] = b["x"].astype(dt)
                state, metrics = step(state, b)
            out[k] = (state, metrics)
        (s1, m1), (s4, m4) = out[1], out[4]
        assert int(s1.step) == int(s4.step) == 2
        _leaves_close(s1.params, s4.params, atol)
        _leaves_close(s1.opt_state, s4.opt_state, atol)
        _leaves_close(s1.ema_params, s4.ema_params, atol)
        for name in ("loss", "mse", "grad_norm"):
            np.testing.assert_allclose(float(m1[name]), float(m4[name]), rtol=10 * atol)
        # and the step did something
        assert np.max(np.abs(np.asarray(s1.params["w1"]) - np.asarray(params["w1"]))) > 1e-3


def test_ema_matches_closed_form():
    """With plain SGD the parameter sequence p_1..p_n is known; the EMA must equal
    prod(d) * ema_0 + sum_k (1 - d_k) prod_{j>k} d_j p_k, with and without warmup."""
    opt = optax.sgd(0.1)
    loss = _loss()
    for warmup, decay in ((False, 0.8), (True, 0.95)):
        step = T.make_train_step(
            loss, opt, mesh=T.make_mesh(jax.devices()[:1]), ema_decay=decay, ema_warmup=warmup, donate=False
        )
        state = T.init_train_state(W.init_params(1), opt, 0)
        p0 = jax.tree.map(np.asarray, state.params)
        seq = []
        for s in range(6):
            state, _ = step(state, W.global_batch(s, 8))
            seq.append(jax.tree.map(lambda x: np.asarray(x, np.float64), state.params))
        ds = [min(decay, (1 + n) / (10 + n)) if warmup else decay for n in range(1, 7)]
        want = jax.tree.map(lambda x: np.asarray(x, np.float64) * np.prod(ds), p0)
        for k, pk in enumerate(seq):
            coef = (1 - ds[k]) * np.prod(ds[k + 1 :])
            want = jax.tree.map(lambda w, p: w + coef * p, want, pk)
        # float32 recurrence against the float64 closed form: each of the 6 updates rounds
        # d, d * e, (1 - d) * p and the sum (4 u, u = eps / 2) relative to max |p|, and
        # earlier errors are damped by d: at most 6 * 4 u = 12 eps32 * max |p|
        scale = max(float(np.max(np.abs(x))) for p in [p0] + seq for x in jax.tree.leaves(p))
        _leaves_close(state.ema_params, want, atol=12 * np.finfo(np.float32).eps * scale)
    np.testing.assert_allclose(float(T.ema_decay_at(1, 0.999, True)), 2 / 11, rtol=1e-6)
    np.testing.assert_allclose(float(T.ema_decay_at(10**6, 0.999, True)), 0.999, rtol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    sched = T.lr_schedule(1e-3, warmup_steps=10, total_steps=110, final_lr=1e-5)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-5)  # half way: cos = 0
    np.testing.assert_allclose(float(sched(110)), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(T.lr_schedule(2e-4)(1000)), 2e-4)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        T.lr_schedule(1e-3, warmup_steps=10, total_steps=5)


def test_optimizer_is_clip_then_adamw():
    kw = dict(warmup_steps=2, total_steps=20)
    mine = T.make_optimizer(1e-2, weight_decay=0.1, clip_norm=0.3, **kw)
    ref = optax.chain(
        optax.clip_by_global_norm(0.3),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20, 0.0), weight_decay=0.1),
    )
    p = {"a": jnp.ones(3), "b": jnp.arange(4.0)}
    sa, sb = mine.init(p), ref.init(p)
    for i in range(4):
        g = {"a": jnp.full(3, 10.0 ** (i - 1)), "b": jnp.linspace(-1, 1, 4) * (i + 1)}
        ua, sa = mine.update(g, sa, p)
        ub, sb = ref.update(g, sb, p)
        _leaves_close(ua, ub, atol=1e-9)


def test_metrics_report_lr_and_grad_norm():
    sched = T.lr_schedule(1e-2, warmup_steps=4)
    opt = T.make_optimizer(sched)
    step = T.make_train_step(_loss(), opt, mesh=T.make_mesh(jax.devices()[:1]), schedule=sched, donate=False)
    state = T.init_train_state(W.init_params(0), opt, 0)
    lrs = []
    for s in range(3):
        state, m = step(state, W.global_batch(s, 8))
        lrs.append(float(m["lr"]))
        assert float(m["grad_norm"]) > 0
    np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3], atol=1e-9)
    assert step.jitted._cache_size() == 1  # compiled once, not per step


def test_same_seed_same_result_and_seed_matters():
    def run(seed):
        data = lambda s: W.global_batch(s, 8, seed=3)
        return T.train(
            _loss(), W.init_params(0), data, 4, optimizer=T.make_optimizer(1e-2), seed=seed, handle_sigterm=False
        ).state

    a, b, c = run(11), run(11), run(12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.params["w1"]), np.asarray(c.params["w1"]))


def test_train_loop_callbacks_and_generator():
    data = lambda s: W.global_batch(s, 8)
    seen = []

    def cb(step, metrics, state):
        seen.append((step, int(state.step)))
        return step == 3  # ask to stop

    res = T.train(
        _loss(), W.init_params(0), data, 10, optimizer=T.make_optimizer(1e-3), callbacks=[cb], handle_sigterm=False
    )
    assert res.stopped and not res.preempted and res.step == 3 and seen == [(1, 1), (2, 2), (3, 3)]
    assert set(res.metrics) >= {"loss", "mse", "grad_norm"}
    gen = T.train_iter(_loss(), W.init_params(0), data, 2, optimizer=T.make_optimizer(1e-3), handle_sigterm=False)
    steps = [s for s, m, st in gen]
    assert steps == [1, 2]


def test_init_state_and_bad_inputs():
    opt = T.make_optimizer(1e-3)
    st = T.init_train_state(W.init_params(0), opt, jax.random.key(5), ema=False)
    assert st.ema_params is None and st.rng.dtype == jnp.uint32 and st.rng.shape == (2,)
    np.testing.assert_array_equal(st.rng, jax.random.key_data(jax.random.key(5)))
    step = T.make_train_step(_loss(), opt, mesh=T.make_mesh(jax.devices()[:1]), accum_steps=4, donate=False)
    st2, _ = step(st, W.global_batch(0, 8))
    assert st2.ema_params is None
    with pytest.raises(ValueError, match="not divisible by accum_steps=4"):
        step(st, W.global_batch(0, 6))
    bad = W.global_batch(0, 8)
    bad["label"] = bad["label"][:4]
    with pytest.raises(ValueError, match="same leading batch axis"):
        step(st, bad)


def test_nnx_model_through_split_and_merge():
    """The model contract with a Flax NNX module: params from nnx.split, apply through
    nnx.merge, dropout driven by the key (train) or off (key=None)."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, d, h, rngs):
            self.l1 = nnx.Linear(d + 1, h, rngs=rngs)
            self.drop = nnx.Dropout(0.1)  # the key comes with each call
            self.l2 = nnx.Linear(h, d, rngs=rngs)

        def __call__(self, x, t, key=None):
            h = nnx.gelu(self.l1(jnp.concatenate([x, t[:, None]], -1)))
            h = self.drop(h, deterministic=key is None, rngs=key)
            return self.l2(h)

    graphdef, params = nnx.split(MLP(2, 32, nnx.Rngs(0)))

    def apply(p, x, t, cond, key=None):
        return nnx.merge(graphdef, p)(x, t, key)

    x = jnp.ones((4, 2))
    t = jnp.full((4,), 0.5)
    np.testing.assert_array_equal(apply(params, x, t, None), apply(params, x, t, None))
    assert not np.array_equal(
        apply(params, x, t, None, jax.random.key(0)), apply(params, x, t, None, jax.random.key(1))
    )

    lf = T.make_loss_fn(apply, T.flow_matching_objective())
    data = lambda s: {"x": np.tile(np.array([[1.0, -1.0]], np.float32), (32, 1))}
    losses = []
    res = T.train(
        lf,
        params,
        data,
        60,
        optimizer=T.make_optimizer(1e-2, clip_norm=None),
        callbacks=[lambda s, m, st: losses.append(float(m["loss"]))],
        handle_sigterm=False,
    )
    assert isinstance(res.state.params, nnx.State)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])


# ------------------------------------------------------------------- frozen params


def _pull_toward_frozen(params, batch, keys, *, frozen):
    """A loss that reads frozen parameters: the squared distance of params to frozen
    (plus a batch-dependent term that does not involve frozen)."""
    dist = sum(jnp.sum((p - f) ** 2) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen), strict=True))
    data = 1e-3 * jnp.mean(batch["x"] @ params["w2"].T[:, :1])
    return dist + data, {"loss": dist + data, "dist": dist}


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.mark.parametrize("accum", [1, 2])
def test_frozen_params_reach_the_loss_and_never_change(accum):
    """The step passes state.frozen to the loss (a loss pulling params toward them
    converges to them), takes no gradient of them (the optimizer state covers params
    only) and returns them bit-for-bit unchanged, with the state donated."""
    opt = optax.sgd(0.2)
    frozen = W.init_params(5)
    before = _host(frozen)
    state = T.init_train_state(W.init_params(0), opt, 0, frozen=frozen)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt.init(W.init_params(0)))
    step = T.make_train_step(_pull_toward_frozen, opt, mesh=T.make_mesh(jax.devices()[:1]), accum_steps=accum)
    dists = []
    for s in range(25):
        state, m = step(state, W.global_batch(s, 8))
        dists.append(float(m["dist"]))
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # plain gradient descent on |p - f|^2 with rate 0.2 shrinks the distance by 0.6^2 per
    # step (up to the small data term): after 25 steps it is a tiny fraction of the start
    assert dists[-1] < 1e-6 * dists[0]
    assert step.jitted._cache_size() == 1


def test_frozen_needs_a_loss_that_takes_them():
    opt = optax.sgd(0.1)
    state = T.init_train_state(W.init_params(0), opt, 0, frozen=W.init_params(1))
    step = T.make_train_step(_loss(), opt, mesh=T.make_mesh(jax.devices()[:1]), donate=False)
    with pytest.raises(TypeError, match="frozen"):
        step(state, W.global_batch(0, 8))


def test_frozen_params_are_checkpointed_and_restored(tmp_path):
    """A run stopped half way and resumed (given other frozen values) restores the saved
    frozen parameters and ends bit-for-bit where an uninterrupted run ends."""
    opt = T.make_optimizer(1e-2)
    frozen = W.init_params(5)
    kw = dict(optimizer=opt, seed=3, handle_sigterm=False, async_checkpointing=False)
    data = lambda s: W.global_batch(s, 8)
    ref = T.train(_pull_toward_frozen, W.init_params(0), data, 6, frozen=frozen, **kw).state
    ckpt = str(tmp_path / "ckpt")
    T.train(_pull_toward_frozen, W.init_params(0), data, 3, frozen=frozen, checkpoint_dir=ckpt, **kw)
    decoy = jax.tree.map(jnp.zeros_like, frozen)
    res = T.train(_pull_toward_frozen, W.init_params(0), data, 6, frozen=decoy, checkpoint_dir=ckpt, **kw)
    assert res.step == 6
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(res.state.frozen), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the checkpoint holds them: restoring into a fresh target brings the saved values back
    with T.Checkpointer(ckpt) as ck:
        restored = ck.restore(T.init_train_state(W.init_params(0), opt, 3, frozen=decoy))
        assert restored.step == 6
        for a, b in zip(jax.tree.leaves(restored.state.frozen), jax.tree.leaves(frozen), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # a target without frozen parameters is a different run
        with pytest.raises(T.CheckpointMismatchError, match="frozen"):
            ck.restore(T.init_train_state(W.init_params(0), opt, 3))


def test_preference_loss_on_the_seam_trains_against_a_frozen_reference():
    """The Diffusion-DPO example of noise_batch's docstring, trained with train(...,
    frozen=reference): the preference margin grows (the model's error on the preferred
    samples falls relative to the rejected ones, measured against the reference) and the
    reference stays bit-for-bit as it was."""
    cfg = T.LossConfig(jdiff.vp_cosine(), prediction="eps")
    predict = T.prediction_fn(W.apply, cfg)

    def dpo_loss(params, batch, keys, *, frozen, beta=50.0):
        def err(p, x0):
            t, eps, x_t = T.noise_batch(cfg, x0, keys)
            target = jdiff.from_x0_eps(cfg.prediction, x0, eps, t, cfg.process)
            d = predict(p, x_t, t, batch["label"]) - target
            return jnp.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)

        w, l = batch["win"], batch["lose"]
        margin = (err(params, w) - err(frozen, w)) - (err(params, l) - err(frozen, l))
        loss = -jnp.mean(jax.nn.log_sigmoid(-beta * margin))
        return loss, {"loss": loss, "margin": jnp.mean(margin)}

    def data(step):
        b = W.global_batch(step, 16)
        return {"win": b["x"], "lose": -b["x"], "label": b["label"]}  # mirrored data is rejected

    ref = W.init_params(0)
    before = _host(ref)
    seen = []
    res = T.train(
        dpo_loss,
        W.init_params(0),
        data,
        30,
        optimizer=optax.adam(1e-2),
        frozen=ref,
        handle_sigterm=False,
        callbacks=[lambda s, m, st: seen.append((float(m["loss"]), float(m["margin"])))],
    )
    # at step 1 params == reference: margin 0 (differences of identical float32
    # computations), loss log 2 up to a few roundings (~eps32 = 1.2e-7): atol 1e-6
    np.testing.assert_allclose(seen[0], (np.log(2.0), 0.0), atol=1e-6)
    assert np.mean([m for _, m in seen[-5:]]) < 0 and np.mean([lo for lo, _ in seen[-5:]]) < 0.5 * np.log(2.0)
    for a, b in zip(jax.tree.leaves(res.state.frozen), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
