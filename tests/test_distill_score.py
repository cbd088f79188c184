"""Score distillation into a one-step generator (jdiff.distill._score): the VSD surrogate's
gradient is the stated formula, the whole loss equals a hand computation on a linear
network (generator and aux gradients included), a short training moves a one-step
generator onto the teacher's Gaussian, and the one-step sampler refuses more steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdiff
from jdiff._random import per_sample_keys
from jdiff.distill import METHODS, DistillError, Teacher
from jdiff.distill import _score as S


def test_vsd_surrogate_gradient_is_the_given_gradient():
    with jax.enable_x64(True):
        r = np.random.default_rng(0)
        x0, g = jnp.asarray(r.normal(size=(4, 3))), jnp.asarray(r.normal(size=(4, 3)))
        val, grad = jax.value_and_grad(lambda x: jnp.sum(S.vsd_surrogate(x, g)))(x0)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(g), rtol=1e-15)
        np.testing.assert_allclose(float(val), 0.5 * float(jnp.sum(g * g)), rtol=1e-14)
        w = jnp.asarray([0.5, 1.0, 2.0, 3.0])
        et, ea = jnp.asarray(r.normal(size=(4, 3))), jnp.asarray(r.normal(size=(4, 3)))
        np.testing.assert_allclose(np.asarray(S.vsd_gradient(et, ea, w)), np.asarray(w)[:, None] * (et - ea))


def _linear_teacher():
    def apply(p, x, t, cond=None, key=None):
        return p["a"] * x + p["b"] * t[:, None]

    return Teacher(apply, {"a": 0.8, "b": 0.1}, jdiff.vp_cosine(), "x0", "t", (3,), 0)


def test_loss_and_both_gradients_are_hand_computations():
    with jax.enable_x64(True):
        te = _linear_teacher()
        setup = METHODS["score_distillation"].build(te, t_range=(0.1, 0.9))
        params = {"generator": {"a": 0.9, "b": 0.2}, "aux": {"a": 0.6, "b": -0.1}}
        keys = per_sample_keys(jax.random.key(1), 5)
        vg = jax.jit(jax.value_and_grad(lambda p, k: setup.loss_fn(p, {}, k, frozen=setup.frozen), has_aux=True))
        (loss, m), g = vg(params, keys)
        vp = te.process
        f = lambda c, shape: np.asarray(S._normal(keys, c, shape), np.float64)  # noqa: E731
        lo = vp.t_min + 0.1 * (vp.t_max - vp.t_min)
        hi = vp.t_min + 0.9 * (vp.t_max - vp.t_min)
        t = np.asarray(S._uniform(keys, S._K_T, lo, hi), np.float64)
        t2 = np.asarray(S._uniform(keys, S._K_T2, vp.t_min, vp.t_max), np.float64)
        z, eps, eps2 = f(S._K_Z, (3,)), f(S._K_EPS, (3,)), f(S._K_EPS2, (3,))
        al, sg = (np.asarray(c(jnp.asarray(t)))[:, None] for c in (vp.alpha, vp.sigma))
        al2, sg2 = (np.asarray(c(jnp.asarray(t2)))[:, None] for c in (vp.alpha, vp.sigma))
        x0 = 0.9 * z + 0.2 * vp.t_max
        xt = al * x0 + sg * eps
        eps_t = (xt - al * (0.8 * xt + 0.1 * t[:, None])) / sg
        eps_a = (xt - al * (0.6 * xt - 0.1 * t[:, None])) / sg
        grad = (sg / al) * (eps_t - eps_a)
        l_gen = np.mean(0.5 * np.sum(grad**2, axis=1))
        xt2 = al2 * x0 + sg2 * eps2
        out = 0.6 * xt2 - 0.1 * t2[:, None]
        l_aux = np.mean((out - x0) ** 2)
        np.testing.assert_allclose(float(m["generator"]), l_gen, rtol=1e-10)
        np.testing.assert_allclose(float(m["aux"]), l_aux, rtol=1e-10)
        np.testing.assert_allclose(float(loss), l_gen + l_aux, rtol=1e-10)
        # the generator gets the VSD gradient, (1/B) sum_i w (eps_teacher - eps_aux) dx0/dtheta
        np.testing.assert_allclose(float(g["generator"]["a"]), np.sum(grad * z) / 5, rtol=1e-10)
        np.testing.assert_allclose(float(g["generator"]["b"]), np.sum(grad) * vp.t_max / 5, rtol=1e-10)
        # the aux network only its denoising gradient (the generator's term stops at it)
        np.testing.assert_allclose(float(g["aux"]["a"]), np.mean(2 * (out - x0) * xt2), rtol=1e-10)
        np.testing.assert_allclose(float(g["aux"]["b"]), np.mean(2 * (out - x0) * t2[:, None]), rtol=1e-10)


def test_one_step_sampler_and_errors():
    te = _linear_teacher()
    rec = METHODS["score_distillation"]
    z = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
    params = {"generator": {"a": 0.5, "b": 1.0}, "aux": {"a": 0.0, "b": 0.0}}
    x = rec.sample(te, params, z, steps=1, trained_steps=1)
    np.testing.assert_allclose(np.asarray(x), 0.5 * np.asarray(z) + te.process.t_max, rtol=1e-6)
    with pytest.raises(DistillError, match="at most 1 step"):
        rec.sample(te, params, z, steps=2, trained_steps=1)
    with pytest.raises(DistillError, match="unknown option"):
        rec.build(te, steps=2)
    with pytest.raises(DistillError, match="weighting"):
        rec.build(te, weighting="snr")
    with pytest.raises(DistillError, match="t_range"):
        rec.build(te, t_range=(0.5, 0.2))


def test_short_training_moves_the_generator_onto_the_teachers_gaussian():
    """Data N(1.5, 0.5^2). The network family: ``x0 = m + g x + c(t) (x - alpha m)`` with
    ``c = alpha v / (alpha^2 v + sigma^2)``: the exact denoiser of N(m, v) when g = 0, and
    a generator N(m, (g + c(t_max))^2) at t_max, which starts collapsed (g = 0)."""
    vp = jdiff.vp_cosine()

    def apply(p, x, t, cond=None, key=None):
        a, s = vp.alpha(t)[:, None], vp.sigma(t)[:, None]
        v = jnp.exp(p["lv"])
        return p["m"] + p["g"] * x + a * v / (a * a * v + s * s) * (x - a * p["m"])

    tp = {"m": jnp.float32(1.5), "lv": jnp.float32(np.log(0.25)), "g": jnp.float32(0.0)}
    te = Teacher(apply, tp, vp, "x0", "t", (1,), 0)
    setup = METHODS["score_distillation"].build(te)
    opt = optax.adam(1e-2, b1=0.0)  # no momentum: the generator and the aux network play a game
    params, state = setup.params, opt.init(setup.params)

    @jax.jit
    def step(params, state, key):
        keys = per_sample_keys(key, 256)
        g = jax.grad(lambda p: setup.loss_fn(p, {"x": jnp.zeros((256, 1))}, keys, frozen=setup.frozen)[0])(params)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state

    z = jax.random.normal(jax.random.key(9), (2048, 1))

    def distance(p):
        x = METHODS["score_distillation"].sample(te, p, z, steps=1, trained_steps=1)
        return abs(float(jnp.mean(x)) - 1.5) + abs(float(jnp.std(x)) - 0.5)

    d0 = distance(params)
    for i in range(150):
        params, state = step(params, state, jax.random.key(i))
    d1 = distance(params)
    assert d0 > 0.4 and d1 < 0.25 * d0, (d0, d1)
