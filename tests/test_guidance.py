"""Guidance wrappers (jdiff.wrappers) and the solvers' guidance options.

Float64 throughout (the module's ``x64`` fixture): the wrappers are compared with hand
computations in NumPy float64 and with the testbed's closed forms. Tiny shapes; the
programs that matter are each compiled once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS64

import jdiff
from jdiff import solvers as S
from jdiff.testbed import GaussianMixture
from jdiff.wrappers import APG, autoguidance, classifier_guidance, guidance, schedule

pytestmark = pytest.mark.usefixtures("x64")

VP = jdiff.vp_linear()
FLOW = jdiff.rectified_flow()
NULL = 2  # the null label; labels 0 and 1 are the classes

MEANS = np.array([[1.0, -1.0, 0.5], [-1.0, 0.5, 1.0]])
STDS = np.array([[0.3, 0.5, 0.4], [0.4, 0.3, 0.6]])
PI = np.array([0.3, 0.7])
MIX = GaussianMixture(PI, MEANS, STDS)  # the unconditional data: class y is component y
CLASS = [GaussianMixture([1.0], MEANS[y : y + 1], STDS[y : y + 1]) for y in (0, 1)]


def _cheap_apply(x, t, c):
    return 0.5 * jnp.tanh(x) + 0.3 * (c[:, None] - 1.0) * t[:, None] + 0.1 * jnp.sin(3.0 * x)


def _cheap(process, kind):
    """A cheap nonlinear conditional model (compiles fast), predicting ``kind``."""
    return jdiff.denoiser(_cheap_apply, process, kind)


def _cheap_weak_apply(x, t, c):
    return 0.4 * jnp.tanh(x) + 0.2 * (c[:, None] - 1.0) * t[:, None]


def _weak(process, kind):
    """A weaker model: the autoguidance guide."""
    return jdiff.denoiser(_cheap_weak_apply, process, kind)


def _logits(x, t, process):
    """The exact noisy classifier of MIX: log pi_y + log N(x; alpha mu_y, alpha^2 s_y^2 + sigma^2)."""
    a = jnp.reshape(process.alpha(t), (-1, 1, 1))
    s = jnp.reshape(process.sigma(t), (-1, 1, 1))
    v = a * a * STDS[None] ** 2 + s * s
    diff = x[:, None, :] - a * MEANS[None]
    return jnp.log(PI)[None] - 0.5 * jnp.sum(diff * diff / v + jnp.log(2 * jnp.pi * v), -1)


def _vp_classifier(x, t):
    return _logits(x, t, VP)


X = np.array([[0.3, -0.7, 1.1], [-1.2, 0.4, 0.2], [0.5, 0.5, -0.3], [2.0, -1.0, 0.1]])
COND = np.array([0, 1, 1, 0])


# ------------------------------------------------------------- neutral settings


def test_every_wrapper_is_the_plain_denoiser_at_its_neutral_setting():
    """Scale 1, an empty interval, rescale 0, APG at scale 1, a schedule of ones,
    autoguidance w = 1, classifier scale 0: bit for bit the plain denoiser, for a VP
    process with eps prediction (a scalar time and per-sample times) and rectified flow
    with velocity prediction. CFG's batched form (one call of 2B) is bit for bit the
    conditional half of that call."""
    combos = [(VP, "eps", (jnp.asarray(0.5), jnp.asarray([0.2, 0.4, 0.6, 0.8]))), (FLOW, "flow", (0.3,))]

    def run(x, c):
        out = []
        for process, kind, ts in combos:
            den, weak = _cheap(process, kind), _weak(process, kind)
            grid = jnp.linspace(0.9, 0.1, 5)
            unbatched = dict(batched=False)
            wrappers = [
                guidance(den, 1.0, NULL, **unbatched),
                guidance(den, jnp.ones(4), NULL, **unbatched),
                guidance(den, 3.0, NULL, interval=(0.7, 0.7)),  # empty: never guided
                guidance(den, 1.0, NULL, apg=APG(eta=0.3, norm_threshold=0.5), **unbatched),
                guidance(den, schedule(grid, jnp.ones(5)), NULL, **unbatched),
                guidance(den, lambda t: 1.0 + 0.0 * t, NULL, **unbatched),
                autoguidance(den, weak, 1.0),
                classifier_guidance(den, lambda x, t: jnp.stack([x.sum(1) * t, -x[:, 0]], 1), 0.0),
            ]
            for t in ts:
                t = jnp.asarray(t)
                ref = den(x, t, c)
                for w in wrappers:
                    p = w(x, t, c)
                    out.append((p.x0 - ref.x0, p.eps - ref.eps))
                # batched: against the conditional half of the plain call on 2B
                t2 = t if t.ndim == 0 else jnp.concatenate([t, t])
                half = den(jnp.concatenate([x, x]), t2, jnp.concatenate([c, jnp.full_like(c, NULL)]))
                for w in (guidance(den, 1.0, NULL), guidance(den, 1.0, NULL, apg=APG(eta=0.5))):
                    p = w(x, t, c)
                    out.append((p.x0 - half.x0[:4], p.eps - half.eps[:4]))
        return out

    for dx0, deps in jax.jit(run)(jnp.asarray(X), jnp.asarray(COND)):
        assert np.all(np.asarray(dx0) == 0) and np.all(np.asarray(deps) == 0)


# --------------------------------------------------------- hand computations

A = np.array([[[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], [[-2.0, 1.0, 0.5], [1.5, -0.5, 2.0]]])  # x0 given c = 1
U = np.array([[[0.5, 1.0, 0.0], [1.0, -1.0, 2.0]], [[-1.0, 0.0, 1.5], [0.5, 0.5, 1.0]]])  # x0 given null
XH = np.linspace(-1.0, 1.3, 12).reshape(2, 2, 3)


def _fixed(process):
    """A denoiser whose x0 prediction is A (label 1) or U (null), whatever x and t."""

    def apply(x, t, c):
        reps = (x.shape[0] // 2, 1, 1)  # the batch of 2 (or 4: conditional and null rows)
        return jnp.where(jnp.reshape(c, (-1, 1, 1)) == 1, jnp.tile(A, reps), jnp.tile(U, reps))

    return jdiff.denoiser(apply, process, "x0")


def _std(a):
    return a.reshape(len(a), -1).std(1).reshape(-1, 1, 1)


def _norm(a):
    return np.sqrt((a * a).reshape(len(a), -1).sum(1)).reshape(-1, 1, 1)


def _apg_np(d, x0c, eta, r):
    d = d * np.minimum(1.0, r / _norm(d))
    u = x0c / _norm(x0c)
    par = (d * u).reshape(len(d), -1).sum(1).reshape(-1, 1, 1) * u
    return (d - par) + eta * par


def test_rescale_and_apg_against_hand_computation():
    t = 0.4
    a, s = float(VP.alpha(t)), float(VP.sigma(t))
    den = _fixed(VP)
    w, phi = 3.0, 0.7
    cases = {
        "cfg": guidance(den, w, NULL),
        "rescale_x0": guidance(den, w, NULL, rescale=phi, rescale_on="x0"),
        "rescale_v": guidance(den, w, NULL, rescale=phi),
        "rescale_eps": guidance(den, w, NULL, rescale=phi, rescale_on="eps"),
        "apg": guidance(den, w, NULL, apg=APG(eta=0.25, norm_threshold=1.5)),
    }
    cases["full"] = guidance(den, w, NULL, rescale=1.0, rescale_on="x0")
    got = jax.jit(lambda x: {k: g(x, t, jnp.ones(2, jnp.int32)) for k, g in cases.items()})(jnp.asarray(XH))
    full = got.pop("full")

    g = U + w * (A - U)
    want = {"cfg": g, "apg": A + (w - 1) * _apg_np(A - U, A, 0.25, 1.5)}
    want["rescale_x0"] = g * (phi * _std(A) / _std(g) + 1 - phi)
    eps_of = lambda x0: (XH - a * x0) / s  # noqa: E731
    vc, vg = a * eps_of(A) - s * A, a * eps_of(g) - s * g
    v = vg * (phi * _std(vc) / _std(vg) + 1 - phi)
    want["rescale_v"] = (a * XH - s * v) / (a * a + s * s)
    ec, eg = eps_of(A), eps_of(g)
    want["rescale_eps"] = (XH - s * eg * (phi * _std(ec) / _std(eg) + 1 - phi)) / a
    # the norm clipping must act: the raw difference is longer than r
    assert np.all(_norm(A - U) > 1.5)
    for k, p in got.items():
        # values O(10) (x0 up to |w| |A - U| + |A|, divided by alpha ~ 0.9 or a^2 + s^2 = 1):
        # tens of float64 roundings; 64 ulps of 10
        np.testing.assert_allclose(p.x0, want[k], rtol=0, atol=64 * EPS64 * 10, err_msg=k)
        np.testing.assert_allclose(a * p.x0 + s * p.eps, XH, rtol=0, atol=64 * EPS64 * 10, err_msg=k)
    # rescaling matches the std of the conditional prediction when phi = 1
    np.testing.assert_allclose(_std(np.asarray(full.x0)), _std(A), rtol=64 * EPS64)


def test_apg_momentum_is_carried_by_the_solver():
    """DDIM(guidance_memory=True) with APG momentum, three steps against the recursion
    ``m_k = d + beta m_{k-1}`` by hand; without the solver option the wrapper refuses."""
    den = _fixed(VP)
    beta, w, eta, r = -0.5, 2.5, 0.0, 2.0
    g = guidance(den, w, NULL, apg=APG(eta=eta, norm_threshold=r, momentum=beta))
    grid = np.array([0.9, 0.6, 0.35, 0.1])
    cond = jnp.ones(2, jnp.int32)
    x, info = jdiff.sample(
        S.ddim(guidance_memory=True), g, jnp.asarray(XH), jnp.asarray(grid), cond=cond, return_info=True
    )
    xs, m = XH.copy(), 0.0
    for k in range(3):
        a0, s0 = float(VP.alpha(grid[k])), float(VP.sigma(grid[k]))
        a1, s1 = float(VP.alpha(grid[k + 1])), float(VP.sigma(grid[k + 1]))
        m = (A - U) + beta * m
        x0 = A + (w - 1) * _apg_np(m, A, eta, r)
        xs = a1 * x0 + s1 * (xs - a0 * x0) / s0
    # three steps of terms O(10): 64 ulps of 10
    np.testing.assert_allclose(x, xs, rtol=0, atol=64 * EPS64 * 10)
    assert int(info.nfe) == 6  # 3 evaluations of 2 calls
    # with momentum 0 the memory is carried but unused: the plain DDIM result
    with pytest.raises(ValueError, match="momentum needs state across steps"):
        g(jnp.asarray(XH), 0.5, cond)
    with pytest.raises(ValueError, match="momentum needs state across steps"):
        jdiff.sample(S.ddim(), g, jnp.asarray(XH), jnp.asarray(grid), cond=cond)


# ----------------------------------------------------------------- CFG++


def test_cfgpp_ddim_and_euler_steps():
    """One CFG++ step by hand for DDIM and Euler (in t and rho), for a VP process and
    rectified flow: the guided x0 renoised with the unconditional eps; at scale 0 CFG++
    is DDIM on the unconditional model."""
    lam = 0.6
    t0, t1 = 0.7, 0.45
    grid = jnp.asarray([t0, t1])
    cond = jnp.ones(2, jnp.int32)
    runs = [
        (VP, "ddim", S.ddim(cfgpp=True)),
        (VP, "euler", S.euler(cfgpp=True)),
        (VP, "ddim", S.euler("rho", cfgpp=True)),  # Euler in rho is DDIM, with CFG++ too
        (FLOW, "euler", S.euler(cfgpp=True)),
    ]
    for proc, form, solver in runs:
        den = guidance(_fixed(proc), lam, NULL)
        got = jdiff.sample(solver, den, jnp.asarray(XH), grid, cond=cond)
        a0, s0, a1, s1 = (float(f(t)) for t in (t0, t1) for f in (proc.alpha, proc.sigma))
        da, ds = float(proc.d_alpha(t0)), float(proc.d_sigma(t0))
        x0g, eps_u = U + lam * (A - U), (XH - a0 * U) / s0
        if form == "ddim":
            want = a1 * x0g + s1 * eps_u
        else:
            want = (a0 + (t1 - t0) * da) * x0g + (s0 + (t1 - t0) * ds) * eps_u
        # a few operations on terms O(10): 64 ulps of 10
        tol = 64 * EPS64 * 10
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=solver.name)
    # CFG++ is not plain CFG: DDIM renoises with eps_g = (x - a0 x0g) / s0, which differs
    # from eps_u by a0 lam (A - U) / s0 (VP, the last a0, s0, s1 are rectified flow's)
    a0, s0, s1 = float(VP.alpha(t0)), float(VP.sigma(t0)), float(VP.sigma(t1))
    den = guidance(_fixed(VP), lam, NULL)
    diff = jdiff.sample(S.ddim(), den, jnp.asarray(XH), grid, cond=cond) - jdiff.sample(
        S.ddim(cfgpp=True), den, jnp.asarray(XH), grid, cond=cond
    )
    np.testing.assert_allclose(diff, -s1 * a0 * lam * (A - U) / s0, rtol=0, atol=tol)

    # several steps of a nonlinear model: at scale 0 CFG++ is DDIM on the unconditional model
    den = _cheap(VP, "eps")
    x_T = jnp.asarray(X)
    c = jnp.asarray(COND)
    g6 = jdiff.time_grid(VP, 6)
    at0 = jdiff.sample(S.ddim(cfgpp=True), guidance(den, 0.0, NULL), x_T, g6, cond=c)
    uncond = jdiff.sample(S.ddim(), den, x_T, g6, cond=jnp.full(4, NULL))
    # p_c + (0 - 1)(p_c - p_u) is p_u to rounding: 256 ulps of the largest value, six steps
    scale = float(jnp.max(jnp.abs(uncond)))
    np.testing.assert_allclose(at0, uncond, rtol=0, atol=256 * EPS64 * scale)
    with pytest.raises(TypeError, match="needs a guidance wrapper"):
        jdiff.sample(S.ddim(cfgpp=True), den, x_T, g6, cond=c)


# ------------------------------------------------------- guidance interval / NFE

CALLS = []


def _counting_apply(x, t, c):
    b = x.shape[0]
    jax.debug.callback(lambda: CALLS.append(b))  # runs only when the call is executed
    return _cheap_apply(x, t, c)


def test_guidance_interval_spends_fewer_calls_and_nfe_counts_them():
    den = jdiff.denoiser(_counting_apply, VP, "eps")
    x_T = jnp.asarray(X)
    c = jnp.asarray(COND)
    grid = jdiff.time_grid(VP, 8)
    lo, hi = 0.3, 3.0
    inside = lambda t: (lo < VP.rho(t)) & (VP.rho(t) <= hi)  # noqa: E731
    rho = np.asarray(VP.rho(grid[:-1]))
    n_in = int(np.sum((rho > lo) & (rho <= hi)))
    assert 0 < n_in < 8  # the interval cuts the grid
    results = {}
    for name, solver, wrapper in [
        ("cfg", S.ddim(), guidance(den, 2.0, NULL)),
        ("interval", S.ddim(), guidance(den, 2.0, NULL, interval=(lo, hi))),
        ("heun", S.heun(), guidance(den, 2.0, NULL, interval=(lo, hi))),
    ]:
        CALLS.clear()
        x, info = jdiff.sample(solver, wrapper, x_T, grid, cond=c, return_info=True)
        jax.block_until_ready(x)
        jax.effects_barrier()
        results[name] = (int(info.nfe), sum(CALLS) // 4, x)
    nfe_cfg, ran_cfg, x_cfg = results["cfg"]
    nfe_int, ran_int, x_int = results["interval"]
    assert nfe_cfg == ran_cfg == 16
    assert nfe_int == ran_int == 8 + n_in < nfe_cfg
    # Heun also evaluates at each step's end (7 corrections, none into sigma = 0 here)
    times = np.concatenate([np.asarray(grid[:-1]), np.asarray(grid[1:])])
    want_heun = int(np.sum(np.where(np.asarray(inside(times)), 2, 1)))
    assert results["heun"][0] == results["heun"][1] == want_heun
    # and the result changed where it should: interval guidance is neither CFG nor no guidance
    assert float(jnp.max(jnp.abs(x_int - x_cfg))) > 1e-3
    # calls(t) of the wrapper is what the solvers add up
    g = guidance(den, 2.0, NULL, interval=(lo, hi))
    want = np.where(np.asarray(inside(grid[:-1])), 2, 1)
    np.testing.assert_array_equal(jax.jit(jax.vmap(g.calls))(grid[:-1]), want)


# --------------------------------------------------------- classifier guidance


def test_classifier_guidance_matches_the_exact_conditional_denoiser():
    """With the exact noisy classifier of the testbed, classifier guidance of the exact
    unconditional denoiser at scale 1 is the exact class-conditional denoiser
    (Bayes: score(x | y) = score(x) + grad log p(y | x)); at scale w the eps is
    ``eps_u + w (eps_y - eps_u)``."""
    uncond = MIX.denoiser(VP)
    y = jnp.asarray(COND)

    def run(x, t, w):
        p = classifier_guidance(uncond, _vp_classifier, w, labels=y)(x, t)
        q = classifier_guidance(uncond, _vp_classifier, w)(x, t, y)  # labels from cond
        pu = uncond(x, t)
        e0, e1 = CLASS[0].posterior(x, t, VP), CLASS[1].posterior(x, t, VP)
        sel = (y == 0)[:, None]
        return p, q, pu, jnp.where(sel, e0.x0, e1.x0), jnp.where(sel, e0.eps, e1.eps)

    f = jax.jit(run)
    for t in (0.2, 0.5, 0.8):
        for w in (1.0, 2.5):
            p, q, pu, ex0, eeps = f(jnp.asarray(X), t, w)
            # float64 mixture posteriors and a log-sum-exp gradient, values O(3), scaled by
            # sigma^2 / alpha <= 20 at t = 0.8: 1e3 ulps of 3 x 20
            tol = 1e3 * EPS64 * 60
            np.testing.assert_allclose(p.eps, pu.eps + w * (eeps - pu.eps), rtol=0, atol=tol)
            np.testing.assert_allclose(p.x0, pu.x0 + w * (ex0 - pu.x0), rtol=0, atol=tol)
            np.testing.assert_array_equal(p.x0, q.x0)
            assert float(jnp.max(jnp.abs(p.x0 - pu.x0))) > 0.01  # the guidance does something
    assert int(classifier_guidance(uncond, _vp_classifier, 1.0).calls(0.5)) == 1


# ------------------------------------------------------------ time-varying scale


def test_schedule_on_the_grid_is_the_per_step_scale():
    """A :func:`schedule` on the sampling grid gives step k the scale ``values[k]``: the
    run equals step-by-step DDIM with constant scales (one compiled program for both
    loops' steps); a callable scale is the same thing."""
    den = _cheap(VP, "v")
    grid = jdiff.time_grid(VP, 5)
    values = jnp.asarray([4.0, 3.0, 2.0, 1.5, 1.0, 1.0])
    c = jnp.asarray(COND)
    x_sched = jdiff.sample(S.ddim(), guidance(den, schedule(grid, values), NULL), jnp.asarray(X), grid, cond=c)
    x = jnp.asarray(X)
    for k in range(5):
        x = jdiff.sample(S.ddim(), guidance(den, values[k], NULL), x, grid[k : k + 2], cond=c)
    # the same arithmetic step by step (interp at a grid point returns the value exactly)
    np.testing.assert_allclose(x_sched, x, rtol=0, atol=16 * EPS64 * 3)
    gi = guidance(den, lambda t: 1.0 + 3.0 * t, NULL)
    gs = guidance(den, 1.0 + 3.0 * 0.4, NULL)
    np.testing.assert_array_equal(gi(jnp.asarray(X), 0.4, c).x0, gs(jnp.asarray(X), 0.4, c).x0)


# ----------------------------------------------------------------- errors


GRID = np.array([0.9, 0.5, 0.1])


def test_bad_settings_raise_clear_errors_before_sampling():
    den = _cheap(VP, "eps")
    x, c = jnp.asarray(X), jnp.asarray(COND)
    for bad in (float("nan"), float("inf"), jnp.asarray([1.0, jnp.nan, 1.0, 1.0])):
        with pytest.raises(ValueError, match="must be finite"):
            guidance(den, bad, NULL)
        with pytest.raises(ValueError, match="must be finite"):
            autoguidance(den, _weak(VP, "eps"), bad)
        with pytest.raises(ValueError, match="must be finite"):
            classifier_guidance(den, _vp_classifier, bad)
    with pytest.raises(ValueError, match="must be finite"):
        schedule(jnp.linspace(1, 0.1, 3), jnp.asarray([1.0, jnp.inf, 2.0]))
    with pytest.raises(ValueError, match="strictly monotone"):
        schedule(jnp.asarray([0.9, 0.9, 0.1]), jnp.ones(3))
    for interval in ((-0.5, 1.0), (2.0, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match=r"0 <= lo <= hi"):
            guidance(den, 2.0, NULL, interval=interval)
    with pytest.raises(ValueError, match="interval_on"):
        guidance(den, 2.0, NULL, interval=(0.1, 1.0), interval_on="snr")
    with pytest.raises(ValueError, match=r"rescale \(phi\) must be in \[0, 1\], got 1.5"):
        guidance(den, 2.0, NULL, rescale=1.5)
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        APG(norm_threshold=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        APG(momentum=1.0)
    with pytest.raises(ValueError, match=r"one per sample \(4,\)"):
        guidance(den, jnp.ones(3), NULL)(x, 0.5, c)
    with pytest.raises(ValueError, match="needs a conditioning"):
        guidance(den, 2.0, NULL, interval=(0.1, 1.0))(x, 0.5)
    with pytest.raises(ValueError, match="non-finite"):  # a callable is checked when called
        guidance(den, lambda t: jnp.log(t - 1.0), NULL)(x, 0.5, c)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        classifier_guidance(den, _vp_classifier, 1.0, labels=jnp.asarray([0, 1, 2, 0]))(x, 0.5, c)
    with pytest.raises(ValueError, match="one process"):
        autoguidance(den, _weak(FLOW, "eps"), 2.0)
    with pytest.raises(ValueError, match="Adjoint"):
        jdiff.sample(
            S.ddim(), guidance(den, 2.0, NULL, interval=(0.1, 1.0)), x, nfe=4, cond=c, gradient=jdiff.Adjoint()
        )
    with pytest.raises(ValueError, match="Adjoint"):
        jdiff.sample(S.ddim(cfgpp=True), guidance(den, 2.0, NULL), x, GRID, cond=c, gradient=jdiff.Adjoint())
