"""jdiff.preference: losses against hand-computed values, one optax step per method,
transition log-probabilities against the Gaussian density, exact importance ratios,
malformed data, LoRA and partial fine-tuning, reward backpropagation.

The frozen reference on 8 fake devices is checked by the existing 8-device worker
(tests/_train_worker.py, mode ``dp``, run by tests/test_train_parallel.py), which also
trains a Diffusion-DPO step with the reference as frozen parameters.
"""

from __future__ import annotations

import math

import _train_worker as W
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import EPS32, EPS64
from flax import nnx

import jdiff
from jdiff import preference as P
from jdiff import solvers as S
from jdiff import train as T
from jdiff._random import normal_per_sample


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------ losses by hand

ERR_W, ERR_L = [0.30, 0.10], [0.20, 0.40]
REF_W, REF_L = [0.25, 0.20], [0.25, 0.30]


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def test_dpo_family_hand_computed():
    ew, el, rw, rl = _f32(ERR_W, ERR_L, REF_W, REF_L)
    beta = 10.0
    # pair 0: u_w = -(0.30 - 0.25)/2 = -0.025, u_l = -(0.20 - 0.25)/2 = 0.025, h = -0.05
    # pair 1: u_w = -(0.10 - 0.20)/2 = 0.05,  u_l = -(0.40 - 0.30)/2 = -0.05, h = 0.10
    h = [-0.05, 0.10]
    loss, m = P.diffusion_dpo_loss(ew, el, rw, rl, beta=beta)
    want = (-math.log(_sig(beta * h[0])) - math.log(_sig(beta * h[1]))) / 2
    # every value is O(1) and a few float32 operations deep: 16 eps32 of relative error
    tol = 16 * EPS32
    np.testing.assert_allclose(float(loss), want, rtol=tol)
    np.testing.assert_allclose(float(m["reward_margin"]), beta * (h[0] + h[1]) / 2, rtol=tol)
    np.testing.assert_allclose(float(m["reward_win"]), beta * (-0.025 + 0.05) / 2, rtol=tol)
    np.testing.assert_allclose(float(m["reward_lose"]), beta * (0.025 - 0.05) / 2, rtol=tol)
    assert float(m["implicit_acc"]) == 0.5  # one pair of two has a positive margin
    # the two beta conventions are one objective: (5000, with 1/2) == (2500, without)
    a = P.diffusion_dpo_loss(ew, el, rw, rl, beta=5000.0, half=True)[0]
    b = P.diffusion_dpo_loss(ew, el, rw, rl, beta=2500.0, half=False)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=tol)
    hinge = P.diffusion_dpo_loss(ew, el, rw, rl, beta=beta, kind="hinge")[0]
    np.testing.assert_allclose(float(hinge), (max(0, 1 - beta * h[0]) + max(0, 1 - beta * h[1])) / 2, rtol=tol)
    ipo = P.diffusion_dpo_loss(ew, el, rw, rl, beta=beta, kind="ipo")[0]
    np.testing.assert_allclose(float(ipo), ((h[0] - 0.05) ** 2 + (h[1] - 0.05) ** 2) / 2, rtol=tol)
    # policy == reference: margin 0, accuracy one half, loss log 2
    loss0, m0 = P.diffusion_dpo_loss(rw, rl, rw, rl, beta=beta)
    assert float(m0["implicit_acc"]) == 0.5 and float(m0["reward_margin"]) == 0.0
    np.testing.assert_allclose(float(loss0), math.log(2), rtol=tol)
    with pytest.raises(ValueError, match="unknown DPO kind 'bogus'"):
        P.diffusion_dpo_loss(ew, el, rw, rl, kind="bogus")
    with pytest.raises(ValueError, match="beta must be a positive number, got -1"):
        P.diffusion_dpo_loss(ew, el, rw, rl, beta=-1)
    with pytest.raises(ValueError, match="per-sample"):
        P.diffusion_dpo_loss(ew, el[:1], rw, rl)


def test_dpo_loss_is_eq14_with_the_stated_rescaled_beta():
    """Wallace et al.'s Eq. 14 integrand, with squared errors summed over the D dimensions
    and beta_14 T omega = c beta / D, is diffusion_dpo_loss on per_sample_error (means over
    the dimensions) with beta and c = 1/2 (half=True) or 1 (the docstring's relation)."""
    rng = np.random.default_rng(0)
    B, D = 4, 12
    eps = rng.normal(size=(2, B, D))  # the noises of winners [0] and losers [1]
    pol = eps + 0.3 * rng.normal(size=(2, B, D))  # eps_theta
    ref = eps + 0.3 * rng.normal(size=(2, B, D))  # eps_ref
    S, Sref = ((eps - pol) ** 2).sum(-1), ((eps - ref) ** 2).sum(-1)  # Eq. 14's ||.||_2^2
    beta = 50.0  # with D = 12: arguments of the log-sigmoid of order 1
    with jax.enable_x64(True):

        def err(a, e):
            return P.per_sample_error(jnp.asarray(a), jnp.asarray(e))

        errs = err(pol[0], eps[0]), err(pol[1], eps[1]), err(ref[0], eps[0]), err(ref[1], eps[1])
        for half, c in ((True, 0.5), (False, 1.0)):
            arg = -(c * beta / D) * ((S[0] - Sref[0]) - (S[1] - Sref[1]))
            want = np.mean(np.logaddexp(0.0, -arg))  # -log sigmoid(arg), by pair, averaged
            got = float(P.diffusion_dpo_loss(*errs, beta=beta, half=half)[0])
            # float64 sums of D = 12 terms and a few operations on values of order 1 (the
            # differences cancel by less than 10x): 64 eps64 (about 2 eps64 observed)
            np.testing.assert_allclose(got, want, rtol=64 * EPS64)
            # the public code's scaling is not Eq. 14's with the same beta (the 1/D)
            assert abs(float(np.mean(np.logaddexp(0.0, c * beta * ((S[0] - Sref[0]) - (S[1] - Sref[1]))))) - got) > 1.0


def test_mapo_kto_stepwise_ddpo_hand_computed():
    tol = 16 * EPS32  # as above: O(1) values, a few float32 operations
    ew, el, rw, rl = _f32(ERR_W, ERR_L, REF_W, REF_L)

    def p(L, s=0.5):
        return s * L / math.expm1(s * L)

    o = [p(0.30) - p(0.20), p(0.10) - p(0.40)]
    want = (0.30 + 0.10) / 2 - 0.1 * (math.log(_sig(1000 * o[0])) + math.log(_sig(1000 * o[1]))) / 2
    loss, m = P.mapo_loss(ew, el, beta=0.1, snr=0.5, scale=1000.0)
    # the margin o (float32 error a few eps32) is multiplied by scale = 1000 inside the
    # log-sigmoid (slope <= 1) and then by beta = 0.1: 4 * 1000 * 0.1 eps32 absolute
    np.testing.assert_allclose(float(loss), want, rtol=0, atol=4 * 1000 * 0.1 * EPS32)
    np.testing.assert_allclose(float(m["margin"]), (o[0] + o[1]) / 2, rtol=0, atol=4 * EPS32)
    assert float(P.mapo_loss(jnp.zeros(2), jnp.zeros(2))[1]["margin"]) == 0.0  # p(0) = 1, no 0/0

    # KTO on errors [0.30, 0.10] vs reference [0.25, 0.20], first desirable, second not:
    # u = [-0.025, 0.05], z = max(mean u, 0) = 0.0125
    beta = 10.0
    u, z = [-0.025, 0.05], 0.0125
    want = ((1 - _sig(beta * (u[0] - z))) + 2.0 * (1 - _sig(beta * (z - u[1])))) / 2
    loss, m = P.kto_loss(ew, rw, jnp.array([True, False]), beta=beta, lambda_u=2.0)
    np.testing.assert_allclose(float(loss), want, rtol=tol)
    np.testing.assert_allclose(float(m["z"]), z, rtol=tol)

    lw, ll = jnp.array([-1.00, -2.0]), jnp.array([-1.5, -1.0])
    rlw, rll = jnp.array([-1.05, -2.0]), jnp.array([-1.4, -1.0])
    # log-ratios: w [0.05, 0], l [-0.1, 0]; clip 0.2 keeps them; margin beta * [0.15, 0]
    loss, m = P.d3po_loss(lw, ll, rlw, rll, beta=2.0, clip=0.2)
    np.testing.assert_allclose(float(loss), (-math.log(_sig(0.3)) + math.log(2)) / 2, rtol=tol)
    # with clip 0.01 the ratios clip to 1.01 and 0.99
    loss, _ = P.spo_loss(lw, ll, rlw, rll, beta=2.0, clip=0.01)
    np.testing.assert_allclose(
        float(loss), (-math.log(_sig(2 * (math.log(1.01) - math.log(0.99)))) + math.log(2)) / 2, rtol=tol
    )

    adv = P.normalize_advantages(jnp.array([1.0, 3.0, 5.0, 7.0, 2.0]), jnp.array([0, 0, 1, 1, 2]))
    np.testing.assert_allclose(np.asarray(adv), [-1, 1, -1, 1, 0], atol=1e-5)  # eps 1e-6 / std 1
    logp, old = jnp.array([-1.0, -1.0]), jnp.array([-1.1, -1.0])
    a = jnp.array([1.0, -2.0])
    r0 = math.exp(0.1)
    loss, m = P.ddpo_loss(logp, old, a, clip=0.05)
    # sample 0: max(-r0, -1.05) = -1.05; sample 1: max(2, 2) = 2
    np.testing.assert_allclose(float(loss), (-1.05 + 2.0) / 2, rtol=tol)
    np.testing.assert_allclose(float(m["clip_frac"]), 0.5)
    np.testing.assert_allclose(float(m["ratio"]), (r0 + 1) / 2, rtol=tol)


# ------------------------------------------------------- one optax step per method


@pytest.fixture(scope="module")
def pair_batch():
    b = W.global_batch(0, 8)
    rng = np.random.default_rng(1)
    return {
        "win": b["x"],
        "lose": (b["x"] + 0.5 * rng.standard_normal(b["x"].shape)).astype(np.float32),
        "label": b["label"],
    }


@pytest.mark.parametrize("method", P.METHODS)
def test_one_step_lowers_winner_error(method, pair_batch):
    """One SGD step of each method, the reference frozen at the start point, lowers the
    winner's denoising error relative to the loser's (at the same t and eps)."""
    cfg = T.LossConfig(jdiff.vp_cosine(), prediction="eps")
    lf = (
        P.make_preference_loss(W.apply, cfg, method, beta=50.0)
        if method != "mapo"
        else P.make_preference_loss(W.apply, cfg, method)
    )
    batch = pair_batch
    if method == "kto":  # winners desirable, losers undesirable, unpaired
        batch = {
            "x": np.concatenate([batch["win"], batch["lose"]]),
            "desirable": np.repeat([True, False], 8),
            "label": np.tile(batch["label"], 2),
        }
    params = W.init_params(0)
    opt = optax.sgd(0.005)
    state = T.init_train_state(params, opt, 0, ema=False, frozen=params)
    key = jax.random.key(3)
    new, metrics = jax.jit(lambda s, b: T.train_step(s, b, key, loss_fn=lf, optimizer=opt, ema_decay=None))(
        state, batch
    )
    for x, y in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # the reference never moves
    # the errors at the (t, eps) the step trained on: train_step gives sample i the key
    # fold_in(key, i) (for KTO the winners are rows 0..7 and the losers rows 8..15)
    keys = jdiff._random.per_sample_keys(key, 16 if method == "kto" else 8)
    kw, kl = (keys[:8], keys[8:]) if method == "kto" else (keys, keys)
    predict = T.prediction_fn(W.apply, cfg)

    def gap(p):
        ew = P.denoising_errors(predict, cfg, p, pair_batch["win"], kw, pair_batch["label"])
        el = P.denoising_errors(predict, cfg, p, pair_batch["lose"], kl, pair_batch["label"])
        return float(jnp.mean(ew - el))

    assert gap(new.params) < gap(params), (method, gap(new.params), gap(params))
    assert np.isfinite(float(metrics["loss"]))


# ------------------------------------------------ transition log-probabilities


def _mlp_denoiser(process, params):
    return jdiff.Denoiser(apply_fn=W.apply, params=params, process=process, prediction="eps")


def test_transition_log_prob_is_the_gaussian_density():
    """DDPM: the replayed log-probability equals log N(x_s; alpha_t x0 + sqrt(sigma_t^2 -
    c^2) eps, c^2) computed here in float64 from the testbed's exact x0 and eps; for both
    DDPM and SDE-DPM-Solver++(2M) it equals the density of the very noise the sampler drew."""
    mix = jdiff.testbed.GaussianMixture(np.ones(2), np.array([[-1.0, 0.5], [1.0, -0.5]]), np.full((2, 2), 0.3))
    solvers = (S.ddpm(), S.sde_dpm_solver_pp(2))
    with jax.enable_x64(True):
        proc = jdiff.vp_cosine()
        den = mix.denoiser(proc)
        x_T = jdiff.prior_sample(proc, jax.random.key(0), (3, 2), dtype=jnp.float64)
        grid = jdiff.time_grid(proc, 4)
        key = jax.random.key(1)

        @jax.jit
        def run():  # one program: both samplers, their replayed scores, the exact (x0, eps)
            out = []
            for solver in solvers:
                _, info = jdiff.sample(solver, den, x_T, grid, key=key, return_info=True, trajectory=True)
                lp = P.trajectory_log_probs(solver, den, info.xs, info.grid)
                x0, eps = jax.vmap(lambda x, t: tuple(den(x, t)))(info.xs[:-1], info.grid[:-1])
                out.append((info.xs, info.grid, lp, x0, eps, proc.log_alpha(info.grid), proc.log_sigma(info.grid)))
            z = jnp.stack([normal_per_sample(key, (3, 2), jnp.float64, step=i) for i in range(4)])
            return out, z

        out, z = jax.tree.map(np.asarray, run())
        for solver, (xs, g, lp, x0, eps, la, ls) in zip(solvers, out, strict=True):
            assert lp.shape == (4, 3) and np.array_equal(g, np.asarray(grid))
            for i in range(4):
                h = (la[i + 1] - ls[i + 1]) - (la[i] - ls[i])
                std = math.exp(ls[i + 1]) * math.sqrt(-math.expm1(-2 * h))
                want_z = -0.5 * np.sum(z[i] ** 2, 1) - 2 * math.log(std) - math.log(2 * math.pi)
                # float64 throughout: a few hundred eps64 on O(10) values
                np.testing.assert_allclose(lp[i], want_z, rtol=0, atol=1e4 * EPS64)
                if solver == S.ddpm():
                    mean = math.exp(la[i + 1]) * x0[i] + math.sqrt(math.exp(2 * ls[i + 1]) - std**2) * eps[i]
                    want = (
                        -0.5 * np.sum((xs[i + 1] - mean) ** 2, 1) / std**2 - 2 * math.log(std) - math.log(2 * math.pi)
                    )
                    np.testing.assert_allclose(lp[i], want, rtol=0, atol=1e4 * EPS64)
    xs, g = out[0][0], out[0][1]
    with pytest.raises(ValueError, match="deterministic"):
        P.trajectory_log_probs(S.ddim(), den, xs, g)
    with pytest.raises(TypeError, match="Gaussian transition"):
        P.trajectory_log_probs(S.euler_maruyama(), den, xs, g)
    with pytest.raises(ValueError, match="grid of N"):
        P.trajectory_log_probs(S.ddpm(), den, xs[1:], g)


def test_importance_ratios_exactly_one():
    """Policy == reference (the same values, held in different arrays): D3PO/SPO and
    DDPO ratios are exactly 1, D3PO's loss is log 2 and DDPO's gradient is the plain
    policy gradient -mean(A grad log p)."""
    proc = jdiff.vp_cosine()
    params = W.init_params(0)
    ref = jax.tree.map(jnp.copy, params)
    solver = S.ddpm()
    x_T = jdiff.prior_sample(proc, jax.random.key(0), (4, W.DIM))
    labels = jnp.array([0, 1, 0, 1])
    # ends at t = 0.1: a last step to t_min has std ~ 1e-3, and its log-density's
    # gradient is then float32 noise (terms of 1/std^2 cancelling)
    grid = jnp.array([0.99, 0.6, 0.3, 0.1])

    @jax.jit
    def run(params, ref):
        den = _mlp_denoiser(proc, params)
        _, info = jdiff.sample(
            solver, den, x_T, grid, cond=labels, key=jax.random.key(2), return_info=True, trajectory=True
        )
        xs = jax.lax.stop_gradient(info.xs)

        def lps(p):
            return P.trajectory_log_probs(solver, _mlp_denoiser(proc, p), xs, grid, cond=labels)

        lp, lp_ref = lps(params), lps(ref)
        adv = P.normalize_advantages(jnp.array([1.0, 2.0, 0.5, 3.0]), labels)
        # clip 0.01: the log-probs recomputed inside the gradient's program round
        # differently (up to ~1e-4 here, the size of DDPO's default clip of 1e-4)
        g_ddpo = jax.grad(lambda p: P.ddpo_loss(lps(p), lp_ref, adv, clip=0.01)[0])(params)
        g_pg = jax.grad(lambda p: -jnp.mean(adv * lps(p)))(params)
        # on-policy (old_logp=None): the ratio is 1 by construction, inside the gradient too
        g_on, m_on = jax.grad(lambda p: P.ddpo_loss(lps(p), None, adv, clip=1e-4), has_aux=True)(params)
        d3 = P.d3po_loss(lp[:, :2], lp[:, 2:], lp_ref[:, :2], lp_ref[:, 2:])
        return lp, lp_ref, g_ddpo, g_pg, d3, P.ddpo_loss(lp, lp_ref, adv)[1], g_on, m_on

    lp, lp_ref, g_ddpo, g_pg, (d3, m3), mdd, g_on, m_on = run(params, ref)
    assert float(m_on["ratio"]) == 1.0 and float(m_on["clip_frac"]) == 0.0 and float(m_on["approx_kl"]) == 0.0
    assert np.all(np.asarray(lp) == np.asarray(lp_ref)) and np.all(np.isfinite(np.asarray(lp)))
    assert float(m3["ratio_win"]) == 1.0 and float(m3["ratio_lose"]) == 1.0
    assert float(mdd["ratio"]) == 1.0 and float(mdd["clip_frac"]) == 0.0
    np.testing.assert_allclose(float(d3), math.log(2), rtol=4 * EPS32)
    for a, c, b in zip(jax.tree.leaves(g_ddpo), jax.tree.leaves(g_on), jax.tree.leaves(g_pg), strict=True):
        # at ratio 1 the surrogate's gradient is -A grad log p; the two sum the same 12
        # per-transition terms in another order, terms up to ~30x the result (1/std of the
        # last step; advantages cancel within a class): 12 * 30 eps32 ~ 4e-5, so 1000
        # eps32 relative to the largest entry
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1000 * EPS32 * np.max(np.abs(b)))
        np.testing.assert_allclose(np.asarray(c), b, rtol=0, atol=1000 * EPS32 * np.max(np.abs(b)))


# -------------------------------------------------------------- preference data


def test_malformed_preference_data_is_rejected_before_training():
    x = np.zeros((4, 8, 8, 1), np.float32)
    good = P.PreferencePairs(x, x + 1, np.array([0, 1, 2, 3]))
    loader = P.preference_loader(good, 2, num_classes=10, shape=(8, 8, 1))
    b = loader.batch(0)
    assert set(b) == {"win", "lose", "label"} and b["win"].shape == (2, 8, 8, 1)
    cases = [
        (P.PreferencePairs(x, x[:, :4]), r"win \[4, 8, 8, 1\] and lose \[4, 4, 8, 1\] differ"),
        (P.PreferencePairs(x, None), "lose is missing"),
        (P.PreferencePairs(x[:0], x[:0]), r"win is empty \(shape \(0, 8, 8, 1\)\)"),
        (P.PreferencePairs(x, x, np.array([0, 1, 10, 3])), r"labels must be in \[0, 10\), got \[10\] at rows \[2\]"),
        (P.PreferencePairs(x, x, np.array([0, 1])), r"cond must be \(4,\) integer labels"),
        (P.PreferencePairs(x, x * np.nan), "lose has 256 non-finite values"),
        (P.LabelledSamples(x, np.array([1, 0, 2, 1])), "desirable must be booleans or 0/1"),
        (P.LabelledSamples(x, np.array([True])), r"desirable must be \(4,\)"),
    ]
    for data, msg in cases:
        with pytest.raises(ValueError, match=msg):
            P.preference_loader(data, 2, num_classes=10)
    with pytest.raises(ValueError, match=r"the model takes \[8, 8, 3\]"):
        P.preference_loader(good, 2, shape=(8, 8, 3))
    with pytest.raises(ValueError, match="batch size 8 exceeds the 4 examples"):
        P.preference_loader(good, 8)
    with pytest.raises(TypeError, match="PreferencePairs or LabelledSamples"):
        P.preference_loader({"win": x}, 2)
    lf = P.make_preference_loss(W.apply, jdiff.vp_cosine(), "dpo")
    with pytest.raises(ValueError, match=r"keys \['win', 'lose'\], got \['win'\]"):
        lf(W.init_params(0), {"win": x}, jax.random.key(0), frozen=W.init_params(0))
    with pytest.raises(ValueError, match="needs the reference as frozen"):
        lf(W.init_params(0), {"win": x, "lose": x}, jax.random.key(0))
    with pytest.raises(ValueError, match="unknown preference method 'ppo'"):
        P.make_preference_loss(W.apply, jdiff.vp_cosine(), "ppo")


def test_generate_pairs_ranks_the_models_samples():
    def sample_fn(key, cond):
        return jax.random.normal(key, (cond.shape[0], 3))

    def reward(x, cond):
        return -jnp.sum(x**2, 1)

    pairs = P.generate_pairs(sample_fn, reward, jax.random.key(0), np.arange(6) % 3, candidates=3, batch=4)
    checked = P.check_pairs(pairs, num_classes=3)
    assert checked.win.shape == (6, 3) and np.all(checked.reward_win > checked.reward_lose)
    # a sum of 3 float32 squares recomputed in NumPy: a few roundings of the result
    np.testing.assert_allclose(-np.sum(checked.win**2, 1), checked.reward_win, rtol=8 * EPS32)


# ---------------------------------------------------------------- LoRA, masks


@pytest.fixture(scope="module")
def small_unet():
    """A tiny U-Net (Conv and Dense layers) with random values in every parameter (zero
    inits included, so every layer matters), built from shapes in one jitted program."""
    cfg = jdiff.models.UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        head_channels=8,
        num_classes=3,
        num_groups=4,
    )
    graphdef, shapes = nnx.split(jdiff.models.abstract_model(jdiff.models.UNet, cfg))
    rng = np.random.default_rng(0)  # host values: no program to compile
    leaves = [(0.2 * rng.standard_normal(s.shape)).astype(s.dtype) for s in jax.tree.leaves(shapes)]
    assert len(leaves) > 10
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(shapes), leaves))


def test_lora_init_is_exact_and_merge_equals_unmerged(small_unet):
    apply, params = jdiff.models.functional(small_unet)
    lora = P.lora_init(params, 2, jax.random.key(0))
    targets = P.lora_targets(params)
    assert set(lora) == set(targets) and any(len(s) == 4 for s in targets.values())  # Conv and Dense
    merge = jax.jit(P.lora_merge, static_argnums=2)
    merged0 = merge(params, lora, 2.0)
    for a, b in zip(jax.tree.leaves(merged0), jax.tree.leaves(params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # B = 0: the base model exactly
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t, y = jnp.array([0.3, 0.7]), jnp.array([0, 2])
    run = jax.jit(lambda apply, p: apply(p, x, t, y), static_argnums=0)  # one program per structure
    base_out = run(apply, params)

    def unmerged(lora):
        return run(*jdiff.models.functional(P.lora_model(small_unet, lora, 2.0)))

    # the un-merged path adds scale * (x A) 0: the same values up to XLA's reassociation
    np.testing.assert_allclose(np.asarray(unmerged(lora)), np.asarray(base_out), rtol=0, atol=4 * EPS32)
    # non-zero adapters: the merged kernels give the un-merged (separate low-rank path) forward
    rng = np.random.default_rng(2)
    lora = {k: {"a": v["a"], "b": 0.05 * rng.standard_normal(v["b"].shape).astype(np.float32)} for k, v in lora.items()}
    merged = run(apply, merge(params, lora, 2.0))
    assert float(jnp.max(jnp.abs(merged - base_out))) > 1e-2  # the adapters do change the model
    # float32, a network ~20 layers deep with O(1) activations, the low-rank path summed
    # separately: 1000 eps32 absolute
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged(lora)), rtol=0, atol=1000 * EPS32)
    with pytest.raises(ValueError, match="LoRA rank must be a positive int"):
        P.lora_init(params, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="kernels the model does not have"):
        P.lora_merge(params, {"nope/kernel": lora[next(iter(lora))]})


def test_partial_optimizer_freezes_groups():
    params = W.init_params(0)
    tx = P.partial_optimizer(optax.adamw(0.1, weight_decay=0.1), params, lambda path: path.startswith("w"))
    grads = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    for k in params:
        same = np.array_equal(np.asarray(new[k]), np.asarray(params[k]))
        assert same == (not k.startswith("w")), k
    with pytest.raises(ValueError, match="selects no parameter"):
        P.partial_optimizer(optax.sgd(0.1), params, lambda path: False)


# ----------------------------------------------------------- reward backprop


def test_reward_backprop_strategies():
    """DRaFT-1 and DRaFT-LV give finite gradients that differ from full backprop's (and
    from each other); Adjoint's gradient is close to backprop's. (Truncated(N) equal to
    Backprop is jdiff.sample's own property, tested with the gradient strategies.)"""
    proc = jdiff.vp_cosine()
    params = W.init_params(0)
    x_T = jdiff.prior_sample(proc, jax.random.key(0), (4, W.DIM))
    grid = jdiff.time_grid(proc, 3)
    solver = S.ddim()

    def reward(x, cond):
        return -jnp.sum((x - 1.0) ** 2, 1)

    @jax.jit
    def grads(params):
        def g(fn):
            return jax.grad(lambda p: fn(_mlp_denoiser(proc, p))[0])(params)

        return {
            "backprop": g(lambda d: P.reward_loss(reward, solver, d, x_T, grid, gradient=jdiff.Backprop())),
            "draft1": g(lambda d: P.reward_loss(reward, solver, d, x_T, grid)),
            "adjoint": g(lambda d: P.reward_loss(reward, solver, d, x_T, grid, gradient=jdiff.Adjoint())),
            "lv": g(lambda d: P.draft_lv_loss(reward, solver, d, x_T, grid, jax.random.key(1), n=2)),
        }

    g = grads(params)
    flat = {k: np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)]) for k, v in g.items()}
    assert all(np.all(np.isfinite(v)) for v in flat.values())
    assert not np.allclose(flat["draft1"], flat["backprop"])
    assert not np.allclose(flat["lv"], flat["draft1"])
    # the adjoint ODE at NFE 3 with the solver's own first-order integrator: a few % of |g|
    assert np.linalg.norm(flat["adjoint"] - flat["backprop"]) < 0.2 * np.linalg.norm(flat["backprop"])
    with pytest.raises(ValueError, match="n >= 1"):
        P.draft_lv_loss(reward, solver, _mlp_denoiser(proc, params), x_T, grid, jax.random.key(1), n=0)


def test_prefer_command_rejects_bad_options(capsys):
    from jdiff.cli import main

    for argv, msg in (
        (["--methods", "dpo,foo"], "unknown methods ['foo']"),
        (["--target", "12"], "--target must be a class 0..9, got 12"),
        (["--prompt", "cat"], "--prompt must be 'null' or a class 0..9, got 'cat'"),
    ):
        assert main(["prefer", *argv]) == 2
        assert msg in capsys.readouterr().err
