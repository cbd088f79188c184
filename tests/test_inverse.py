"""Inverse problems (jdiff.inverse_problems): operator identities, the exact mixture posterior,
posterior samplers against it, DDRM's exact consistency, per-sample independence and
input checks.

The samplers run on a 4-D Gaussian-mixture testbed with its exact denoiser, where the
posterior under a linear Gaussian measurement is again a Gaussian mixture
(:func:`jdiff.inverse_problems.mixture_posterior`), sampled exactly. One batch of ``B`` copies of
one measurement per sampler is one compiled program, shared by the independence checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, EPS64, assert_moments_match

import jdiff
from jdiff import inverse_problems as I
from jdiff.metrics import frechet_distance, gaussian_stats
from jdiff.testbed import GaussianMixture

B = 1000
NFE = 100
SIGMA_Y = 0.1


def _mixture():
    return GaussianMixture(
        [0.3, 0.3, 0.4],
        [[-1.5, 1.0, 0.0, 0.5], [1.5, -1.0, 0.5, 0.0], [0.0, 1.5, -1.0, -1.0]],
        [[0.3, 0.4, 0.5, 0.3], [0.5, 0.3, 0.3, 0.4], [0.4, 0.4, 0.3, 0.5]],
    )


# ------------------------------------------------------------------ operators (float64)
def _operators(key):
    shape = (4, 4, 2)
    return {
        "inpainting": I.inpainting(np.arange(32).reshape(shape) % 3 != 0),
        "super_resolution": I.super_resolution(shape, 2),
        "blur": I.gaussian_blur(shape, 0.8),
        "random_projection": I.random_projection(key, shape, 12),
    }


def _dense(op, dtype):
    """The operator's matrix ``(m, n)``, column j = A e_j."""
    eye = jnp.eye(op.n, dtype=dtype).reshape((op.n,) + op.x_shape)
    return np.asarray(op.A(eye)).reshape(op.n, -1).T


@pytest.mark.parametrize("name", ["inpainting", "super_resolution", "blur", "random_projection"])
def test_operator_identities(x64, name):
    op = _operators(jax.random.key(0))[name]
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (3,) + op.x_shape, jnp.float64)
    y = jax.random.normal(ky, (3,) + op.y_shape, jnp.float64)
    z = jax.random.normal(kx, (3, op.n), jnp.float64)

    @jax.jit  # one program per operator rather than one per eager op
    def quantities(op, x, y, z):
        s = op.singular_values()
        eye = jnp.eye(op.n, dtype=x.dtype).reshape((op.n,) + op.x_shape)
        return dict(
            M=op.A(eye).reshape(op.n, -1).T,
            Ax=op.A(x),
            ATy=op.AT(y),
            s=s,
            VVtx=op.V(op.Vt(x)),
            VtVz=op.Vt(op.V(z)),
            USVtx=op.U(s * op.Vt(x)),
            UtAx=op.Ut(op.A(x)),
            sVtx=s * op.Vt(x),
            pinv=op.pinv(y),
        )

    q = quantities(op, x, y, z)
    M = np.asarray(q["M"])  # the operator's matrix (m, n): column j = A e_j
    # every identity below is a handful of float64 matvecs of length <= 32 on O(1) values
    tol = 1e3 * EPS64
    # adjoint: <A x, y> = <x, A^T y>, and A^T is the transposed matrix
    np.testing.assert_allclose(np.sum(q["Ax"] * y), np.sum(x * q["ATy"]), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(q["ATy"]).reshape(3, -1), np.asarray(y).reshape(3, -1) @ M, atol=tol)
    # SVD: V orthogonal, A = U diag(s) V^T, U^T A x = s V^T x, s = the matrix's singular values
    s = q["s"]
    np.testing.assert_allclose(q["VVtx"], x, atol=tol)
    np.testing.assert_allclose(q["VtVz"], z, atol=tol)
    np.testing.assert_allclose(q["USVtx"], q["Ax"], atol=tol)
    np.testing.assert_allclose(q["UtAx"], q["sVtx"], atol=tol)
    ref = np.linalg.svd(M, compute_uv=False)
    np.testing.assert_allclose(np.sort(np.asarray(s))[::-1][: ref.shape[0]], ref, atol=tol)
    # pseudo-inverse: the Moore-Penrose matrix (the blur's, truncated at rcond * s_max)
    rc = op.rcond * ref[0]
    P = np.linalg.pinv(M, rcond=op.rcond * (1 + 1e-9)) if rc > 0 else np.linalg.pinv(M)
    np.testing.assert_allclose(
        np.asarray(q["pinv"]).reshape(3, -1), np.asarray(y).reshape(3, -1) @ P.T, atol=1e4 * EPS64 / op.rcond
    )


def test_nonlinear_operator(x64):
    inner = _operators(jax.random.key(0))["random_projection"]
    x = jax.random.normal(jax.random.key(1), (2,) + inner.x_shape, jnp.float64)
    for fn, f in (("tanh", np.tanh), ("abs", np.abs)):
        op = I.nonlinear(inner, fn)
        assert not op.linear and op.y_shape == inner.y_shape
        np.testing.assert_allclose(op.A(x), f(np.asarray(inner.A(x))), atol=10 * EPS64)
    with pytest.raises(TypeError, match="no AT"):
        op.AT(op.A(x))
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        I.nonlinear(inner, "relu")


# ------------------------------------------------------------------ exact posterior
def test_mixture_posterior_is_exact(x64):
    """Weights, means and covariances against self-normalized importance sampling from
    the prior (an independent route: Bayes' rule by weighting prior samples with the
    Gaussian likelihood), and the exact sampler's moments against the closed form."""
    mix = _mixture()
    op = I.random_projection(np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5]]), (4,))
    y = np.array([0.6, 0.2])
    sy = 0.5
    w, means, covs = I.mixture_posterior(mix, op, y, sy)
    n = 100_000
    rng = np.random.default_rng(3)  # NumPy: no program to compile for one draw
    comp = rng.choice(len(mix.weights), n, p=mix.weights)
    x = mix.means[comp] + mix.stds[comp] * rng.standard_normal((n, mix.dim))
    logl = -0.5 * np.sum((x @ _dense(op, jnp.float64).T - y) ** 2, 1) / sy**2
    iw = np.exp(logl - logl.max())
    iw /= iw.sum()
    m_is = iw @ x
    mean = w @ means
    cov = np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, means, means) - np.outer(mean, mean)
    ess = 1.0 / np.sum(iw**2)
    # 5 standard errors of a weighted mean with effective sample size ess (~2.5e4 here)
    se = np.sqrt(np.diag(cov) / ess)
    np.testing.assert_array_less(np.abs(m_is - mean), 5 * se)
    c_is = (x - m_is).T @ ((x - m_is) * iw[:, None])
    np.testing.assert_allclose(c_is, cov, atol=5 * np.sqrt(2 * np.max(np.diag(cov)) ** 2 / ess))
    samples = I.sample_mixture_posterior(jax.random.key(4), (w, means, covs), 20_000)
    assert_moments_match(samples, mean, cov)


# ------------------------------------------------------------------ samplers on the testbed
@pytest.fixture(scope="module")
def testbed(x64):
    mix = _mixture()
    process = jdiff.vp_cosine()
    den = mix.denoiser(process)
    op = I.inpainting(np.array([True, False, True, False]))
    y1 = np.array([1.45, 0.55])
    post = I.mixture_posterior(mix, op, y1, SIGMA_Y)
    ref = I.sample_mixture_posterior(jax.random.key(5), post, B)
    y = jnp.broadcast_to(jnp.asarray(y1, jnp.float32), (B, 2))
    key = jax.random.key(0)
    keys = jdiff.per_sample_keys(key, B)
    runs = {
        "dps": lambda y, k: I.dps(den, op, y, SIGMA_Y, k, nfe=NFE),
        "pigdm": lambda y, k: I.pigdm(den, op, y, SIGMA_Y, k, nfe=NFE),
        "ddrm": lambda y, k: I.ddrm(den, op, y, SIGMA_Y, k, nfe=NFE),
        "red_diff": lambda y, k: I.red_diff(den, op, y, SIGMA_Y, k, nfe=NFE),
        "dds": lambda y, k: I.dds(den, op, y, SIGMA_Y, k, nfe=NFE),
    }
    out = {name: np.asarray(f(y, keys)) for name, f in runs.items()}
    # the ideal unconditional sampler: exact samples of the prior
    out["unconditional"] = np.asarray(mix.sample(jax.random.key(6), B))
    return dict(den=den, op=op, y=y, keys=keys, ref=ref, out=out, runs=runs, process=process)


def _fd(x, ref):
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(ref))


# Measured (B = 1000, NFE 100, inpainting 2 of 4 coordinates, sigma_y = 0.1; Frechet
# distance of Gaussian fits to 1000 exact posterior samples, whose own sampling noise is
# ~0.03): unconditional 7.9; DPS 0.20, PiGDM 0.085, DDRM 0.13, DDS 0.033 (factors 40-240).
# RED-diff fits a point mass (no posterior spread), so only its mean is checked.
# Asserted: a factor 10 for each sampler, far below what was measured.
@pytest.mark.parametrize("name", ["dps", "pigdm", "ddrm", "dds"])
def test_closer_to_posterior_than_unconditional(testbed, name):
    d_unc = _fd(testbed["out"]["unconditional"], testbed["ref"])
    d = _fd(testbed["out"][name], testbed["ref"])
    assert np.all(np.isfinite(testbed["out"][name]))
    assert d * 10 < d_unc, f"{name}: FD to the exact posterior {d:.4f}, unconditional {d_unc:.4f}"


def test_red_diff_lands_on_the_posterior(testbed):
    """RED-diff's mu is a mode-seeking point estimate: its mean is within the exact
    posterior's spread of the posterior mean, and its residual below the unconditional's."""
    x, ref = testbed["out"]["red_diff"], testbed["ref"]
    assert np.all(np.linalg.norm(x.mean(0) - ref.mean(0)) < np.sqrt(np.trace(np.cov(ref.T))))
    res = lambda z: np.linalg.norm(np.asarray(testbed["op"].A(jnp.asarray(z))) - np.asarray(testbed["y"]), axis=1)
    assert res(x).mean() < 0.2 * res(testbed["out"]["unconditional"]).mean()


@pytest.mark.parametrize("name", ["dps", "dds", "pigdm"])
def test_per_sample_independence(testbed, name):
    """Sample 0's result is the same when every other sample's measurement and key
    change (the reference DPS and DDS code couple samples through batch-wide norms)."""
    y2 = testbed["y"].at[1:].set(jax.random.normal(jax.random.key(9), (B - 1, 2), testbed["y"].dtype))
    keys2 = testbed["keys"].at[1:].set(jdiff.per_sample_keys(jax.random.key(10), B - 1))
    x2 = np.asarray(testbed["runs"][name](y2, keys2))
    assert not np.allclose(x2[1:], testbed["out"][name][1:])
    # the same program on the same row: equal up to XLA's vectorization order (O(1) values,
    # 100 steps of a few flops each)
    np.testing.assert_allclose(x2[0], testbed["out"][name][0], atol=100 * EPS32)


def test_ddrm_noiseless_consistency(testbed):
    """DDRM with sigma_y = 0 (eta_b = 1, grid to the data) satisfies A x = y to 1e-4, for
    inpainting (V = I) and for a general projection (a dense V)."""
    den = testbed["den"]
    y = testbed["y"]
    x = I.ddrm(den, testbed["op"], y, 0.0, testbed["keys"], nfe=NFE)
    assert float(jnp.max(jnp.abs(testbed["op"].A(x) - y))) < 1e-4
    op = I.random_projection(np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5]]), (4,))
    y2 = jnp.broadcast_to(jnp.asarray([0.9, 0.45], jnp.float32), (64, 2))
    x2, info = I.ddrm(den, op, y2, 0.0, jax.random.key(1), nfe=20, return_info=True)
    assert int(info.nfe) == 20 and np.all(np.isfinite(np.asarray(x2)))
    assert float(jnp.max(jnp.abs(op.A(x2) - y2))) < 1e-4


# ------------------------------------------------------------------ input checks
def test_bad_inputs(testbed):
    den, op, y = testbed["den"], testbed["op"], testbed["y"]
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"measurement y of shape \(1000, 3\)"):
        I.dps(den, op, jnp.zeros((B, 3)), 0.1, k, nfe=5)
    with pytest.raises(ValueError, match=r"x_T of shape \(1000, 5\)"):
        I.ddrm(den, op, y, 0.1, k, nfe=5, x_T=jnp.zeros((B, 5)))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_y must be a finite number >= 0"):
            I.pigdm(den, op, y, bad, k, nfe=5)
    with pytest.raises(ValueError, match="dps: scale must be finite, got nan"):
        I.dps(den, op, y, 0.1, k, nfe=5, scale=float("nan"))
    with pytest.raises(ValueError, match="pigdm: scale must be finite, got inf"):
        I.pigdm(den, op, y, 0.1, k, nfe=5, scale=float("inf"))
    with pytest.raises(ValueError, match="red_diff: lr must be > 0"):
        I.red_diff(den, op, y, 0.1, k, nfe=5, lr=0.0)
    with pytest.raises(ValueError, match="ddrm: eta must be <= 1"):
        I.ddrm(den, op, y, 0.1, k, nfe=5, eta=1.5)
    with pytest.raises(ValueError, match="cg_steps must be an int >= 0"):
        I.dds(den, op, y, 0.1, k, nfe=5, cg_steps=-1)
    with pytest.raises(ValueError, match="pass key"):
        I.dds(den, op, y, 0.1, None, nfe=5)
    nl = I.nonlinear(op, "tanh")
    with pytest.raises(TypeError, match="needs a linear operator with an SVD"):
        I.ddrm(den, nl, y, 0.1, k, nfe=5)
    with pytest.raises(TypeError, match="needs a linear operator"):
        I.dds(den, nl, y, 0.1, k, nfe=5)
    with pytest.raises(ValueError, match="factor must be a positive int dividing H and W"):
        I.super_resolution((8, 8, 1), 3)
    with pytest.raises(ValueError, match=r"shape \(m, 4\) for x_shape \(4,\), got \(2, 5\)"):
        I.random_projection(np.ones((2, 5)), (4,))
    with pytest.raises(ValueError, match="observes no entry"):
        I.inpainting(np.zeros((4,), bool))
    with pytest.raises(ValueError, match=r"x of shape \(2, 3\)"):
        I.measure(op, jnp.zeros((2, 3)), 0.1, k)


def test_dps_nonlinear_measurement(testbed):
    """DPS through a nonlinear operator (tanh of a projection) fits the measurement
    better than unconditional samples do."""
    den = testbed["den"]
    op = I.nonlinear(I.random_projection(np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5]]), (4,)), "tanh")
    x_true = jnp.asarray([[1.4, -0.9, 0.5, 0.1]])
    y = jnp.broadcast_to(op.A(x_true), (64, 2))
    x = I.dps(den, op, y, 0.0, jax.random.key(2), nfe=50)
    res = lambda z: np.linalg.norm(np.asarray(op.A(jnp.asarray(z)) - y), axis=1).mean()
    unc = testbed["out"]["unconditional"][:64]
    # measured: DPS 0.35, exact prior samples 0.93 (DPS trades fit for prior plausibility;
    # tanh flattens the gradient where |A x| is large); asserted with margin
    assert res(x) < 0.6 * res(unc)
