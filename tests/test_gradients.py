"""Gradient strategies of ``sample``: Backprop, Remat and Truncated(k) against each other,
against central finite differences (float64) and against hand-built references; finite
float32 gradients from NFE 3 to 100 on grids that end at the data and start at zero
terminal SNR; clear errors before anything runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S
from jdiff.testbed import GaussianMixture

B, D = 3, 2  # batch and dimension: tiny, compile time dominates

# ------------------------------------------------------------------ float64 set-up


def affine_denoiser(mix, proc, prediction=None, dtype=jnp.float64):
    """The exact testbed denoiser made a function of parameters and a per-sample
    conditioning array: ``x0_hat = w * x0_exact + b + cond``."""
    exact = mix.denoiser(proc, prediction)

    def apply(params, x, t, cond):
        x0 = exact(x, t, None).x0
        return params["w"] * x0 + params["b"] + cond

    params = {"w": jnp.asarray([1.1, 0.9], dtype), "b": jnp.asarray([0.05, -0.02], dtype)}
    return jdiff.denoiser(apply, proc, "x0", params=params)


def mlp_denoiser(proc, seed, dtype=jnp.float64, hidden=16):
    """A tiny eps-predicting MLP with explicit parameters and a conditioning input."""
    rng = np.random.default_rng(seed)

    def apply(params, x, t, cond):
        feats = jnp.concatenate([x, jnp.sin(3.0 * t)[:, None], jnp.cos(3.0 * t)[:, None], cond], axis=1)
        h = jnp.tanh(feats @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]

    params = {
        "w1": jnp.asarray(rng.standard_normal((2 * D + 2, hidden)) / np.sqrt(2 * D + 2), dtype),
        "b1": jnp.zeros((hidden,), dtype),
        "w2": jnp.asarray(rng.standard_normal((hidden, D)) / np.sqrt(hidden), dtype),
        "b2": jnp.zeros((D,), dtype),
    }
    return jdiff.denoiser(apply, proc, "eps", params=params)


def make_loss(solver, den, gradient):
    """A scalar of the samples as a function of (x_T, cond, params, grid)."""

    def loss(x, cond, params, grid):
        out = jdiff.sample(solver, den.replace(params=params), x, grid, cond=cond, gradient=gradient)
        return jnp.sum(jnp.sin(2.0 * out))

    return loss


N64 = 6  # grid intervals of the float64 checks
N64 = 6  # grid intervals of the float64 checks
K64 = 3  # Truncated(k) of the float64 checks


@pytest.fixture(scope="module")
def problems(x64):
    """Two float64 problems: the testbed (VP, exact posterior made affine in params)
    and a small MLP (rectified flow). Grids stay inside the time domain, so that
    every grid time may be perturbed for finite differences."""
    mix = GaussianMixture(
        [0.2, 0.5, 0.3], [[1.0, -0.5], [-0.8, 0.6], [0.2, 1.2]], [[0.3, 0.2], [0.4, 0.25], [0.15, 0.5]]
    )
    vp, rf = jdiff.vp_linear(), jdiff.rectified_flow()
    out = {}
    for name, proc, den, kind in (
        ("testbed", vp, affine_denoiser(mix, vp), "logsnr"),
        ("mlp", rf, mlp_denoiser(rf, 5), "uniform"),
    ):
        grid = jdiff.time_grid(proc, N64, kind=kind, t_start=0.8, t_end=0.02, dtype=jnp.float64)
        rng = np.random.default_rng(1)
        x_T, cond = jnp.asarray(rng.standard_normal((B, D))), jnp.asarray(0.1 * rng.standard_normal((B, D)))
        out[name] = (den, (x_T, cond, den.params, grid))
    return out


# name -> (problem, solver, strategies): one compilation each, gradients w.r.t. all of
# (x_T, cond, params, grid)
CASES64 = {
    "testbed-dpm++2m": (
        "testbed",
        S.dpm_solver_pp(2),
        {
            "backprop": jdiff.Backprop(),
            "trunc": jdiff.Truncated(K64),
            "trunc_remat": jdiff.Truncated(K64, remat=True),
        },
    ),
    "mlp-heun": ("mlp", S.heun(), {"backprop": jdiff.Backprop(), "remat": jdiff.Remat()}),
}


@pytest.fixture(scope="module")
def grads64(problems):
    out = {}
    for case, (pname, solver, strategies) in CASES64.items():
        den, args = problems[pname]
        losses = {k: make_loss(solver, den, g) for k, g in strategies.items()}
        grads = jax.jit(lambda *a, losses=losses: {k: jax.grad(f, argnums=(0, 1, 2, 3))(*a) for k, f in losses.items()})
        out[case] = grads(*args)
        for leaf in jax.tree.leaves(out[case]):
            assert np.all(np.isfinite(np.asarray(leaf))), case
    return out


def _unit_direction(tree, rng):
    leaves, treedef = jax.tree.flatten(tree)
    v = [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in leaves]
    norm = np.sqrt(sum(float(jnp.sum(u * u)) for u in v))
    return jax.tree.unflatten(treedef, [u / norm for u in v])


def _assert_tree_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_remat_equals_backprop(grads64):
    # the same operations, recomputed: equal up to a few float64 roundings of O(1) values
    # (XLA may fuse the recomputation differently), far inside 1e-10
    g = grads64["mlp-heun"]
    _assert_tree_close(g["remat"], g["backprop"], rtol=1e-10, atol=1e-12)
    g = grads64["testbed-dpm++2m"]
    _assert_tree_close(g["trunc_remat"], g["trunc"], rtol=1e-10, atol=1e-12)


def _check_directional_derivatives(loss, args, grads, which=(0, 1, 2, 3)):
    """``grads`` (of ``loss`` at ``args``) against fourth-order central differences along
    a random unit direction in each argument listed in ``which``."""
    names = ("x_T", "cond", "params", "grid")
    # a random unit direction per argument (small enough steps keep the grid decreasing)
    rng = np.random.default_rng(7)
    dirs = [_unit_direction(arg, rng) for arg in args]
    # The stencil (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h has truncation error
    # h^4 |f^(5)| / 30. The grid derivatives are the roughest: near alpha = 0.2 (rectified
    # flow's first time, an eps network divided by alpha) the second-order stencil showed
    # |f'''| ~ 1e7, so |f^(5)| <~ 1e10 and h = 1e-4 leaves ~3e-8. Roundoff: float64 error of
    # the loss (|loss| <= B*D after a few hundred operations of O(1) values, ~1e-14) times
    # 18 / 12h is ~2e-10. So the directional derivatives (O(0.1)-O(10)) must agree to 1e-6
    # relative plus 1e-8 absolute, while a missing or wrong term in the reverse pass is an
    # O(1) relative error.
    h = 1e-4

    def shifted(i, s):
        return [jax.tree.map(lambda a, v: a + s * h * v, arg, dirs[i]) if j == i else arg for j, arg in enumerate(args)]

    f = jax.jit(loss)  # one compilation, evaluated at 4 points per direction
    v = np.asarray([[float(f(*shifted(i, s))) for s in (1, -1, 2, -2)] for i in which])
    fd = (8 * (v[:, 0] - v[:, 1]) - (v[:, 2] - v[:, 3])) / (12 * h)
    for i, f in zip(which, fd):
        a = sum(float(jnp.sum(g * v)) for g, v in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(dirs[i])))
        assert abs(a - f) <= 1e-6 * abs(f) + 1e-8, (names[i], a, f)
        assert abs(f) > 1e-4, (names[i], f)  # the direction really moves the loss


@pytest.mark.parametrize("case", ["testbed-dpm++2m", "mlp-heun"])
def test_backprop_matches_central_differences(problems, grads64, case):
    """Directional derivatives along random directions in x_T, cond, params and the grid."""
    pname, solver, _ = CASES64[case]
    den, args = problems[pname]
    _check_directional_derivatives(make_loss(solver, den, jdiff.Backprop()), args, grads64[case]["backprop"])


# ---------------------------------------------------------------------- Truncated


def test_truncated_n_is_backprop(problems):
    # Truncated(N) runs exactly Backprop's program (traced only: no compilation)
    den, args = problems["testbed"]
    solver = S.dpm_solver_pp(2)
    jaxprs = [
        str(jax.make_jaxpr(jax.grad(make_loss(solver, den, g), argnums=(0, 1, 2, 3)))(*args))
        for g in (jdiff.Backprop(), jdiff.Truncated(N64))
    ]
    assert jaxprs[0] == jaxprs[1]


def test_truncated_multistep_matches_differences_of_the_last_k_steps(grads64, problems):
    """dpm++2m carries model outputs between steps. Build its last k steps by hand with
    the protocol: the state after N - k steps (sample, history, prediction) is computed
    once and held fixed; the coefficient tables (functions of the grid), the parameters
    and the conditioning are live. Truncated(k)'s gradient must be that map's, checked by
    central differences; the first N - k steps contribute nothing, so the gradient w.r.t.
    x_T is exactly zero and the full gradient differs."""
    den, args = problems["testbed"]
    x_T, cond, params, grid = args
    solver, proc = S.dpm_solver_pp(2), den.process

    @jax.jit
    def first_steps(x_T, cond, grid):
        st = solver.init(x_T, grid, proc)
        for _ in range(N64 - K64):
            st = solver.step(den, st, cond)
        return st

    mid = first_steps(x_T, cond, grid)

    def last_k(x, cond, params, grid):
        del x  # enters only through the fixed state
        d = den.replace(params=params)
        st = solver.init(mid.x, grid, proc)._replace(i=mid.i, pred=mid.pred, hist=mid.hist, nfe=mid.nfe)
        for _ in range(K64):
            st = solver.step(d, st, cond)
        return jnp.sum(jnp.sin(2.0 * st.x))

    got = grads64["testbed-dpm++2m"]["trunc"]
    assert np.all(np.asarray(got[0]) == 0.0)
    # the last k steps read the grid from t_{N-k-1} on (the time of their oldest history
    # output); earlier times have no influence
    assert np.all(np.asarray(got[3][: N64 - K64 - 1]) == 0.0)
    _check_directional_derivatives(last_k, args, got, which=(1, 2, 3))
    full = grads64["testbed-dpm++2m"]["backprop"]
    assert float(jnp.max(jnp.abs(full[2]["w"] - got[2]["w"]))) > 1e-3


# ------------------------------------------------------- float32: finite everywhere

# (process, network parameterization, grid kind); every grid ends at the data (sigma = 0,
# lambda = +inf). Rectified flow with an x0 network also starts at zero terminal SNR
# (alpha = 0, lambda = -inf); VP's sigma ~ sqrt(t) has infinite slope at the data.
# (tests/test_robustness.py runs the discrete zero-terminal-SNR table forward; its
# interpolation is costly to compile under grad.)
SHARP_MIX = GaussianMixture([0.3, 0.7], [[1.0, -0.5], [-0.8, 0.6]], [[0.05, 0.2], [0.3, 0.1]])  # sharp: a hard case
RF = (jdiff.rectified_flow(), "x0", "uniform")
VP = (jdiff.vp_linear(), None, "default")
BP, RM, TR, TRR = jdiff.Backprop(), jdiff.Remat(), "trunc", "trunc_remat"  # Truncated(N // 2, remat)
# name -> (solver, [(NFE, strategy, process)]): one compilation per run, and compiles
# dominate, so five runs: every strategy, NFE 3, 10 and 100, and both processes appear
# (Remat's arithmetic is Backprop's, checked to 1e-10 above).
RUNS32 = {
    "dpm++2m": (S.dpm_solver_pp(2), [(3, BP, RF)]),
    "unipc2": (S.unipc(2), [(100, RM, VP)]),
    "dpm++2s": (S.dpm_solver_pp(2, method="singlestep"), [(3, TRR, VP)]),
    "ddim": (S.ddim(), [(100, TR, RF)]),
    "heun": (S.heun(), [(10, TR, VP)]),
}


@pytest.mark.parametrize("name", list(RUNS32))
def test_float32_gradients_are_finite(name):
    with jax.enable_x64(False):  # float32 defaults, even after this module's float64 tests
        _float32_runs(*RUNS32[name])


def _float32_runs(solver, runs):
    for nfe, strat, (proc, pred, kind) in runs:
        den = affine_denoiser(SHARP_MIX, proc, pred, jnp.float32)
        n = solver.num_steps(nfe, to_data=True, from_noise=proc is RF[0])
        grid = jdiff.time_grid(proc, n, kind=kind, final="data")
        if isinstance(strat, str):
            strat = jdiff.Truncated(max(1, n // 2), remat=strat == "trunc_remat")
        x_T = np.random.default_rng(1).standard_normal((8, D)).astype(np.float32)  # unit-variance prior
        cond = np.zeros((8, D), np.float32)
        g = jax.jit(jax.grad(make_loss(solver, den, strat), argnums=(0, 1, 2, 3)))(x_T, cond, den.params, grid)
        where = f"{solver.name} NFE {nfe} {strat} {proc.name}"
        for leaf in jax.tree.leaves(g):
            assert np.all(np.isfinite(np.asarray(leaf))), where
        gg = np.asarray(g[3])
        # the ends at infinite log-SNR (t_data; alpha = 0 at rectified flow's start) are
        # constants (gradient 0); the interior is live
        assert gg[-1] == 0.0 and (proc is not RF[0] or gg[0] == 0.0), where
        assert np.any(np.abs(gg) > 100 * EPS32), where


# ---------------------------------------------------------------------------- errors


SMALL_MIX = GaussianMixture(np.ones(2), [[1.0, 0.0], [-1.0, 0.5]], np.full((2, D), 0.3))


class _Recorder:
    """A denoiser that records its calls (to see that an error came before any)."""

    def __init__(self, den):
        self.den, self.calls, self.process = den, 0, den.process

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.den(x, t, cond)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: jdiff.Truncated(0), ValueError, "k=0"),
        (lambda: jdiff.Truncated(2.5), ValueError, "k=2.5"),
        (lambda: jdiff.Truncated(True), ValueError, "k=True"),
        (lambda: jdiff.Truncated(2, remat="yes"), TypeError, "bool"),
        (lambda: jdiff.Truncated(5), ValueError, "k=5"),  # N = 4 below
        (lambda: "remat", TypeError, "str"),
        (lambda: True, TypeError, "bool"),
        (lambda: jdiff.Truncated, TypeError, "type"),
    ],
)
def test_bad_strategy_raises_before_running(make, exc, words):
    proc = jdiff.vp_linear()
    den = _Recorder(SMALL_MIX.denoiser(proc))
    with pytest.raises(exc, match=words) as err:
        jdiff.sample(S.ddim(), den, np.zeros((B, D)), np.linspace(1.0, 0.01, 5), gradient=make())
    if "k=5" in words:
        assert "N = 4" in str(err.value)
    assert den.calls == 0


def test_adjoint_with_a_stochastic_solver_raises_before_running():
    proc = jdiff.vp_linear()
    den = _Recorder(SMALL_MIX.denoiser(proc))
    grid = np.linspace(1.0, 0.01, 5)
    with pytest.raises(ValueError, match="stochastic"):
        jdiff.sample(S.ddpm(), den, np.zeros((B, D)), grid, key=jax.random.key(0), gradient=jdiff.Adjoint())
    assert den.calls == 0


def test_strategies_are_values():
    assert jdiff.Truncated(3) == jdiff.Truncated(3) and hash(jdiff.Truncated(3)) == hash(jdiff.Truncated(3))
    assert jdiff.Truncated(3) != jdiff.Truncated(3, remat=True) != jdiff.Truncated(2)
    assert jdiff.Remat() == jdiff.Remat() and jdiff.Backprop() != jdiff.Remat()
    assert jdiff.Truncated(np.int64(3)) == jdiff.Truncated(3)
    # a rebuilt strategy reuses the compiled sampler (it is a static argument)
    proc = jdiff.vp_linear()
    den = SMALL_MIX.denoiser(proc)
    grid = np.linspace(1.0, 0.01, 4)
    x_T = np.linspace(-1.0, 1.0, B * D, dtype=np.float32).reshape(B, D)
    run = lambda g: jdiff.sample(S.ddim(), den, x_T, grid, gradient=g, return_info=True, trajectory=True)  # noqa: E731
    x, info = run(jdiff.Truncated(2))
    size = jdiff._sample._run._cache_size()
    run(jdiff.Truncated(2))
    assert jdiff._sample._run._cache_size() == size
    # the forward pass is the same in every strategy (two scans or one): the same float32
    # operations, so equal up to a few roundings should XLA fuse them differently
    x_ref, ref = run(jdiff.Backprop())
    assert int(info.nfe) == int(ref.nfe) == 3
    for a, b in zip([x, *info[2:]], [x_ref, *ref[2:]]):
        np.testing.assert_allclose(a, b, rtol=8 * EPS32, atol=8 * EPS32)
