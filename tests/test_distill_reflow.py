"""Reflow and SlimFlow (jdiff.distill._reflow) and any process read as a rectified flow
(jdiff.distill._rectify): losses against hand computations on a linear velocity, the
VP -> rectified-flow change of variables on the exact testbed, straightening by one
reflow of a tiny MLP, and the students' step counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdiff
from jdiff import testbed
from jdiff._random import per_sample_keys
from jdiff.distill import METHODS, DistillError, Teacher
from jdiff.distill import _reflow as R
from jdiff.distill._rectify import (
    generate_pairs,
    process_time,
    rectified_apply,
    rectified_time,
    rectified_view,
    straightness,
    velocity_of,
)


def linear_velocity(params, x, s, cond=None):
    return params["a"] * x + params["b"] * s.reshape(s.shape + (1,) * (x.ndim - 1))


def _fixed(n=4, d=3, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)), r.normal(size=(n, d)), r.uniform(0.05, 0.95, size=n)


P = {"a": 0.7, "b": -0.3}


def test_reflow_loss_is_hand_computation():
    with jax.enable_x64(True):
        z, x, s = _fixed()
        got = R.reflow_loss(linear_velocity, P, jnp.asarray(z), jnp.asarray(x), jnp.asarray(s))
        xs = (1 - s[:, None]) * x + s[:, None] * z
        v = P["a"] * xs + P["b"] * s[:, None]
        want = np.mean((v - (z - x)) ** 2, axis=1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


def test_distill_and_flow_guided_losses_are_hand_computations():
    with jax.enable_x64(True):
        z, x, m = _fixed(seed=1)
        flow = {"a": -0.2, "b": 0.5}
        d = R.distill_loss(linear_velocity, P, jnp.asarray(z), jnp.asarray(x))
        x_hat = z - (P["a"] * z + P["b"])
        np.testing.assert_allclose(np.asarray(d), np.mean((x_hat - x) ** 2, axis=1), rtol=1e-13)
        # two Euler steps of the flow: 1 -> m -> 0
        x_mid = z - (1 - m[:, None]) * (flow["a"] * z + flow["b"])
        target = x_mid - m[:, None] * (flow["a"] * x_mid + flow["b"] * m[:, None])
        got_t = R.two_step_target(linear_velocity, flow, jnp.asarray(z), jnp.asarray(m))
        np.testing.assert_allclose(np.asarray(got_t), target, rtol=1e-13)
        fg = R.flow_guided_loss(linear_velocity, P, flow, jnp.asarray(z), jnp.asarray(x), jnp.asarray(m), weight=0.5)
        want = np.mean((x_hat - x) ** 2, axis=1) + 0.5 * np.mean((x_hat - target) ** 2, axis=1)
        np.testing.assert_allclose(np.asarray(fg), want, rtol=1e-13)
        # the target is a constant of the gradient: d/da of the mean = hand derivative
        g = jax.grad(lambda p: jnp.mean(R.flow_guided_loss(linear_velocity, p, flow, z, x, m, weight=0.5)))(P)
        dxa = -z  # d x_hat / d a
        ga = np.mean(np.mean(2 * (x_hat - x) * dxa + 0.5 * 2 * (x_hat - target) * dxa, axis=1))
        np.testing.assert_allclose(float(g["a"]), ga, rtol=1e-12)


def test_annealing_noise_and_schedule():
    z, xi = jnp.ones((2, 3)), 2 * jnp.ones((2, 3))
    np.testing.assert_allclose(R.anneal_noise(z, xi, 0.6), np.sqrt(1 - 0.36) * 1 + 0.6 * 2, rtol=1e-6)
    np.testing.assert_allclose(R.anneal_beta(jnp.array([0, 250, 1000, 2000]), 1000), [1, 0.75, 0, 0], atol=1e-7)
    np.testing.assert_allclose(R.anneal_beta(500, 1000, "cosine"), 0.5, atol=1e-7)
    np.testing.assert_allclose(R.anneal_beta(1000, 1000, "exp"), np.exp(-1), rtol=1e-6)
    assert float(R.anneal_beta(5, 0)) == 0.0
    with pytest.raises(DistillError, match="anneal"):
        R.anneal_beta(0, 10, "step")


# ------------------------------------------------------------- recipes on a linear net


def _linear_teacher(d=3, num_classes=0):
    def apply(params, x, t, cond=None, key=None):
        return linear_velocity(params, x, t)

    return Teacher(
        apply, {"a": jnp.float32(0.7), "b": jnp.float32(-0.3)}, jdiff.rectified_flow(), "flow", "t", (d,), num_classes
    )


@pytest.fixture(scope="module")
def lin_pairs():
    z, x, _ = _fixed(n=5)
    return {"z": z.astype(np.float32), "x": x.astype(np.float32), "label": np.zeros(5, np.int32)}


def test_rectified_apply_of_a_flow_teacher_is_the_network():
    te = _linear_teacher()
    rf = rectified_apply(te.apply, te.process, te.prediction, te.time_input)
    x, _, s = _fixed(n=4, seed=3)
    x, s = jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32)
    np.testing.assert_allclose(rf(te.params, x, s), linear_velocity(te.params, x, s), rtol=1e-6, atol=1e-6)


def test_reflow_recipe_loss_draws_pairs_and_times_per_key(lin_pairs):
    te = _linear_teacher()
    setup = METHODS["reflow"].build(te, pairs=lin_pairs)
    assert setup.steps == 4 and setup.notes["num_pairs"] == 5
    keys = per_sample_keys(jax.random.key(3), 6)
    loss, metrics = jax.jit(setup.loss_fn)(setup.params, {"x": jnp.zeros((6, 3))}, keys, frozen=setup.frozen)
    idx = np.asarray(jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, R._K_PAIR), (), 0, 5))(keys))
    s = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, R._K_TIME), (), R._float(), 1e-3, 1.0))(keys)
    s = np.asarray(s, np.float64)
    z, x = lin_pairs["z"][idx].astype(np.float64), lin_pairs["x"][idx].astype(np.float64)
    xs = (1 - s[:, None]) * x + s[:, None] * z
    want = np.mean((0.7 * xs - 0.3 * s[:, None] - (z - x)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    # the distillation stage: one Euler step on the same pairs
    d = METHODS["reflow"].build(te, pairs=lin_pairs, stage="distill")
    assert d.steps == 1
    loss_d, _ = jax.jit(d.loss_fn)(d.params, {"x": jnp.zeros((6, 3))}, keys, frozen=d.frozen)
    want_d = np.mean((z - (0.7 * z - 0.3) - x) ** 2)
    np.testing.assert_allclose(float(loss_d), want_d, rtol=2e-5)


def test_reflow_student_takes_euler_steps_and_refuses_more_than_trained():
    te = _linear_teacher()
    z = jnp.asarray(_fixed(n=3, seed=4)[0], jnp.float32)
    for k in (1, 4):
        got = METHODS["reflow"].sample(te, te.params, z, steps=k, trained_steps=4)
        x = np.asarray(z, np.float64)
        for i in range(k):
            s = 1 - i / k
            x = x - (1 / k) * (0.7 * x - 0.3 * s)
        np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-6)
    with pytest.raises(DistillError, match="at most 1 step"):
        METHODS["reflow"].sample(te, te.params, z, steps=2, trained_steps=1)
    with pytest.raises(DistillError, match="positive integer"):
        METHODS["reflow"].sample(te, te.params, z, steps=0, trained_steps=4)


def test_bad_options_are_distill_errors(lin_pairs):
    te = _linear_teacher()
    with pytest.raises(DistillError, match="unknown option"):
        METHODS["reflow"].build(te, pairs=lin_pairs, nfe=3)
    with pytest.raises(DistillError, match="stage"):
        METHODS["reflow"].build(te, pairs=lin_pairs, stage="both")
    with pytest.raises(DistillError, match="data shape"):
        METHODS["reflow"].build(_linear_teacher(d=2), pairs=lin_pairs)
    with pytest.raises(DistillError, match="needs a teacher read from a run"):
        METHODS["slimflow"].build(te, pairs=lin_pairs)


# ------------------------------------------------------- the change of variables, exact


@pytest.fixture(scope="module")
def mix():
    means = [[-1.2, 0.3], [0.8, 1.1], [0.6, -1.4]]
    stds = [[0.3, 0.45], [0.25, 0.3], [0.5, 0.35]]
    return testbed.GaussianMixture([0.3, 0.45, 0.25], means, stds)


def test_vp_teacher_read_as_rectified_flow_is_exact(mix):
    with jax.enable_x64(True):
        vp = jdiff.vp_cosine()
        view = rectified_view(testbed.ExactDenoiser(mix, vp))
        # pointwise: the exact rectified-flow denoiser of the same data
        x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
        s = jnp.linspace(0.02, 0.98, 6)
        p, q = jax.jit(lambda x, s: (view(x, s), mix.posterior(x, s, jdiff.rectified_flow())))(x, s)
        np.testing.assert_allclose(np.asarray(p.x0), np.asarray(q.x0), atol=1e-13)
        np.testing.assert_allclose(np.asarray(p.eps), np.asarray(q.eps), atol=1e-13)
        np.testing.assert_allclose(np.asarray(rectified_time(vp, process_time(vp, s))), np.asarray(s), atol=1e-14)
        # transport: Heun in s on the rectified-flow velocity, started at x_T / (alpha + sigma),
        # lands on the VP ODE's point at rho = sigma / alpha = 1.5 (times alpha + sigma there)
        # to the solver's error (second order: 4e-4 at 32 steps, 1e-4 at 64). The VP side is
        # solved in its own coordinates by DPM-Solver++(3M) on 256 log-SNR steps (third
        # order: agrees with the adaptive diffrax reference to 1e-6, without compiling it).
        xT = jax.random.normal(jax.random.key(2), (8, 2), jnp.float64)
        tT, t1 = jnp.asarray(vp.t_max, jnp.float64), vp.t_of_rho(jnp.asarray(1.5, jnp.float64))
        c_T, c_1 = vp.alpha(tT) + vp.sigma(tT), vp.alpha(t1) + vp.sigma(t1)
        vp_grid = jdiff.time_grid(vp, 256, kind="logsnr", t_end=float(t1), dtype=jnp.float64)
        ref = jdiff.sample(jdiff.solvers.get("dpm++3m"), testbed.ExactDenoiser(mix, vp), xT, vp_grid)
        grid = rectified_time(vp, jdiff.time_grid(vp, 64, kind="logsnr", t_end=float(t1), dtype=jnp.float64))
        b = jdiff.sample(jdiff.solvers.heun(), view, xT / c_T, grid)
        assert float(jnp.max(jnp.abs(b * c_1 - ref))) < 3e-4


# ------------------------------------------------------- one reflow straightens paths


def _mlp_init(key, width=64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (4, width)) * 0.5,
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(k2, (width, width)) / np.sqrt(width),
        "b2": jnp.zeros(width),
        "w3": jax.random.normal(k3, (width, 2)) * 0.1 / np.sqrt(width),
        "b3": jnp.zeros(2),
    }


def mlp_velocity(p, x, s, cond=None):
    h = jnp.concatenate([x, s[:, None], jnp.cos(jnp.pi * s)[:, None]], axis=1)
    h = jax.nn.silu(h @ p["w1"] + p["b1"])
    h = jax.nn.silu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def test_one_reflow_of_a_tiny_mlp_straightens_the_paths(mix, tmp_path):
    vp = jdiff.vp_cosine()
    teacher = testbed.ExactDenoiser(mix, vp)
    ddim = jdiff.solvers.ddim()
    pairs = generate_pairs(teacher, 1024, (2,), key=jax.random.key(5), solver=ddim, nfe=12, batch=512)
    assert pairs["z"].shape == pairs["x"].shape == (1024, 2)
    # deterministic per key: the first m of n pairs are the pairs of m; a cache file is
    # reused only for the same tag
    f = str(tmp_path / "pairs.npz")
    again = generate_pairs(teacher, 600, (2,), key=jax.random.key(5), solver=ddim, nfe=12, batch=512, path=f, tag="a")
    np.testing.assert_array_equal(again["z"], pairs["z"][:600])
    np.testing.assert_allclose(again["x"], pairs["x"][:600], atol=1e-6)
    assert str(np.load(f)["tag"]) == "a"
    other = generate_pairs(teacher, 600, (2,), key=jax.random.key(6), solver=ddim, nfe=12, batch=512, path=f, tag="a")
    np.testing.assert_array_equal(other["z"], again["z"])  # loaded: the same tag
    other = generate_pairs(teacher, 600, (2,), key=jax.random.key(6), solver=ddim, nfe=12, batch=512, path=f, tag="b")
    assert not np.array_equal(other["z"], again["z"]) and str(np.load(f)["tag"]) == "b"

    z, x = jnp.asarray(pairs["z"]), jnp.asarray(pairs["x"])
    opt = optax.adam(3e-3)
    params = _mlp_init(jax.random.key(6))
    state = opt.init(params)

    def step(carry, key):
        params, state = carry
        ki, ks = jax.random.split(key)
        idx = jax.random.randint(ki, (256,), 0, z.shape[0])
        s = jax.random.uniform(ks, (256,), minval=1e-3, maxval=1.0)
        loss, g = jax.value_and_grad(lambda p: jnp.mean(R.reflow_loss(mlp_velocity, p, z[idx], x[idx], s)))(params)
        upd, state = opt.update(g, state)
        return (optax.apply_updates(params, upd), state), loss

    train = jax.jit(lambda c, keys: jax.lax.scan(step, c, keys))
    (params, state), losses = train((params, state), jax.random.split(jax.random.key(100), 400))
    losses = np.asarray(losses)
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:20])

    view = rectified_view(teacher)
    z_test = jax.random.normal(jax.random.key(7), (256, 2))
    s1, _ = straightness(
        lambda xx, s, c: velocity_of(view, xx, s, c), z_test * view.process.prior_std(), s_max=view.process.t_max
    )
    s2, _ = straightness(lambda xx, s, c: mlp_velocity(params, xx, s), z_test)
    assert float(s2) < 0.5 * float(s1), (float(s1), float(s2))
    # and the straight paths go where the teacher's go: one Euler step of the 2-rectified
    # flow is much closer to the teacher's ODE end than one Euler step of the teacher
    one_rf = z[:256] - mlp_velocity(params, z[:256], jnp.ones(256))
    zt, s_max = z[:256] * view.process.prior_std(), view.process.t_max
    one_teacher = zt - s_max * velocity_of(view, zt, jnp.full((256,), s_max))
    err_rf = float(jnp.mean(jnp.sum((one_rf - x[:256]) ** 2, axis=1)))
    err_t = float(jnp.mean(jnp.sum((one_teacher - x[:256]) ** 2, axis=1)))
    assert err_rf < 0.5 * err_t, (err_rf, err_t)


# ----------------------------------------------------- SlimFlow on a small MLP run


def test_slimflow_builds_a_narrower_student_anneals_and_distills(mix):
    """The toy2d preset's MLP (rectified flow) with width 16 as the teacher (abstract
    parameters: the pairs are given); the student has width 8."""
    from jdiff.runs import get_preset
    from jdiff.runs._build import build_run
    from jdiff.runs._config import set_value

    cfg = set_value(set_value(get_preset("toy2d"), "model.mlp.width", "16"), "model.mlp.num_blocks", "1")
    run = build_run(cfg, with_data=False, data_shape=(2,), num_classes=0, abstract=True)
    te = Teacher(run.apply, run.params, run.process, "flow", "t", (2,), 0, run=run)
    r = np.random.default_rng(8)
    pairs = {"z": r.normal(size=(16, 2)), "x": r.normal(size=(16, 2)), "label": np.zeros(16, np.int32)}
    rec = METHODS["slimflow"]
    setup = rec.build(te, pairs=pairs, width=8, anneal_steps=4)
    assert setup.notes["width"] == 8 and setup.notes["teacher_width"] == 16
    assert jax.tree.leaves(setup.params["proj_in"]["kernel"])[0].shape == (2, 8)
    keys = per_sample_keys(jax.random.key(0), 4)
    loss = jax.jit(setup.loss_fn)
    # the annealing clock is the train state's step, passed by train_step to a loss that reads it
    assert setup.batch_fn is None and setup.loss_fn.reads_step
    b = {"x": np.zeros((4, 2), np.float32)}
    _, m0 = loss(setup.params, b, keys, frozen=setup.frozen, step=0)
    _, m2 = loss(setup.params, b, keys, frozen=setup.frozen, step=2)
    np.testing.assert_allclose([float(m0["beta"]), float(m2["beta"])], [1.0, 0.5])
    with pytest.raises(DistillError, match="needs flow="):
        rec.build(te, pairs=pairs, width=8, stage="distill")
    d = rec.build(te, pairs=pairs, width=8, stage="distill", flow=setup.params)
    assert d.steps == 1 and d.frozen["flow"] is setup.params
    out = rec.sample(te, setup.params, jnp.asarray(pairs["z"][:3], jnp.float32), steps=1, trained_steps=1)
    assert out.shape == (3, 2) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(DistillError, match="at most 1 step"):
        rec.sample(te, setup.params, jnp.asarray(pairs["z"][:3], jnp.float32), steps=2, trained_steps=1)
