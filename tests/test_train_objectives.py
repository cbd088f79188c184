"""Objectives: targets, weightings, EDM preconditioning, time samplers, label dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import train as T
from jdiff.testbed import GaussianMixture

PROCESSES = {
    "vp_linear": jdiff.vp_linear(),
    "vp_cosine": jdiff.vp_cosine(),
    "edm": jdiff.edm(),
    "ve": jdiff.ve(),
    "rectified_flow": jdiff.rectified_flow(),
}


def _closed_form_target(prediction, process, x0, eps, t):
    """Targets written out by hand (not through jdiff.from_x0_eps)."""
    a = process.alpha(t)[:, None]
    s = process.sigma(t)[:, None]
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    # flow velocity d/dt (alpha x0 + sigma eps), derivatives by finite differences in float64
    h = 1e-6
    da = ((process.alpha(t + h) - process.alpha(t - h)) / (2 * h))[:, None]
    ds = ((process.sigma(t + h) - process.sigma(t - h)) / (2 * h))[:, None]
    return da * x0 + ds * eps


def _point_mass_perfect(prediction, process, c):
    """The Bayes-optimal (here exact) predictor for data equal to ``c``: from x_t and t,
    x0 = c and eps = (x_t - alpha c) / sigma are known."""

    def apply(params, x, t, cond, key=None):
        a = process.alpha(t)[:, None]
        s = process.sigma(t)[:, None]
        x0 = jnp.broadcast_to(c, x.shape)
        eps = (x - a * x0) / s
        return _closed_form_target(prediction, process, x0, eps, t)

    return apply


@pytest.mark.parametrize("pname", ["vp_cosine", "edm", "rectified_flow"])
def test_point_mass_perfect_predictor_has_zero_loss(pname):
    """A perfect predictor on a point mass gets loss 0 for every parameterization, so the
    targets the loss uses are exactly the closed forms (v = alpha eps - sigma x0, flow =
    alpha' x0 + sigma' eps); a predictor off by 0.1 gets loss 0.01."""
    process = PROCESSES[pname]
    if pname == "rectified_flow":
        process = jdiff.rectified_flow(t_max=0.99)  # eps is undefined at alpha = 0
    preds = ["eps", "x0", "v", "flow"]
    with jax.enable_x64(True):
        c = jnp.array([0.7, -1.3, 0.2], jnp.float64)
        batch = {"x": jnp.broadcast_to(c, (64, 3))}

        @jax.jit
        def losses(key):
            out = {}
            for pred in preds:
                perfect = _point_mass_perfect(pred, process, c)
                wrong = lambda p, x, t, cond, key=None, f=perfect: f(p, x, t, cond) + 0.1
                cfg = T.LossConfig(process, prediction=pred)
                out[pred] = (
                    T.make_loss_fn(perfect, cfg)(None, batch, key)[0],
                    T.make_loss_fn(wrong, cfg)(None, batch, key)[0],
                )
            return out

        # float64: the largest error is the finite-difference flow target of
        # _closed_form_target, ~eps64 / h = 2e-10 per unit of x0 and eps, so the perfect
        # loss is ~1e-19 (< 1e-10) and the off-by-0.1 loss 0.01 + 0.2 * 2e-10 (rel 1e-6)
        for pred, (good, bad) in losses(jax.random.key(0)).items():
            assert float(good) < 1e-10, (pname, pred, float(good))
            assert float(bad) == pytest.approx(0.01, rel=1e-6), (pname, pred)


def _posterior_var(prediction, process, t, mu, s2):
    """Var(target | x_t) for 1-D Gaussian data N(mu, s2), target = c0 x0 + ce eps."""
    a, s = process.alpha(t), process.sigma(t)
    h = 1e-6
    da = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    ds = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h)
    c0, ce = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-s, a), "flow": (da, ds)}[prediction]
    var_x = a * a * s2 + s * s
    cov = c0 * a * s2 + ce * s
    return c0 * c0 * s2 + ce * ce - cov * cov / var_x


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_gaussian_exact_denoiser_attains_minimal_loss(prediction):
    """For Gaussian-mixture data the exact posterior mean of the target is the
    minimizer: its loss equals E_t[w(t) Var(target | x_t)] (computed by quadrature for
    one Gaussian) and perturbing it in any direction increases the loss."""
    process = jdiff.vp_cosine() if prediction != "flow" else jdiff.rectified_flow(t_max=0.995)
    mix = GaussianMixture([1.0], [[0.5, 0.5]], [[0.6, 0.6]])

    def exact(params, x, t, cond, key=None):
        p = mix.posterior(x, t, process)
        return jdiff.from_x0_eps(prediction, p.x0, p.eps, t, process)

    with jax.enable_x64(True):
        n = 20000
        batch = {"x": mix.sample(jax.random.key(1), n, jnp.float64)}
        cfg = T.LossConfig(process, prediction=prediction, weighting="min_snr")

        @jax.jit
        def losses(key):
            pert = lambda d: lambda p, x, t, c, key=None: exact(p, x, t, c) + d * jnp.tanh(x)
            return [T.make_loss_fn(f, cfg)(None, batch, key)[0] for f in (exact, pert(-0.2), pert(0.2))]

        loss_star, lo, hi = map(float, losses(jax.random.key(2)))

        @jax.jit
        def quadrature(ts):
            w = T.loss_weight("min_snr", process, prediction, ts)
            return jnp.trapezoid(w * _posterior_var(prediction, process, ts, 0.5, 0.36), ts)

        expected = float(quadrature(jnp.linspace(process.t_min, process.t_max, 4001))) / (process.t_max - process.t_min)
        # Monte Carlo over n = 20000 samples of w(t) * (squared Gaussian error): a
        # chi-square(1) error alone has relative SE sqrt(2 / n) = 1%, the spread of
        # w(t) Var(t) over t adds to it (~1.3% together); 0.04 is about 3 SE
        assert loss_star == pytest.approx(expected, rel=0.04)
        assert lo > loss_star and hi > loss_star


def test_mixture_exact_denoiser_is_a_local_minimum():
    process = jdiff.vp_linear()
    mix = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.2], [0.2, 0.4]])

    def exact(params, x, t, cond, key=None):
        return params * mix.posterior(x, t, process).eps

    with jax.enable_x64(True):
        batch = {"x": mix.sample(jax.random.key(3), 8192, jnp.float64)}
        lf = T.make_loss_fn(exact, T.LossConfig(process, prediction="eps"))

        @jax.jit
        def probe(key):
            losses = [lf(jnp.float64(s), batch, key)[0] for s in (0.9, 1.0, 1.1)]
            return losses, jax.grad(lambda s: lf(s, batch, key)[0])(jnp.float64(1.0))

        losses, g = probe(jax.random.key(4))
        losses = [float(v) for v in losses]
        assert losses[1] < losses[0] and losses[1] < losses[2]
        curvature = (losses[0] + losses[2] - 2 * losses[1]) / 0.01
        assert abs(float(g)) < 0.05 * curvature  # stationary up to Monte-Carlo noise


# --------------------------------------------------------------------- weightings


def test_min_snr_weights_match_paper_formulas():
    """Hang et al. 2023 for VP: min(SNR, g)/SNR (eps), min(SNR, g) (x0), min(SNR, g)/(SNR+1) (v)."""
    process = jdiff.vp_linear()
    t = jnp.linspace(process.t_min, process.t_max, 101)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    g = 5.0
    # float32: SNR through exp(log_snr) with |log_snr| <= 10 carries ~10 eps, the weight
    # ~10 more roundings; rtol 1e-5 is ~80 eps32 (eps32 = 1.2e-7)
    np.testing.assert_allclose(T.min_snr_weight(process, "eps", t, g), jnp.minimum(snr, g) / snr, rtol=1e-5)
    np.testing.assert_allclose(T.min_snr_weight(process, "x0", t, g), jnp.minimum(snr, g), rtol=1e-5)
    np.testing.assert_allclose(T.min_snr_weight(process, "v", t, g), jnp.minimum(snr, g) / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(
        T.loss_weight("min_snr", process, "v", t, gamma=g), jnp.minimum(snr, g) / (snr + 1), rtol=1e-5
    )
    np.testing.assert_array_equal(T.loss_weight("none", process, "v", t), np.ones(101))


@pytest.mark.parametrize("pname", ["vp_cosine", "edm", "rectified_flow"])
def test_weighted_loss_is_the_same_x0_loss_for_every_parameterization(pname):
    """Weightings are defined in x0 space: a model making the same x0 prediction gets the
    same weighted loss whether it outputs eps, x0, v or a flow velocity."""
    process = PROCESSES[pname]
    if pname == "rectified_flow":
        process = jdiff.rectified_flow(t_max=0.99)

    def x0_model(x, t):
        return 0.8 * x / process.alpha(t)[:, None] + 0.1 * jnp.sin(3 * t)[:, None]

    def model(pred):
        def apply(p, x, t, c, key=None):
            x0 = x0_model(x, t)
            eps = (x - process.alpha(t)[:, None] * x0) / process.sigma(t)[:, None]
            return jdiff.from_x0_eps(pred, x0, eps, t, process)

        return apply

    with jax.enable_x64(True):
        batch = {"x": jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)}

        @jax.jit
        def losses(key):
            return {
                (w, pred): T.make_loss_fn(model(pred), T.LossConfig(process, prediction=pred, weighting=w))(
                    None, batch, key
                )[0]
                for w in ("min_snr", "edm")
                for pred in ("eps", "x0", "v", "flow")
            }

        out = losses(jax.random.key(1))
        # float64: the same x0 error reached through different conversions, ~10 roundings
        # of 256 * 2 terms: a few hundred eps64 at most, ~1e-13 relative; 1e-7 is loose
        for (w, pred), v in out.items():
            assert float(v) == pytest.approx(float(out[(w, "x0")]), rel=1e-7), (w, pred)


# ---------------------------------------------------------------- EDM


def test_edm_coefficients_and_weighting():
    sd = 0.5
    s = jnp.array([0.002, 0.1, 0.5, 2.0, 80.0])
    c_skip, c_out, c_in, c_noise = T.edm_coefficients(s, sd)
    # float32, each coefficient a handful of roundings: rtol 1e-6 ~ 8 eps32; the weight
    # lam (and lam c_out^2) a dozen more: 1e-5
    np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
    lam = T.loss_weight("edm", jdiff.edm(), "x0", s, sigma_data=sd)
    np.testing.assert_allclose(lam, (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-5)
    np.testing.assert_allclose(lam * c_out**2, np.ones(5), rtol=1e-5)  # unit weight on the raw network


@pytest.mark.parametrize("pname", ["edm", "vp_cosine"])
def test_edm_preconditioned_model_returns_x_at_zero_noise(pname):
    process = PROCESSES[pname]
    params = jax.random.normal(jax.random.key(0), (3, 3))
    raw = lambda p, x, t, c, key=None: jnp.tanh(x @ p) + t[:, None]
    d = jax.jit(T.edm_precondition(raw, process, sigma_data=0.5))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    with jax.enable_x64(True):
        t_small = process.t_of_rho(jnp.full((5,), 1e-7, jnp.float64))
        assert float(process.rho(t_small).max()) < 1e-6
        # D - x / alpha = c_out F + (c_skip - 1) x / alpha with c_out <= rho sd = 5e-8 and
        # |F| <= |tanh| + |c_noise| ~ 5: at most 2.5e-7, below atol 1e-6
        np.testing.assert_allclose(
            d(params, x.astype(jnp.float64), t_small, None), x / process.alpha(t_small)[:, None], atol=1e-6
        )
    # and follows D = c_skip x + c_out F(c_in x, c_noise) at a moderate noise level (EDM process)
    if pname == "edm":
        t = jnp.full((5,), 1.3)
        cs, co, ci, cn = T.edm_coefficients(t, 0.5)
        want = cs[:, None] * x + co[:, None] * raw(params, ci[:, None] * x, cn, None)
        # the same float32 formula evaluated in another order: a few roundings, ~8 eps32
        np.testing.assert_allclose(d(params, x, t, None), want, rtol=1e-6)


def test_edm_objective_perfect_raw_network_has_zero_loss():
    """With the full EDM recipe, the raw network that makes D exact on a point mass gets
    zero loss (the wrapper, c_noise and the weighting are consistent)."""
    sd = 0.5
    c = jnp.array([0.3, -0.4])

    def raw(params, xin, c_noise, cond, key=None):
        sigma = jnp.exp(4 * c_noise)[:, None]
        cs, co, ci, _ = T.edm_coefficients(sigma, sd)
        x = xin / ci
        return (c - cs * x) / co

    with jax.enable_x64(True):
        cfg = T.edm_objective(sigma_data=sd)
        assert cfg.time_sampling == "log_normal" and cfg.weighting == "edm" and cfg.precondition == "edm"
        loss, _ = jax.jit(T.make_loss_fn(raw, cfg))(
            None, {"x": jnp.broadcast_to(c, (128, 2)).astype(jnp.float64)}, jax.random.key(0)
        )
        assert float(loss) < 1e-12


# ------------------------------------------------------------------ time sampling


def test_time_samplers():
    n = 20000
    p, rf, e, d = jdiff.vp_linear(), jdiff.rectified_flow(t_min=0.0, t_max=1.0), jdiff.edm(), jdiff.vp_discrete()

    @jax.jit
    def draw(key):
        return (
            T.sample_times(key, n, p, "uniform"),
            T.sample_times(key, n, rf, "logit_normal", logit_mean=0.5, logit_std=0.8),
            T.sample_times(key, n, e, "log_normal"),
            T.sample_times(key, n, d, "discrete"),
            T.sample_times(key, 8, p, "uniform"),
            T.sample_times(jdiff.per_sample_keys(key, 1, offset=5), 1, p, "uniform"),
        )

    t_u, t_ln, t_edm, t_d, t_all, t_one = map(np.asarray, draw(jax.random.key(0)))
    # Monte-Carlo bounds, n = 20000: the uniform mean has SE 1 / sqrt(12 n) = 0.002 (0.01
    # is 5 SE); the logit-normal mean and std SE 0.8 / sqrt(n) = 0.006 and 0.8 / sqrt(2n)
    # = 0.004 (0.03: 5 and 7 SE); the log-normal ones 1.2 / sqrt(n) = 0.0085 and 0.006
    # (0.04: 4.7 and 6.7 SE). Discrete steps N t - 1 in float32: eps32 * N = 1.2e-4 of
    # rounding, atol 1e-3.
    assert t_u.shape == (n,) and t_u.min() >= p.t_min and t_u.max() <= p.t_max
    assert t_u.mean() == pytest.approx((p.t_min + p.t_max) / 2, abs=0.01)
    assert np.histogram(t_u, bins=10)[0].min() > 0.9 * n / 10

    z = np.log(t_ln) - np.log1p(-t_ln)
    assert z.mean() == pytest.approx(0.5, abs=0.03) and z.std() == pytest.approx(0.8, abs=0.03)

    assert np.log(t_edm).mean() == pytest.approx(-1.2, abs=0.04)
    assert np.log(t_edm).std() == pytest.approx(1.2, abs=0.04)

    steps = t_d * d.num_train_steps - 1
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert steps.min() >= -1e-3 and steps.max() <= d.num_train_steps - 1 + 1e-3
    assert np.unique(np.round(steps)).size > 990  # covers the table

    assert t_all[5] == t_one[0]  # sample i does not depend on its batch


def test_discrete_training_feeds_integer_timesteps():
    d = jdiff.vp_discrete()
    seen = []

    def apply(params, x, t_in, cond, key=None):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), t_in)
        return jnp.zeros_like(x)

    cfg = T.LossConfig(d, prediction="eps", time_sampling="discrete", time_input="timestep")
    jax.jit(T.make_loss_fn(apply, cfg))(None, {"x": jnp.zeros((64, 2))}, jax.random.key(0))
    ts = np.concatenate(seen)
    np.testing.assert_array_equal(ts, np.round(ts))
    assert ts.min() >= 0 and ts.max() <= 999


# ----------------------------------------------------------------- label dropout


def test_label_dropout_rate():
    n, p, k = 20000, 0.15, 10
    labels = jax.random.randint(jax.random.key(0), (n,), 0, k)
    out = T.drop_labels(jax.random.key(1), labels, k, p)
    dropped = np.asarray(out == k)
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(labels)[~dropped])


def test_label_dropout_inside_the_loss():
    """The model sees the null class with probability p: a model that outputs 1 exactly
    for the null class on zero data (x0 target 0) has mse = dropped fraction."""
    k, p, n = 5, 0.3, 8192
    apply = lambda prm, x, t, cond, key=None: jnp.broadcast_to((cond == k)[:, None], x.shape).astype(x.dtype)
    cfg = T.LossConfig(jdiff.vp_linear(), prediction="x0", label_dropout=p, num_classes=k)
    batch = {"x": jnp.zeros((n, 1)), "label": jnp.arange(n) % k}
    _, m = jax.jit(T.make_loss_fn(apply, cfg))(None, batch, jax.random.key(0))
    assert abs(float(m["mse"]) - p) < 4 * np.sqrt(p * (1 - p) / n)
    # no dropout configured: never the null class
    _, m = jax.jit(T.make_loss_fn(apply, T.LossConfig(jdiff.vp_linear(), prediction="x0")))(
        None, batch, jax.random.key(0)
    )
    assert float(m["mse"]) == 0.0


def test_loss_is_mean_of_per_sample_losses():
    """Each sample's randomness comes from its own key: the loss of a batch is the mean of
    the samples' losses computed alone (what accumulation and sharding rely on)."""
    apply = lambda p, x, t, c, key=None: p * x + t[:, None]
    lf = jax.jit(T.make_loss_fn(apply, T.LossConfig(jdiff.vp_cosine(), prediction="v", weighting="min_snr")))
    x = jax.random.normal(jax.random.key(0), (6, 3))
    keys = jdiff.per_sample_keys(jax.random.key(1), 6)
    full = lf(0.5, {"x": x}, jax.random.key(1))[0]
    parts = [lf(0.5, {"x": x[i : i + 1]}, keys[i : i + 1])[0] for i in range(6)]
    # a mean of 6 non-negative terms summed in another order: ~log2(6) u + 1 rounding of
    # the mean, under 4 eps32 = 5e-7 relative; rtol 1e-6
    np.testing.assert_allclose(full, np.mean(parts), rtol=1e-6)


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"weighting": "snr_magic"}, "unknown weighting 'snr_magic'"),
        ({"prediction": "noise"}, "unknown prediction 'noise'"),
        ({"time_sampling": "beta"}, "unknown time sampling 'beta'"),
        ({"precondition": "karras"}, "unknown preconditioning 'karras'"),
        ({"time_input": "step"}, "unknown time_input 'step'"),
        ({"time_sampling": "discrete"}, "needs a discrete process"),
        ({"label_dropout": 0.1}, "needs num_classes"),
        ({"label_dropout": 1.5, "num_classes": 3}, "probability"),
        ({"precondition": "edm", "prediction": "eps"}, "prediction='x0'"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        T.LossConfig(jdiff.vp_linear(), **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown weighting"):
        T.loss_weight("uniformish", jdiff.vp_linear(), "eps", jnp.ones(2) * 0.5)
    with pytest.raises(ValueError, match="unknown time sampling"):
        T.sample_times(jax.random.key(0), 4, jdiff.vp_linear(), "cosine")
    lf = T.make_loss_fn(lambda p, x, t, c, key=None: x[:, :1], T.LossConfig(jdiff.vp_linear()))
    with pytest.raises(ValueError, match="input's shape"):
        lf(None, {"x": jnp.zeros((4, 3))}, jax.random.key(0))
    with pytest.raises(ValueError, match="batch must be a dict"):
        lf(None, jnp.zeros((4, 3)), jax.random.key(0))
    with pytest.raises(TypeError, match="LossConfig"):
        T.make_loss_fn(lambda *a: None, {"process": "vp"})


# ------------------------------------------------------------ the noising seam


def test_noise_batch_is_per_sample():
    """Sample i's (t, eps) depend on its own key only: not on the rest of the batch, not
    on the data values; the same key on another batch of that shape gives the same
    (t, eps) (what a preference loss uses for its pairs)."""
    cfg = T.LossConfig(jdiff.vp_cosine(), time_sampling="logit_normal")
    key = jax.random.key(3)
    x0 = jax.random.normal(jax.random.key(4), (6, 2, 3))
    f = jax.jit(T.noise_batch, static_argnums=0)
    t, eps, xt = f(cfg, x0, key)
    assert t.shape == (6,) and eps.shape == x0.shape and xt.shape == x0.shape and xt.dtype == x0.dtype
    keys = jdiff.per_sample_keys(key, 6)
    for i in (0, 4):
        ti, ei, xi = f(cfg, x0[i : i + 1], keys[i : i + 1])
        # one sample alone is the same program on one row: bitwise equal
        np.testing.assert_array_equal(np.asarray(ti[0]), np.asarray(t[i]))
        np.testing.assert_array_equal(np.asarray(ei[0]), np.asarray(eps[i]))
        np.testing.assert_array_equal(np.asarray(xi[0]), np.asarray(xt[i]))
    other = x0.at[1:].set(-3.0 * x0[1:])  # other data, same key and shape
    t2, eps2, xt2 = f(cfg, other, key)
    np.testing.assert_array_equal(np.asarray(t2), np.asarray(t))
    np.testing.assert_array_equal(np.asarray(eps2), np.asarray(eps))
    np.testing.assert_array_equal(np.asarray(xt2[0]), np.asarray(xt[0]))
    # distinct samples get distinct draws
    assert np.unique(np.asarray(t)).size == 6
    # a Process alone means uniform time sampling
    t_u = T.noise_batch(jdiff.vp_cosine(), x0, key).t
    t_c = T.noise_batch(T.LossConfig(jdiff.vp_cosine()), x0, key).t
    np.testing.assert_array_equal(np.asarray(t_u), np.asarray(t_c))
    with pytest.raises(TypeError, match="LossConfig or a jdiff Process"):
        T.noise_batch("vp", x0, key)


@pytest.mark.parametrize("pname", ["vp_cosine", "edm", "rectified_flow"])
def test_noise_batch_forward_process(pname):
    """x_t = alpha(t) x0 + sigma(t) eps, t in the process's range, eps standard normal."""
    process = PROCESSES[pname]
    n, d = 4096, 4
    with jax.enable_x64(True):
        x0 = jax.random.normal(jax.random.key(0), (n, d), jnp.float64) * 0.7 + 0.2
        t, eps, xt = jax.jit(T.noise_batch, static_argnums=0)(T.LossConfig(process), x0, jax.random.key(1))
        (a, s), (da, ds) = jax.jvp(lambda u: (process.alpha(u), process.sigma(u)), (t,), (jnp.ones_like(t),))
        a, s, da, ds = (np.asarray(v)[:, None] for v in (a, s, da, ds))
        t, eps, xt, x0 = (np.asarray(v) for v in (t, eps, xt, x0))
    assert xt.dtype == np.float64 and eps.dtype == np.float64
    assert t.min() >= process.t_min and t.max() <= process.t_max
    # float64 rounding. The formula: two products and a sum rounded to half an ulp each,
    # in the library and in the reference: 3 eps (|a x0| + |s eps|). alpha and sigma are
    # evaluated in two compiled programs; each evaluation is exact up to a few roundings
    # of its argument (|t| eps each, carried by the derivative: a cosine schedule near
    # alpha = 0 is ill-conditioned) and of its value: 4 eps |t| (|a'| |x0| + |s'| |eps|)
    # + 4 eps (|a x0| + |s eps|). In all: 8 eps (|a x0| + |s eps| + |t| (|a' x0| + |s' eps|)).
    ref = a * x0 + s * eps
    scale = np.abs(a * x0) + np.abs(s * eps) + np.abs(t)[:, None] * (np.abs(da * x0) + np.abs(ds * eps))
    assert np.all(np.abs(xt - ref) <= 8 * np.finfo(np.float64).eps * scale)
    # eps ~ N(0, 1): mean and variance within 4 standard errors (SE 1/sqrt(N), sqrt(2/N))
    m = eps.size
    assert abs(eps.mean()) < 4 / np.sqrt(m) and abs(eps.var() - 1) < 4 * np.sqrt(2 / m)


@pytest.mark.parametrize("which", ["min_snr_v", "edm", "discrete_timestep"])
def test_denoising_loss_is_built_on_the_seam(which):
    """A loss written by hand on noise_batch + prediction_fn + from_x0_eps equals
    make_loss_fn's loss (same keys), so the seam draws exactly what the loss trains on."""
    cfg = {
        "min_snr_v": T.LossConfig(jdiff.vp_cosine(), prediction="v", weighting="min_snr"),
        "edm": T.edm_objective(),
        "discrete_timestep": T.LossConfig(
            jdiff.vp_discrete(), prediction="eps", time_sampling="discrete", time_input="timestep"
        ),
    }[which]
    apply = lambda p, x, t, c, key=None: jnp.tanh(x * p) + 0.1 * jnp.cos(t)[:, None]

    def by_hand(params, batch, key):
        x0 = batch["x"]
        t, eps, xt = T.noise_batch(cfg, x0, key)
        out = T.prediction_fn(apply, cfg)(params, xt, t, None, None)
        target = jdiff.from_x0_eps(cfg.prediction, x0, eps, t, cfg.process)
        w = T.loss_weight(cfg.weighting, cfg.process, cfg.prediction, t, sigma_data=cfg.sigma_data)
        return jnp.mean(w * jnp.mean((out - target) ** 2, axis=1))

    with jax.enable_x64(True):
        batch = {"x": jax.random.normal(jax.random.key(0), (64, 3), jnp.float64)}
        keys = jdiff.per_sample_keys(jax.random.key(1), 64)
        cfg_no_rng = dataclasses.replace(cfg, model_rng=False)
        got = jax.jit(T.make_loss_fn(apply, cfg_no_rng))(jnp.float64(0.8), batch, keys)[0]
        want = jax.jit(by_hand)(jnp.float64(0.8), batch, keys)
        # the same float64 operations in another order: a few eps64 relative
        np.testing.assert_allclose(float(got), float(want), rtol=1e-12)
