"""Parameterization conversions and the Denoiser boundary."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff

pytestmark = pytest.mark.usefixtures("x64")

PROCS = {
    "vp_linear": jdiff.vp_linear(),
    "sub_vp": jdiff.sub_vp(),
    "edm": jdiff.edm(),
    "rectified_flow": jdiff.rectified_flow(),
    "ve": jdiff.ve(),
}


@pytest.fixture(scope="module")
def data(x64):
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, (5, 3), jnp.float64), jax.random.normal(k2, (5, 3), jnp.float64)


@pytest.mark.parametrize("pname", list(PROCS))
def test_all_pairs_round_trip(pname, data):
    p = PROCS[pname]
    x0, eps = data
    t = jnp.linspace(p.t_min + 0.1 * (p.t_max - p.t_min), 0.9 * p.t_max, 5)  # per-sample times
    a = p.alpha(t)[:, None]
    s = p.sigma(t)[:, None]
    x = a * x0 + s * eps
    # float64: each conversion is a few ops dividing by alpha or sigma (>= ~0.02 at these
    # times), so errors stay ~1e-13; 1e-9 still sees any wrong coefficient
    for src, dst in itertools.product(jdiff.PREDICTIONS, repeat=2):
        out = jdiff.from_x0_eps(src, x0, eps, t, p)
        back = jdiff.to_x0_eps(src, out, x, t, p)
        np.testing.assert_allclose(back.x0, x0, rtol=1e-9, atol=1e-9, err_msg=f"{src}")
        np.testing.assert_allclose(back.eps, eps, rtol=1e-9, atol=1e-9, err_msg=f"{src}")
        conv = jdiff.convert(out, x, t, p, src, dst)
        np.testing.assert_allclose(conv, jdiff.from_x0_eps(dst, x0, eps, t, p), rtol=1e-9, atol=1e-9)


def test_definitions(data):
    x0, eps = data
    p = PROCS["rectified_flow"]
    t = jnp.full((5,), 0.3)
    np.testing.assert_allclose(jdiff.from_x0_eps("flow", x0, eps, t, p), eps - x0, rtol=1e-12)
    q = PROCS["vp_linear"]
    a, s = q.alpha(0.3), q.sigma(0.3)
    np.testing.assert_allclose(jdiff.from_x0_eps("v", x0, eps, 0.3, q), a * eps - s * x0, rtol=1e-12)
    np.testing.assert_allclose(jdiff.from_x0_eps("score", x0, eps, 0.3, q), -eps / s, rtol=1e-12)
    # flow = dx/dt along the path x_t = alpha x0 + sigma eps
    f = lambda u: q.alpha(u) * x0 + q.sigma(u) * eps  # noqa: E731
    np.testing.assert_allclose(jdiff.from_x0_eps("flow", x0, eps, 0.3, q), jax.jacfwd(f)(0.3), rtol=1e-9)


def test_zero_terminal_snr_conversions_finite(data):
    x0, eps = data
    p = PROCS["rectified_flow"]
    x = eps  # t = 1: alpha = 0
    for kind in ("x0", "v", "flow"):
        out = jdiff.from_x0_eps(kind, x0, eps, 1.0, p)
        back = jdiff.to_x0_eps(kind, out, x, 1.0, p)
        assert bool(jnp.all(jnp.isfinite(back.x0))) and bool(jnp.all(jnp.isfinite(back.eps))), kind
        np.testing.assert_allclose(back.eps, eps, atol=1e-12)


def test_denoiser_wraps_model(data):
    x0, eps = data
    p = PROCS["vp_linear"]
    seen = {}

    def net(params, x, t, cond):
        seen["t"] = t
        return params["w"] * x + cond

    den = jdiff.denoiser(net, p, "eps", params={"w": jnp.asarray(0.5)})
    out = den(x0, 0.4, 1.0)
    assert seen["t"].shape == (5,)
    np.testing.assert_allclose(out.eps, 0.5 * x0 + 1.0)
    np.testing.assert_allclose(out.x0, (x0 - p.sigma(0.4) * out.eps) / p.alpha(0.4))
    # the denoiser is a pytree: params are leaves, differentiable
    g = jax.grad(lambda d: jnp.sum(d(x0, 0.4, 1.0).eps))(den)
    np.testing.assert_allclose(g.params["w"], jnp.sum(x0))


def test_time_inputs():
    p = jdiff.vp_discrete()
    got = {}
    for ti in ("t", "timestep", "sigma", "rho", "log_rho"):
        den = jdiff.denoiser(lambda x, t, c, ti=ti: (got.__setitem__(ti, t), x)[1], p, "x0", time_input=ti)
        den(jnp.ones((2, 1)), 0.5)
    np.testing.assert_allclose(got["timestep"], 499.0)
    np.testing.assert_allclose(got["sigma"], p.sigma(0.5))
    np.testing.assert_allclose(got["log_rho"], -p.lambda_(0.5))
    with pytest.raises(ValueError, match="discrete process"):
        jdiff.denoiser(lambda x, t, c: x, jdiff.vp_linear(), time_input="timestep")


def test_denoiser_errors():
    p = PROCS["vp_linear"]
    with pytest.raises(ValueError, match="unknown parameterization 'epsilon'"):
        jdiff.denoiser(lambda x, t, c: x, p, "epsilon")
    with pytest.raises(ValueError, match="unknown time_input"):
        jdiff.denoiser(lambda x, t, c: x, p, time_input="minutes")
    with pytest.raises(TypeError, match="jdiff Process"):
        jdiff.denoiser(lambda x, t, c: x, "vp")
    den = jdiff.denoiser(lambda x, t, c: x[:, :2], p)
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\) for input of shape \(4, 3\)"):
        den(jnp.ones((4, 3)), 0.5)
    with pytest.raises(ValueError, match="unknown parameterization"):
        jdiff.from_x0_eps("noise", 1.0, 1.0, 0.5, p)
