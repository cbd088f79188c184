"""The inversions on jdiff.sample's loop give the results of the papers' algorithms: each
inversion and regeneration equals an independent hand-written NumPy loop over the grid
(float64), with the model calls counted at run time; the settings stay traced (one
compiled program per method), and sample's grid direction and result hooks hold.

The denoiser is a fixed nonlinear one: the exact posterior of a Gaussian mixture.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import inversion as I
from jdiff import solvers as S
from jdiff._sample import _run
from jdiff.inversion._exact import EDICT
from jdiff.testbed import random_mixture

B, D, N = 4, 2, 6
# float64 rounding (2.2e-16) amplified by the recursions over N = 6 steps (BDIA's
# parasitic root, EDICT's 1/p, DDPM's 1/c): measured below 1e-13
TOL = 1e-11


@pytest.fixture(scope="module")
def setup(x64):
    process = jdiff.vp_linear()
    mix = random_mixture(jax.random.key(0), D, 3, spread=1.0, std_range=(0.4, 0.7))
    calls = [0]

    def count(n):
        calls[0] += int(n)

    def apply(x, t, c):
        jax.debug.callback(count, x.shape[0] // B)  # one network call over the batch
        return mix.posterior(x, t, process).eps

    den = jdiff.denoiser(apply, process, "eps")
    x0 = mix.sample(jax.random.key(1), B, jnp.float64)
    g = jdiff.time_grid(process, N, kind="logsnr", dtype=jnp.float64)

    model = jax.jit(lambda x, t: mix.posterior(x, jnp.full((B,), t), process).eps)

    def eps(x, i):
        """The model's eps at the sampling grid's point i, in NumPy."""
        return np.asarray(model(jnp.asarray(x), g[i]))

    la, ls = np.asarray(process.log_alpha(g)), np.asarray(process.log_sigma(g))
    return process, den, np.asarray(x0), g, eps, la, ls, calls


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def ddim(la, ls, i, j):
    """``(A, B)`` of the DDIM step ``x_j = A x_i + B eps(x_i)`` (Song et al. 2021, Eq. 12)."""
    a_i, s_i, a_j, s_j = np.exp([la[i], ls[i], la[j], ls[j]])
    return a_j / a_i, s_j - a_j * s_i / a_i


def counted(calls, fn):
    calls[0] = 0
    out = jax.block_until_ready(fn())
    return out, calls[0]


def test_edict_equals_the_papers_loop(setup):
    """Wallace et al. 2023, Eqs. 10-13 and their inverse, written out step by step."""
    _, den, x0, g, eps, la, ls, calls = setup
    p = 0.9

    def step(x, y, i):
        A, Bc = ddim(la, ls, i, i + 1)
        xi = A * x + Bc * eps(y, i)
        yi = A * y + Bc * eps(xi, i)
        x = p * xi + (1 - p) * yi
        return x, p * yi + (1 - p) * x

    def unstep(x, y, i):
        A, Bc = ddim(la, ls, i, i + 1)
        yi = (y - (1 - p) * x) / p
        xi = (x - (1 - p) * yi) / p
        y = (yi - Bc * eps(xi, i)) / A
        return (xi - Bc * eps(y, i)) / A, y

    x, y = x0, x0
    for i in reversed(range(N)):  # leapfrog: the roles swap on odd steps
        x, y = unstep(y, x, i)[::-1] if i % 2 else unstep(x, y, i)
    inv, nfe = counted(calls, lambda: I.edict_invert(den, x0, g, p=p))
    assert nfe == 2 * N
    assert rel(inv.x_T, x) < TOL and rel(inv.y_T, y) < TOL
    for i in range(N):
        x, y = step(y, x, i)[::-1] if i % 2 else step(x, y, i)
    out, nfe = counted(calls, lambda: I.regenerate(den, inv))
    assert nfe == 2 * N
    assert rel(out, x) < TOL and rel(out, x0) < TOL


def test_bdia_equals_the_papers_loop(setup):
    """Zhang et al. 2024, Eq. 18 and its inverse, written out step by step."""
    _, den, x0, g, eps, la, ls, calls = setup
    gamma = 0.96

    def D_(x, e, i, j):
        A, Bc = ddim(la, ls, i, j)
        return A * x + Bc * e

    xs = {N: x0}
    xs[N - 1] = D_(x0, eps(x0, N), N, N - 1)
    for i in range(N - 1, 0, -1):
        e = eps(xs[i], i)
        xs[i - 1] = (xs[i + 1] - D_(xs[i], e, i, i + 1)) / gamma + D_(xs[i], e, i, i - 1)
    inv, nfe = counted(calls, lambda: I.bdia_invert(den, x0, g, gamma=gamma))
    assert nfe == N
    assert rel(inv.x_T, xs[0]) < TOL and rel(inv.x_1, xs[1]) < TOL
    prev, x = xs[0], xs[1]
    for i in range(1, N):
        e = eps(x, i)
        prev, x = x, gamma * (prev - D_(x, e, i, i - 1)) + D_(x, e, i, i + 1)
    out, nfe = counted(calls, lambda: I.regenerate(den, inv))
    assert nfe == N - 1
    assert rel(out, x) < TOL and rel(out, x0) < TOL


def test_ddpm_equals_the_papers_loop(setup):
    """Huberman-Spiegelglas et al. 2024, Eqs. 6-7, written out: the noised copies drawn
    with the documented keys, the noises solved for, DDPM sampling with them."""
    process, den, x0, g, eps, la, ls, calls = setup
    eta, key = 0.7, jax.random.key(5)
    keys = jdiff.per_sample_keys(key, B)  # sample b's key is fold_in(key, b), then fold_in(., i) at time i
    draw = jax.jit(jax.vmap(lambda k, i: jax.random.normal(jax.random.fold_in(k, i), (D,), jnp.float64), (0, None)))
    a, s = np.exp(la), np.exp(ls)
    xs = [a[i] * x0 + s[i] * np.asarray(draw(keys, i)) for i in range(N)]
    xs.append(x0)

    def mean_std(x, i):
        e = eps(x, i)
        x0_hat = (x - s[i] * e) / a[i]
        c = eta * s[i + 1] * np.sqrt(1 - np.exp(-2 * ((la[i + 1] - ls[i + 1]) - (la[i] - ls[i]))))
        return a[i + 1] * x0_hat + np.sqrt(s[i + 1] ** 2 - c**2) * e, c

    zs = []
    for i in range(N):
        mu, c = mean_std(xs[i], i)
        zs.append((xs[i + 1] - mu) / c)
    inv, nfe = counted(calls, lambda: I.ddpm_invert(den, x0, g, key=key, eta=eta))
    assert nfe == N
    assert rel(inv.x_T, xs[0]) < TOL and rel(inv.zs, np.stack(zs)) < 1e-9
    x = xs[0]
    for i in range(N):
        mu, c = mean_std(x, i)
        x = mu + c * zs[i]
    out, nfe = counted(calls, lambda: I.regenerate(den, inv))
    assert nfe == N
    assert rel(out, x) < 1e-9 and rel(out, x0) < 1e-9


def test_refined_ddim_inversion_equals_the_fixed_point_loop(setup):
    """Pan et al. 2023: each DDIM inversion step, then ``k`` iterations of
    ``x_t <- (x_s - B eps(x_t)) / A`` (the forward step ``t -> s`` solved for ``x_t``)."""
    _, den, x0, g, eps, la, ls, calls = setup
    k = 3
    x = x0
    for i in range(N, 0, -1):  # from grid point i (less noisy) to i - 1
        A, Bc = ddim(la, ls, i, i - 1)
        x_t = A * x + Bc * eps(x, i)
        A, Bc = ddim(la, ls, i - 1, i)
        for _ in range(k):
            x_t = (x - Bc * eps(x_t, i - 1)) / A
        x = x_t
    inv, nfe = counted(calls, lambda: I.ddim_invert(den, x0, g, refine=k))
    assert nfe == N * (1 + k)
    assert rel(inv.x_T, x) < TOL


def test_settings_are_traced(setup):
    """New values of p, gamma, eta and the refinement count reuse the compiled programs
    of jdiff.sample's loop (the solver's array fields are arguments)."""
    _, den, x0, g, *_ = setup
    runs = {
        "edict": lambda v: I.regenerate(den, I.edict_invert(den, x0, g, p=v)),
        "bdia": lambda v: I.regenerate(den, I.bdia_invert(den, x0, g, gamma=v)),
        "ddpm": lambda v: I.regenerate(den, I.ddpm_invert(den, x0, g, key=jax.random.key(0), eta=v)),
        "refine": lambda v: I.ddim_invert(den, x0, g, refine=int(v * 10)),
    }
    for run in runs.values():
        run(0.5)
        size = _run._cache_size()
        run(0.8)
        assert _run._cache_size() == size


def test_sample_runs_toward_noise_only_on_increasing_grids(setup):
    _, den, x0, g, *_ = setup
    solver = EDICT(jnp.asarray(0.9, jnp.float64), inverse=True)  # edict_invert's program
    with pytest.raises(ValueError, match=r"strictly increasing \(data to noise\)"):
        jdiff.sample(solver, den, x0, g)
    with pytest.raises(ValueError, match="strictly decreasing"):
        jdiff.sample(S.ddim(), den, x0, g[::-1])
    with pytest.raises(ValueError, match="denoise_to_zero ends at the data, but edict_invert runs toward noise"):
        jdiff.sample(solver, den, x0, g[::-1], denoise_to_zero=True)
    (x, y), info = jdiff.sample(solver, den, x0, g[::-1], return_info=True)
    assert int(info.nfe) == 2 * N and x.shape == y.shape == x0.shape
    # sample_padded's while loop serves solvers from noise to data only: refused, one line
    with pytest.raises(ValueError, match="sample_padded runs solvers from noise to data without array fields"):
        jdiff.sample_padded(solver, den, x0, g[::-1], max_steps=N)
