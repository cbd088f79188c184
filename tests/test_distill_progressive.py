"""Progressive distillation, guided distillation and MMD-DDM (jdiff.distill): every loss
against a hand computation on a linear model, the halving rounds, the w-conditioning,
the samplers' step counts, and short trainings that lower the loss."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdiff
from jdiff.distill import METHODS, DistillError, Teacher
from jdiff.distill import _guided as G
from jdiff.distill import _mmd as M
from jdiff.distill import _progressive as P
from jdiff.models import MLPResNet, MLPResNetConfig, functional
from jdiff.train import make_optimizer, noise_batch, train

PROC = jdiff.vp_cosine()


def lin(params, x, t, cond=None, key=None):
    """v prediction ``a x + b t`` (plus a per-class offset when labels are given)."""
    out = params["a"] * x + params["b"] * t[:, None]
    if cond is not None and "e" in params:
        out = out + params["e"][cond][:, None]
    return out


def lin_w(params, x, t, cond, key=None):
    """The w-conditioned linear student: ``a x + b t + e[label] + g w``."""
    return (
        params["a"] * x
        + params["b"] * t[:, None]
        + params["e"][cond["label"]][:, None]
        + params["g"] * cond["w"][:, None]
    )


def ab(process, t):
    """alpha, sigma of the cosine schedule (Nichol & Dhariwal 2021) in numpy float64."""
    s = process.s
    a = np.cos(np.pi / 2 * (np.asarray(t, np.float64) + s) / (1 + s)) / np.cos(np.pi / 2 * s / (1 + s))
    return a, np.sqrt(1.0 - a * a)


def x0_lin(p, x, t, label=None):
    """The linear model's x0 by hand: x0 = alpha x - sigma v (VP, v prediction)."""
    a, s = ab(PROC, t)
    v = p["a"] * x + p["b"] * np.asarray(t)[:, None]
    if label is not None:
        v = v + np.asarray(p["e"])[label][:, None]
    return a[:, None] * x - s[:, None] * v


def lin_teacher(params, num_classes=0):
    return Teacher(
        apply=lin, params=params, process=PROC, prediction="v", time_input="t", shape=(3,), num_classes=num_classes
    )


@pytest.fixture(scope="module")
def mlp_teacher():
    """A tiny class-conditional MLP (random output layer, so it is not identically 0)."""
    cfg = MLPResNetConfig(dim=2, width=8, num_blocks=1, num_classes=3)
    apply, abstract = functional(nnx.eval_shape(lambda: MLPResNet(cfg, rngs=nnx.Rngs(0))))
    shapes, tree = jax.tree.flatten(abstract)

    @jax.jit
    def init():  # random values for every parameter in one small program (no zero layers)
        keys = jax.random.split(jax.random.key(7), len(shapes))
        return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(shapes, keys)])

    return Teacher(apply=apply, params=init(), process=PROC, prediction="v", time_input="t", shape=(2,), num_classes=3)


# ------------------------------------------------------------------ progressive distillation


def hand_target(pt, z, t, tm, tn):
    """Salimans & Ho, Algorithm 2, written out: two DDIM steps of the teacher, then x~."""
    a, s = ab(PROC, t)
    am, sm = ab(PROC, tm)
    an, sn = ab(PROC, tn)
    c = lambda v: v[:, None]  # noqa: E731
    x1 = x0_lin(pt, z, t)
    zm = c(am) * x1 + c(sm / s) * (z - c(a) * x1)
    x2 = x0_lin(pt, zm, tm)
    zn = c(an) * x2 + c(sn / sm) * (zm - c(am) * x2)
    return (zn - c(sn / s) * z) / (c(an) - c(sn / s) * c(a))


def test_two_step_target_is_algorithm_2():
    pt = {"a": 0.3, "b": -0.2}
    with jax.enable_x64(True):
        z = np.random.default_rng(0).normal(size=(4, 3))
        t = np.array([0.9, 0.6, 0.4, 0.2])
        tm, tn = t - 0.1, np.array([0.7, 0.4, 0.2, 0.0])  # the last one ends at the data (sigma = 0)
        den = jdiff.Denoiser(lin, {k: jnp.float64(v) for k, v in pt.items()}, PROC, "v", "t")
        target = jax.jit(lambda *a: P.two_step_target(PROC, den, *a)[0])
        xt = target(jnp.asarray(z), jnp.asarray(t), jnp.asarray(tm), jnp.asarray(tn))
        np.testing.assert_allclose(np.asarray(xt), hand_target(pt, z, t, tm, tn), rtol=1e-10, atol=1e-12)
        # at sigma'' = 0 the target is the teacher's x0 prediction at t'
        np.testing.assert_allclose(np.asarray(xt)[3], x0_lin(pt, _zmid(pt, z, t, tm)[3:], tm[3:])[0])


def _zmid(pt, z, t, tm):
    a, s = ab(PROC, t)
    am, sm = ab(PROC, tm)
    x1 = x0_lin(pt, z, t)
    return am[:, None] * x1 + (sm / s)[:, None] * (z - a[:, None] * x1)


def test_progressive_loss_is_the_hand_computation():
    teacher_p, student_p = {"a": 0.3, "b": -0.2}, {"a": 0.1, "b": 0.4}
    with jax.enable_x64(True):
        T = lin_teacher({k: jnp.float64(v) for k, v in teacher_p.items()})
        setup = P.PROGRESSIVE.build(T, start_steps=8)
        x0 = np.random.default_rng(1).normal(size=(6, 3))
        keys = jax.random.split(jax.random.key(3), 6)
        params = {k: jnp.float64(v) for k, v in student_p.items()}
        loss, metrics = jax.jit(setup.loss_fn)(params, {"x": jnp.asarray(x0)}, keys, frozen=setup.frozen)
        i, eps = jax.jit(P.draw_steps, static_argnums=(1, 2))(keys, 4, (3,))
        g = np.asarray(P.student_grid(PROC, 8), np.float64)
        i = np.asarray(i)
        t, tm, tn = g[2 * i], g[2 * i + 1], g[2 * i + 2]
        a, s = ab(PROC, t)
        z = a[:, None] * x0 + s[:, None] * np.asarray(eps, np.float64)
        err = np.mean((x0_lin(student_p, z, t) - hand_target(teacher_p, z, t, tm, tn)) ** 2, axis=1)
        w = np.maximum(a**2 / s**2, 1.0)
        np.testing.assert_allclose(float(loss), np.mean(w * err), rtol=1e-9)
        np.testing.assert_allclose(float(metrics["mse"]), np.mean(err), rtol=1e-9)
        assert len(set(i.tolist())) > 1  # several student steps drawn
        # the student only: no gradient reaches the teacher
        gt = jax.jit(jax.grad(lambda f: setup.loss_fn(params, {"x": jnp.asarray(x0)}, keys, frozen=f)[0]))(setup.frozen)
        assert all(float(v) == 0.0 for v in jax.tree.leaves(gt))


def test_halving_rounds_and_grids():
    assert P.round_steps(16, 4) == [(16, 8), (8, 4), (4, 2), (2, 1)]
    T = lin_teacher({"a": jnp.float32(0.3), "b": jnp.float32(-0.2)})
    for k, (teach, stud) in enumerate(P.round_steps(4, 2)):
        s = P.PROGRESSIVE.build(T, start_steps=4, round=k)
        assert (s.steps, s.notes["teacher_steps"], s.notes["rounds"]) == (stud, teach, 2)
    # the student's grid is every other point of its teacher's (what the loss trains on)
    for kind, final in [("uniform", "data"), ("logsnr", "t_min")]:
        P.check_nested(PROC, 2, kind=kind, final=final)
    with pytest.raises(DistillError, match="not nested"):
        P.check_nested(PROC, 2, kind="logsnr", final="data")
    for bad, match in [
        (dict(start_steps=12, rounds=3), "rounds must be in 1..2"),
        (dict(start_steps=8, round=3), "round must be in 0..2"),
        (dict(start_steps=1), "start_steps"),
        (dict(steps=4), "unknown option"),
        (dict(weighting="snr"), "unknown weighting"),
    ]:
        with pytest.raises(DistillError, match=match):
            P.PROGRESSIVE.build(T, **bad)


def test_student_sampler_step_counts():
    T = lin_teacher({"a": jnp.float32(0.3), "b": jnp.float32(-0.2)})
    noise = jax.random.normal(jax.random.key(0), (5, 3))
    with pytest.raises(DistillError, match="trained for 2 step"):
        P.PROGRESSIVE.sample(T, T.params, noise, steps=4, trained_steps=2)
    with pytest.raises(DistillError, match="positive integer"):
        P.PROGRESSIVE.sample(T, T.params, noise, steps=0, trained_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = P.PROGRESSIVE.sample(T, T.params, noise, steps=1, trained_steps=2)  # fewer: allowed, no warning
        two = P.PROGRESSIVE.sample(T, T.params, noise, steps=2, trained_steps=2)
    # one step on the uniform grid to the data is the x0 prediction at t_max
    tmax = float(P.student_grid(PROC, 1)[0])
    np.testing.assert_allclose(
        np.asarray(one), x0_lin({"a": 0.3, "b": -0.2}, np.asarray(noise), np.full(5, tmax)), atol=1e-5
    )
    ref, info = jdiff.sample(jdiff.solvers.ddim(), T.denoiser(), noise, P.student_grid(PROC, 2), return_info=True)
    np.testing.assert_allclose(np.asarray(two), np.asarray(ref), atol=1e-6)
    assert int(info.nfe) == 2


# ------------------------------------------------------------------------ guided distillation


def test_guided_target_and_loss_are_the_hand_computation():
    tp = {"a": 0.3, "b": -0.2, "e": np.array([0.5, -0.4, 0.2, 0.0])}  # row 3: the null class
    sp = {"a": 0.1, "b": 0.4, "e": np.array([0.1, 0.2, -0.3, 0.0]), "g": 0.25}
    with jax.enable_x64(True):
        f64 = lambda d: {k: jnp.asarray(v, jnp.float64) for k, v in d.items()}  # noqa: E731
        x0 = np.random.default_rng(2).normal(size=(6, 3))
        labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
        keys = jax.random.split(jax.random.key(5), 6)
        loss_fn = G.make_guided_loss(lin_w, lin, PROC, prediction="v", num_classes=3, w_min=1.0, w_max=4.0)
        batch = {"x": jnp.asarray(x0), "label": jnp.asarray(labels)}
        den = jdiff.Denoiser(lin, f64(tp), PROC, "v", "t")

        @jax.jit
        def run(sp, tp, batch, keys):
            loss, _ = loss_fn(sp, batch, keys, frozen=tp)
            t, _, z = noise_batch(PROC, batch["x"], keys)
            w = G.draw_w(keys, 1.0, 4.0)
            return loss, t, z, w, G.guided_target(den.replace(params=tp), z, t, batch["label"], w, 3)

        loss, t, z, w, got = run(f64(sp), f64(tp), batch, keys)
        t, z, w = (np.asarray(v, np.float64) for v in (t, z, w))
        assert np.all((w >= 1.0) & (w <= 4.0)) and np.ptp(w) > 0.5
        xc, xu = x0_lin(tp, z, t, labels), x0_lin(tp, z, t, np.full(6, 3))
        target = xu + w[:, None] * (xc - xu)  # classifier-free guidance by hand
        np.testing.assert_allclose(np.asarray(got), target, rtol=1e-10, atol=1e-12)
        a, s = ab(PROC, t)
        v = sp["a"] * z + sp["b"] * t[:, None] + sp["e"][labels][:, None] + sp["g"] * w[:, None]
        x_hat = a[:, None] * z - s[:, None] * v
        want = np.mean(np.maximum(a**2 / s**2, 1) * np.mean((x_hat - target) ** 2, axis=1))
        np.testing.assert_allclose(float(loss), want, rtol=1e-9)


def test_w_conditioning_at_init_is_the_network_bit_for_bit(mlp_teacher):
    T = mlp_teacher
    setup = G.GUIDED.build(T, start_steps=4)
    apply = jax.jit(G.guided_apply(T))
    x = jax.random.normal(jax.random.key(1), (6, 2))
    t = jnp.linspace(0.05, 0.95, 6)
    y = jnp.array([0, 1, 2, 3, 1, 0], jnp.int32)
    teacher_apply = jax.jit(T.apply)
    ref = np.asarray(teacher_apply(T.params, x, t, y))
    assert np.abs(ref).max() > 0.1
    for w in (0.0, 1.0, 2.5, 7.0):
        out = np.asarray(apply(setup.params, x, t, {"label": y, "w": jnp.full((6,), w)}))
        assert np.array_equal(out, ref)
    assert np.array_equal(np.asarray(teacher_apply(T.params, x, t, y)), ref)  # the teacher itself is untouched
    # a trained embedding does condition on w
    p = dict(setup.params)
    p["w"] = jax.tree.map(lambda a: a + 0.3, setup.params["w"])
    o1 = np.asarray(apply(p, x, t, {"label": y, "w": jnp.full((6,), 1.0)}))
    o2 = np.asarray(apply(p, x, t, {"label": y, "w": jnp.full((6,), 3.0)}))
    assert np.abs(o1 - o2).max() > 1e-3


def test_guided_options_and_sampler(mlp_teacher):
    T = mlp_teacher
    with pytest.raises(DistillError, match="class-conditional"):
        G.GUIDED.build(lin_teacher({"a": 0.3, "b": 0.1}))
    with pytest.raises(DistillError, match="not a jdiff model"):
        G.GUIDED.build(lin_teacher({"a": 0.3, "b": 0.1}, num_classes=3))
    with pytest.raises(DistillError, match="w_min"):
        G.GUIDED.build(T, w_min=3.0, w_max=1.0)
    with pytest.raises(DistillError, match="needs teacher_params"):
        G.GUIDED.build(T, stage="progressive")
    s1 = G.GUIDED.build(T, start_steps=4)
    s2 = G.GUIDED.build(T, stage="progressive", start_steps=4, round=1, teacher_params=s1.params)
    assert (s1.steps, s2.steps) == (4, 1)
    noise = jax.random.normal(jax.random.key(2), (3, 2))
    with pytest.raises(DistillError, match="trained for 1 step"):
        G.GUIDED.sample(T, s2.params, noise, steps=2, trained_steps=1)
    x = G.GUIDED.sample(T, s2.params, noise, steps=1, trained_steps=1, cond=jnp.array([0, 1, 2]), guidance=2.0)
    assert x.shape == (3, 2) and np.all(np.isfinite(np.asarray(x)))


# ------------------------------------------------------------------------------------- MMD


def test_mmd_is_the_explicit_double_sum():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
    poly = lambda a, b: (a @ b / 3 + 1.0) ** 3  # noqa: E731
    rbf = lambda a, b: sum(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)) for s in (0.5, 2.0))  # noqa: E731

    def explicit(k):
        m, n = len(x), len(y)
        sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
        return sxx + syy - 2 * sxy

    with jax.enable_x64(True):
        X, Y = jnp.asarray(x), jnp.asarray(y)

        @jax.jit
        def both(X, Y):
            k1, k2 = M.make_kernel("poly"), M.make_kernel("rbf", bandwidths=(0.5, 2.0))
            return M.mmd2_unbiased(X, Y, k1), M.mmd2_unbiased(X, Y, k2), M.median_bandwidths(X, Y)

        got_poly, got_rbf, med = both(X, Y)
        np.testing.assert_allclose(float(got_poly), explicit(poly), rtol=1e-10)
        np.testing.assert_allclose(float(got_rbf), explicit(rbf), rtol=1e-10)
        z = np.concatenate([x, y])
        d2 = [np.sum((z[i] - z[j]) ** 2) for i in range(9) for j in range(9) if i != j]
        np.testing.assert_allclose(
            np.asarray(M.median_bandwidths(X, Y)), np.sqrt(np.median(d2)) * np.array([0.5, 1, 2])
        )
    with pytest.raises(DistillError, match="at least 2"):
        M.mmd2_unbiased(X[:1], Y, M.make_kernel("poly"))


def test_mmd_loss_is_the_hand_computation():
    p = {"a": 0.3, "b": -0.2}
    with jax.enable_x64(True):
        T = lin_teacher({k: jnp.float64(v) for k, v in p.items()})
        setup = M.MMD.build(T, steps=1, features="pixels", kernel="poly")
        assert setup.frozen is None and setup.steps == 1
        y = np.random.default_rng(4).normal(size=(5, 3))
        keys = jax.random.split(jax.random.key(9), 5)
        loss, _ = jax.jit(setup.loss_fn)(setup.params, {"x": jnp.asarray(y)}, keys)
        noise = np.asarray(M.draw_noise(keys, (3,)), np.float64)
        tmax = float(P.student_grid(PROC, 1)[0])
        x = x0_lin(p, noise, np.full(5, tmax))  # one DDIM step to the data: the x0 prediction at t_max
        k = lambda u, v: (u @ v / 3 + 1.0) ** 3  # noqa: E731
        sxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
        syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
        sxy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
        np.testing.assert_allclose(float(loss), sxx + syy - 2 * sxy, rtol=1e-8)


def test_mmd_options_and_sampler():
    T = lin_teacher({"a": jnp.float32(0.3), "b": jnp.float32(-0.2)})
    with pytest.raises(DistillError, match="digits"):
        M.MMD.build(T)  # the digits features need 8x8x1 images
    with pytest.raises(DistillError, match="unknown kernel"):
        M.MMD.build(T, features="pixels", kernel="laplace")
    with pytest.raises(DistillError, match="unknown option"):
        M.MMD.build(T, features="pixels", bandwidth=1.0)
    noise = jax.random.normal(jax.random.key(0), (4, 3))
    with pytest.raises(DistillError, match="trained for 2 step"):
        M.MMD.sample(T, T.params, noise, steps=3, trained_steps=2)
    assert M.MMD.sample(T, T.params, noise, steps=2, trained_steps=2).shape == (4, 3)
    assert {"progressive", "guided", "mmd"} <= set(METHODS)


# -------------------------------------------------------------------------- short trainings


def _fit(setup, batch, steps=30):
    """Train ``steps`` updates on one batch; the losses seen at the first and the last
    three steps (one compiled program: the train step's)."""
    losses = []
    train(
        setup.loss_fn,
        setup.params,
        lambda step: batch,
        steps,
        optimizer=OPT,
        frozen=setup.frozen,
        ema_decay=None,
        callbacks=[lambda step, metrics, state: losses.append(float(metrics["loss"]))],
    )
    return np.mean(losses[:3]), np.mean(losses[-3:])


def lin_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (0.8 * np.eye(3)[y] - 0.3 + 0.1 * rng.normal(size=(n, 3))).astype(np.float32)
    return {"x": jnp.asarray(x), "label": jnp.asarray(y)}


OPT = make_optimizer(3e-2, clip_norm=None)


def test_progressive_rounds_chain_the_students():
    T = lin_teacher({"a": jnp.float32(0.3), "b": jnp.float32(-0.2)})
    seen = []
    build = P.PROGRESSIVE.build

    class Spy(P.ProgressiveRecipe):
        def build(self, teacher, **options):
            seen.append((options["round"], options["teacher_params"]))
            return build(teacher, **options)

    # no updates: each round's student is its teacher, so the chaining is visible as identity
    out = P.progressive_rounds(
        T, lambda step: lin_data(), steps_per_round=0, optimizer=OPT, recipe=Spy(), start_steps=8, rounds=3
    )
    assert [r.steps for r in out] == [4, 2, 1]
    assert [k for k, _ in seen] == [0, 1, 2]
    assert seen[0][1] is T.params
    for (_, teacher_params), previous in zip(seen[1:], out[:-1]):
        assert teacher_params is previous.params  # round k + 1's teacher is round k's student


def test_progressive_training_lowers_the_loss():
    batch = lin_data()
    T = lin_teacher({"a": jnp.float32(0.3), "b": jnp.float32(-0.2)})
    setup = P.PROGRESSIVE.build(T, start_steps=4, rounds=2)
    before, after = _fit(setup, batch)
    assert after < 0.7 * before, (before, after)


def test_guided_and_mmd_training_lower_the_loss():
    batch = lin_data()
    f32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}  # noqa: E731
    tp = f32({"a": 0.3, "b": -0.2, "e": [0.5, -0.4, 0.2, 0.0]})
    guided = P.Setup(
        params=f32({"a": 0.3, "b": -0.2, "e": [0.5, -0.4, 0.2, 0.0], "g": 0.0}),
        frozen=tp,
        loss_fn=G.make_guided_loss(lin_w, lin, PROC, prediction="v", num_classes=3, w_min=1.0, w_max=3.0),
    )
    mmd = M.MMD.build(lin_teacher(tp, 3), steps=2, features="pixels", kernel="rbf", bandwidths=(0.5, 1.0))
    for name, setup in (("guided", guided), ("mmd", mmd)):
        before, after = _fit(setup, batch)
        assert after < 0.7 * before, (name, before, after)
