"""``sample_padded``: one compiled loop per solver serves every grid length, with the
same result as ``sample``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S
from jdiff._grid import time_grid
from jdiff._padded import _init, _loop, _tables, sample_padded
from jdiff.solvers._base import multistep_order, order_schedule, traced_order_schedule
from jdiff.testbed import random_mixture

PROC = jdiff.vp_cosine()
KEY = jax.random.key(2)
# to the data (sigma = 0, the last step first order) below 15 steps, and >= 15 steps to
# t_min for the one-call solvers (the singlestep ones take 4-8 steps for these targets)
CELLS = ((9, "data"), (16, "t_min"))
BOUND = 16
X2 = jdiff.prior_sample(PROC, jax.random.key(3), (4, 2))
DEN2 = random_mixture(jax.random.key(4), 2).denoiser(PROC)


@pytest.mark.parametrize("name", ["dpm++3s", "unipc3-bh1", "ddpm"])
def test_padded_equals_sample_for_every_length(name):
    solver = S.get(name)
    sizes = []
    for nfe, final in CELLS:
        a, info = jdiff.sample(solver, DEN2, X2, nfe=nfe, key=KEY, final=final, return_info=True)
        b, used = sample_padded(solver, DEN2, X2, nfe=nfe, key=KEY, final=final, max_steps=BOUND, return_nfe=True)
        assert int(used) == int(info.nfe)
        # the same operations in a while_loop instead of a scan: XLA may fuse and reorder
        # them differently, a few roundings per step of values of order |x| <= 4,
        # amplified by at most the steps' Lipschitz constants (the sharp testbed modes:
        # up to ~30 over a run); 64 * nfe roundings of 4 bound that.
        tol = 64 * nfe * 4 * EPS32
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=tol, rtol=0)
        sizes.append((_loop._cache_size(), _tables._cache_size()))
    # the second length ran the first one's compiled loop and compiled tables
    assert sizes[1] == sizes[0]


def test_nfe_target_shares_the_tables_unless_the_solver_spends_it():
    """A multistep solver ignores the NFE target: with and without it, one tables program
    and the same samples; a singlestep solver's tables depend on it (init_uses_nfe)."""
    s = S.get("unipc2")
    grid = jdiff.time_grid(PROC, 6)
    a = sample_padded(s, DEN2, X2, grid, max_steps=BOUND)
    size = _tables._cache_size()
    b = sample_padded(s, DEN2, X2, grid, max_steps=BOUND, nfe=6)
    assert _tables._cache_size() == size
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert S.get("dpm++3s").init_uses_nfe and not s.init_uses_nfe


def test_padded_rejects_long_grids_and_bad_bounds():
    with pytest.raises(ValueError, match="more than max_steps=3"):
        sample_padded(S.ddim(), DEN2, X2, nfe=5, max_steps=3)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        sample_padded(S.ddim(), DEN2, X2, nfe=5, max_steps=0)
    with pytest.raises(ValueError, match="non-finite"):
        sample_padded(S.ddim(), DEN2, X2.at[0, 0].set(jnp.nan), nfe=5, max_steps=8)


# --- the coefficient tables: one compiled program for every grid length ---------------


def test_traced_length_rules_match_the_static_ones():
    """``multistep_order`` and ``traced_order_schedule`` with the length (and the NFE
    target) as traced data on padded inputs give, for every row below the length, the
    static rules' values: lengths 1..20 on both sides of the 15-step threshold, every
    kind of reachable NFE target, steps forced to first order at either end. Exact."""
    R = 20
    lam = jnp.linspace(-3.0, 5.0, R + 1)
    lengths = (1, 2, 3, 4, 7, 13, 14, 15, 16, 20)  # around the 15-step threshold
    settings = [(k, lower) for k in (1, 2, 3, 4) for lower in (False, True)]

    @jax.jit
    def static_multistep():
        return {
            (k, lower, n): jax.vmap(lambda i: multistep_order(lam[: n + 1], i, k, n, lower))(jnp.arange(n))
            for k, lower in settings
            for n in lengths
        }

    @jax.jit
    @jax.vmap
    def traced_multistep(n):
        return {
            (k, lower): jax.vmap(lambda i: multistep_order(lam, i, k, n, lower))(jnp.arange(R)) for k, lower in settings
        }

    want, got = static_multistep(), traced_multistep(np.array(lengths, np.int32))
    for k, lower in settings:
        for j, n in enumerate(lengths):
            assert got[k, lower][j][:n].tolist() == want[k, lower, n].tolist(), (k, lower, n)

    cases = []
    for n in lengths:
        for forced in {(), (0,), (n - 1,), (0, n - 1)}:
            for order in (2, 3):
                lo, hi = n, order * (n - len(forced)) + len(forced)
                cases += [(n, forced, order, nfe) for nfe in sorted({lo, (lo + hi) // 2, hi - 1, hi}) if nfe >= lo]
    n_, nfe_ = np.array([c[0] for c in cases], np.int32), np.array([c[3] for c in cases], np.int32)
    # the padded rows are finite steps (h = 0 on a grid padded with its last point)
    finite = np.array([[k not in c[1] for k in range(R)] for c in cases])

    @jax.jit
    @jax.vmap
    def traced_singlestep(n, nfe, finite):
        out = {}
        for order in (2, 3):
            out[order, "nfe"] = traced_order_schedule(order, finite, nfe, num_steps=n)
            for lower in (False, True):
                out[order, str(lower)] = traced_order_schedule(
                    order, finite, None, lower_order_final=lower, num_steps=n
                )
        return out

    got = traced_singlestep(n_, nfe_, finite)
    for j, (n, forced, order, nfe) in enumerate(cases):
        assert got[order, "nfe"][j][:n].tolist() == order_schedule(order, n, nfe, forced=forced), (
            n,
            forced,
            order,
            nfe,
        )
        for lower in (False, True):
            want = order_schedule(order, n, None, lower_order_final=lower, forced=forced)
            assert got[order, str(lower)][j][:n].tolist() == want, (n, forced, order, lower)


def _cells(solver, cells):
    return [(nfe, final, time_grid(PROC, nfe=nfe, solver=solver, final=final)) for nfe, final in cells]


# One solver per kind of table code (sampling all 35 registry solvers end to end would
# cost minutes of compiles; the padded programs of all of them are exercised by the NFE
# sweep): singlestep noise/data with the NFE schedule, multistep data with the closed-form
# weights, DEIS's quadrature weights, fixed-step iPNDM, the t-tables of Euler/Heun,
# Euler-Maruyama and DDIM. ``sample_padded`` itself is compared with ``sample`` above, for
# singlestep, UniC's corrector (multistep) and DDPM.
FAMILIES = ["dpm3", "dpm++2s", "dpm++3m", "deis3", "ipndm4", "heun", "euler-maruyama", "ddim"]


@pytest.fixture(scope="module")
def table_cases():
    """Per family: the padded tables at every cell through the real ``_tables`` path, the
    unpadded tables ``init`` builds (``sample``'s), and the compiles counted."""
    out = {}
    for name in FAMILIES:
        solver = S.get(name)
        key = jax.random.key(0) if solver.stochastic else None
        cells = _cells(solver, CELLS)
        padded, sizes = [], []
        for nfe, _, g in cells:
            padded.append(_init(solver, PROC, X2, g, key, nfe=nfe, max_steps=BOUND).aux)
            sizes.append(_tables._cache_size())
        compiled = sizes[-1] - sizes[0]  # after the first length's program

        # the reference: init on each unpadded grid, all cells in one program
        @jax.jit
        def reference(grids, solver=solver, key=key, nfes=tuple(c[0] for c in cells)):
            return [solver.init(X2, g, PROC, key=key, nfe=n).aux for g, n in zip(grids, nfes)]

        out[name] = (cells, padded, reference([g for _, _, g in cells]), compiled)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_tables_equal_unpadded_ones_and_compile_once(name, table_cases):
    cells, padded, reference, compiled = table_cases[name]
    # the second length reused the first one's tables program
    assert compiled == 0
    for (nfe, final, grid), pad, ref in zip(cells, padded, reference):
        N = grid.shape[0] - 1
        assert all(a.shape[0] == BOUND for a in jax.tree.leaves(pad))
        for a, b in zip(jax.tree.leaves(pad), jax.tree.leaves(ref), strict=True):
            a, b = np.asarray(a)[:N], np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.dtype.kind in "biu":  # orders, flags: exactly
                np.testing.assert_array_equal(a, b, err_msg=f"{name} nfe={nfe} {final}")
            else:
                # the same per-row arithmetic in two programs of different shapes: XLA may
                # vectorize the transcendentals (exp, log, expm1 of the log-SNR curves)
                # differently, a few float32 roundings on values scaled by |value|
                np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
                ok = np.isfinite(b)
                np.testing.assert_allclose(a[ok], b[ok], rtol=64 * EPS32, atol=64 * EPS32, err_msg=name)


def test_singlestep_tables_without_nfe_target_compile_once():
    """Without an NFE target the singlestep orders follow lower_order_final, which depends
    on the length (< 15 steps lowers the last ones): still one program for all lengths."""
    solver = S.get("dpm++3s")
    sizes = []
    for n in (5, 16):
        grid = time_grid(PROC, n)
        pad = _init(solver, PROC, X2, grid, None, nfe=None, max_steps=BOUND).aux.order
        want = order_schedule(3, n, None, lower_order_final=True)
        assert np.asarray(pad)[:n].tolist() == want
        sizes.append(_tables._cache_size())
    assert sizes[1] == sizes[0]
