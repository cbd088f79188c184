"""The exponential-integrator core: phi functions, node weights, exactness of one step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32
from scipy import integrate

import jdiff
from jdiff._core import ei_step, ei_weights, geometry, phi
from jdiff.solvers.deis import lagrange_quadrature_weights

pytestmark = pytest.mark.usefixtures("x64")


def phi_ref(j, z):
    # phi_j(z) = (e^z - sum_{k<j} z^k/k!) / z^j, to a few float64 ulps: for |z| < 1 the
    # closed form cancels (by up to e / (z^j / j!), 4e4 ulps at z = 0.2, j = 4), so sum the
    # series sum_n z^n / (n + j)! instead; for |z| >= 1 the cancellation is below 60 ulps.
    if abs(z) < 1:
        return math.fsum(z**n / math.factorial(n + j) for n in range(40))
    return (math.exp(z) - sum(z**k / math.factorial(k) for k in range(j))) / z**j


@pytest.mark.parametrize("j", [1, 2, 3, 4])
def test_phi_matches_closed_form(j):
    zs = np.array([-30.0, -5.0, -1.5, -1.0001, -0.9999, -0.3, 0.2, 0.9999, 1.0001, 2.0, 6.0])
    got = np.asarray(phi(j, jnp.asarray(zs)))
    want = np.array([phi_ref(j, z) for z in zs])
    # float64; phi's recurrence for |z| >= 1 cancels like the closed form (<= 60 ulps ~ 1e-14),
    # its series is a 16-term Horner sum: 1e-11 leaves 1000x and still sees a wrong term
    np.testing.assert_allclose(got, want, rtol=1e-11)
    # at 0: 1/j!
    assert float(phi(j, jnp.asarray(0.0))) == pytest.approx(1.0 / math.factorial(j), rel=1e-15)
    # derivative phi_j' = phi_{j+1} + ... ; check grad finite at 0 and equal to 1/(j+1)!
    assert float(jax.grad(lambda z: phi(j, z))(0.0)) == pytest.approx(1.0 / math.factorial(j + 1), rel=1e-12)


def test_phi_float32_accuracy_small_h():
    # the float32 Horner series: the rounding of the constant 1/6 and of the last add, ~EPS32;
    # 4x margin, ~5e-7, below the z / 24 term (6e-4 relative) and far below the closed
    # form's cancellation in float32 (EPS32 / z^3 ~ 1e5 relative)
    z = jnp.asarray(1e-4, jnp.float32)
    assert float(phi(3, z)) == pytest.approx(1 / 6 + 1e-4 / 24, rel=4 * EPS32)


def _lagrange(theta, r_all, j):
    out = 1.0
    for k, rk in enumerate(r_all):
        if k != j:
            out *= (theta - rk) / (r_all[j] - rk)
    return out


@pytest.mark.parametrize("mode", ["data", "noise"])
def test_closed_form_weights_equal_lagrange_integrals(mode):
    # w_j = int_0^1 e^{z(1 - theta)} l_j(theta) dtheta, l_j the Lagrange basis through the
    # current node (theta = 0) and the active nodes r_1..r_q; z = -h (data) or +h (noise).
    h = 0.83
    z = -h if mode == "data" else h
    r = [-0.7, -1.6, -2.2]
    for q in (1, 2, 3):
        w = np.asarray(ei_weights(jnp.asarray(r), q, jnp.asarray(z)))
        r_all = [0.0] + r[:q]
        for j in range(1, q + 1):
            want = integrate.quad(lambda th: math.exp(z * (1 - th)) * _lagrange(th, r_all, j), 0, 1, epsrel=1e-13)[0]
            assert w[j - 1] == pytest.approx(want, rel=1e-10, abs=1e-13)
        assert np.all(w[q:] == 0)


def test_quadrature_weights_in_lambda_equal_closed_form():
    # DEIS's quadrature path with a lambda basis must reproduce the closed form.
    p = jdiff.vp_linear()
    g = geometry(p, 0.6, 0.45, jnp.float64)
    lam_nodes = g.lam_s + jnp.array([-0.7, -1.6, -2.2]) * g.h
    r = (lam_nodes - g.lam_s) / g.h
    for q in (1, 2, 3):
        wq = lagrange_quadrature_weights(lambda lam: lam, g, lam_nodes, q, jnp.float64)
        np.testing.assert_allclose(ei_weights(r, q, g.h), wq, rtol=1e-10, atol=1e-12)


def test_bh_variants_differ_only_with_one_node():
    r = jnp.array([-0.8, -1.7])
    z = jnp.asarray(-0.9)
    for q in (2,):
        np.testing.assert_allclose(ei_weights(r, q, z, "bh1"), ei_weights(r, q, z, "exact"), rtol=1e-13)
        np.testing.assert_allclose(ei_weights(r, q, z, "bh2"), ei_weights(r, q, z, "exact"), rtol=1e-13)
    # one node: w = B/(2 r) with B = 1 (bh1) or phi_1(z) (bh2); exact uses phi_2(z)/r
    np.testing.assert_allclose(ei_weights(r, 1, z, "bh1")[0], 1 / (2 * r[0]), rtol=1e-13)
    np.testing.assert_allclose(ei_weights(r, 1, z, "bh2")[0], phi(1, z) / (2 * r[0]), rtol=1e-13)
    np.testing.assert_allclose(ei_weights(r, 1, z, "exact")[0], phi(2, z) / r[0], rtol=1e-13)


def _exact_linear_solution(p, s, t, x_s, poly, mode):
    """x_t for dx/dlambda in the exact form with the prediction m(lambda) = poly(lambda)."""
    ls, lt = float(p.lambda_(s)), float(p.lambda_(t))
    if mode == "data":
        integral = integrate.quad(lambda l: math.exp(l) * poly(l), ls, lt, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
        return float(p.sigma(t) / p.sigma(s)) * x_s + float(p.sigma(t)) * integral
    integral = integrate.quad(lambda l: math.exp(-l) * poly(l), ls, lt, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
    return float(p.alpha(t) / p.alpha(s)) * x_s - float(p.alpha(t)) * integral


@pytest.mark.parametrize("mode", ["data", "noise"])
@pytest.mark.parametrize("q", [0, 1, 2, 3])
def test_one_step_is_exact_for_polynomial_predictions(mode, q):
    # With q nodes, the step integrates any prediction that is a polynomial of degree q in
    # lambda exactly: the defining property of the exponential-integrator core.
    p = jdiff.vp_linear()
    s, t = 0.7, 0.4
    g = geometry(p, s, t, jnp.float64)
    coeffs = [0.3, -1.1, 0.7, 0.25][: q + 1]
    poly = lambda l: sum(c * (l - 0.5) ** k for k, c in enumerate(coeffs))  # noqa: E731
    ls = float(g.lam_s)
    r = jnp.array([-0.6, -1.3, 0.5])[:q] if q else jnp.zeros((0,))
    lam_nodes = [ls + float(rr) * float(g.h) for rr in np.asarray(r)]
    m0 = poly(ls)
    D = jnp.array([[poly(ln) - m0] for ln in lam_nodes]).reshape(q, 1) if q else None
    x_s = jnp.array([0.37])
    x0_dummy = jnp.array([m0]) if mode == "data" else jnp.array([0.0])
    got = ei_step(x_s, g, jnp.array([m0]), D, r, q, mode=mode, coef="exact", x0=x0_dummy)
    want = _exact_linear_solution(p, s, t, 0.37, poly, mode)
    assert float(got[0]) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_infinite_step_fallback_is_finite_with_finite_gradients():
    p = jdiff.rectified_flow()
    x = jnp.array([[0.3, -0.2]])
    x0 = jnp.array([[1.0, 2.0]])
    eps = (x - 0.0 * x0) / 1.0
    for s, t in [(1.0, 0.5), (0.3, 0.0)]:  # out of alpha = 0, into sigma = 0
        g = geometry(p, s, t, jnp.float64)
        assert not bool(g.finite)
        for mode, m in [("data", x0), ("noise", eps)]:
            D = jnp.stack([x0 * 0.1, x0 * 0.2])
            out = ei_step(x, g, m, D, jnp.array([-0.5, -1.0]), 2, mode=mode, x0=x0)
            # exact first-order limit: sigma_t/sigma_s x + alpha_t x0
            np.testing.assert_allclose(out, p.sigma(t) / p.sigma(s) * x + p.alpha(t) * x0, rtol=1e-12)
            gr = jax.grad(lambda xx: jnp.sum(ei_step(xx, g, m, D, jnp.array([-0.5, -1.0]), 2, mode=mode, x0=x0)))(x)
            assert bool(jnp.all(jnp.isfinite(gr)))
