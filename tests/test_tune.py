"""Optimized and learned time grids (jdiff.tune): LD3, GITS, DMN, grid files, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32, EPS64

import jdiff
from jdiff import solvers as S
from jdiff import tune as T
from jdiff.testbed import random_mixture

DIM = 4


@pytest.fixture(scope="module")
def bed():
    """A small VP testbed, its noises and a high-accuracy teacher (float32)."""
    mix = random_mixture(jax.random.key(3), DIM, 3, spread=1.0, std_range=(0.1, 0.4))
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)
    x_tr = proc.prior_sample(jax.random.key(0), (32, DIM))
    x_va = proc.prior_sample(jax.random.key(1), (64, DIM))
    x = jnp.concatenate([x_tr, x_va])
    y = T.teacher_solve(den, x, steps=100)
    return dict(mix=mix, proc=proc, den=den, x_tr=x_tr, y_tr=y[:32], x_va=x_va, y_va=y[32:])


def test_grid_from_logits_monotone_and_ends(bed):
    proc = bed["proc"]
    # extreme logits still give a strictly decreasing grid with exact end points
    for z in (jnp.zeros(5), jnp.asarray([4.0, -4.0, 0.0, 2.0, -1.0])):
        for space in ("logsnr", "t"):
            g = np.asarray(T.grid_from_logits(proc, z, 1.0, 1e-3, space))
            assert g[0] == np.float32(1.0) and g[-1] == np.float32(1e-3)
            assert np.all(np.diff(g) < 0)
    # zero logits are the logSNR-uniform grid; logits_from_grid inverts grid_from_logits
    ref = np.asarray(jdiff.time_grid(proc, 5, kind="logsnr"))
    g = np.asarray(T.grid_from_logits(proc, jnp.zeros(5), proc.t_max, proc.t_min))
    np.testing.assert_allclose(g, ref, rtol=64 * EPS32)  # float32 lambda -> t round trips
    q = np.asarray(jdiff.time_grid(proc, 5, kind="quadratic"))
    back = np.asarray(T.grid_from_logits(proc, T.logits_from_grid(proc, q), proc.t_max, proc.t_min))
    np.testing.assert_allclose(back, q, rtol=1e-4)  # log/exp/softmax/cumsum in float32 over 5 terms


LD3_KW = dict(iters=40, learning_rate=0.1, slack=0.05, batch_size=16, seed=7)


def test_ld3_monotone_and_lowers_heldout_error(bed):
    solver, nfe = S.ddim(), 3
    base = jdiff.time_grid(bed["proc"], nfe, kind="logsnr")  # LD3's initial grid
    fit = T.ld3(solver, bed["den"], bed["x_tr"], bed["y_tr"], nfe, **LD3_KW)
    g = fit.grid
    assert g.shape == (nfe + 1,) and np.all(np.diff(g) < 0)
    assert g[0] == np.float32(bed["proc"].t_max) and g[-1] == np.float32(bed["proc"].t_min)
    assert min(fit.history) < fit.history[0]
    e0 = T.grid_error(solver, bed["den"], bed["x_va"], bed["y_va"], base)
    e1 = T.grid_error(solver, bed["den"], bed["x_va"], bed["y_va"], g)
    # a real improvement on noises the fit never saw (measured: about 0.5x)
    assert e1 < 0.8 * e0, (e0, e1)
    # the learned grid is a grid like any other: sample() takes it
    x = jdiff.sample(solver, bed["den"], bed["x_va"], jnp.asarray(g, jnp.float32))
    assert np.all(np.isfinite(np.asarray(x)))
    # deterministic for a seed (minibatches and the slack included); another seed differs
    again = T.ld3(solver, bed["den"], bed["x_tr"], bed["y_tr"], nfe, **LD3_KW)
    np.testing.assert_array_equal(again.grid, fit.grid)
    assert again.history == fit.history
    other = T.ld3(solver, bed["den"], bed["x_tr"], bed["y_tr"], nfe, **dict(LD3_KW, seed=8))
    assert other.history != fit.history


def test_gits_path_equals_brute_force():
    rng = np.random.default_rng(0)
    for M, N in ((6, 1), (6, 3), (7, 4), (8, 5), (8, 8)):
        C = rng.uniform(0.1, 2.0, (M + 1, M + 1))
        C[np.tril_indices(M + 1)] = np.inf
        path, total = T.gits_path(C, N)
        bpath, btotal = T._brute_force_path(C, N)
        assert path == bpath
        assert abs(total - btotal) <= 8 * EPS64 * btotal  # the same sum, possibly reassociated
        assert path[0] == 0 and path[-1] == M and len(path) == N + 1 and all(np.diff(path) > 0)


def test_gits_on_a_tiny_fine_grid(bed):
    solver = S.ddim()
    fit = T.gits(solver, bed["den"], bed["x_tr"][:8], 3, fine_steps=6)
    fine = np.asarray(jdiff.time_grid(bed["proc"], 6, kind="logsnr"), np.float64)
    assert set(np.float32(fit.grid)) <= set(np.float32(fine)) and np.all(np.diff(fit.grid) < 0)
    # the chosen grid is the brute-force optimum of the measured costs, and the cost of a
    # step equals the error of that step recomputed by hand from the teacher trajectory
    _, info = jdiff.sample(S.dpm_solver_pp(3), bed["den"], bed["x_tr"][:8], fine, return_info=True, trajectory=True)
    C = T.gits_costs(solver, bed["den"], fine, info.xs)
    bpath, btotal = T._brute_force_path(C, 3)
    np.testing.assert_array_equal(np.float32(fit.grid), np.float32(fine[bpath]))
    x = jdiff.sample(solver, bed["den"], info.xs[1], jnp.asarray(fine[[1, 4]], jnp.float32))
    by_hand = float(jnp.mean(jnp.linalg.norm(x - info.xs[4], axis=-1)))
    np.testing.assert_allclose(C[1, 4], by_hand, rtol=16 * EPS32 * 8)  # 8 samples x few ops, float32
    assert np.all(np.isinf(C[np.tril_indices(7)]))


def test_save_load_round_trip_and_refusals(bed, tmp_path):
    den, proc = bed["den"], bed["proc"]
    path = str(tmp_path / "grids.json")
    g5 = np.asarray(jdiff.time_grid(proc, 5, kind="quadratic"), np.float64)
    g3 = np.asarray(jdiff.time_grid(proc, 3, kind="karras"), np.float64)
    model = T.model_fingerprint(den)
    T.save_grids(path, [dict(solver="dpm++2m", nfe=5, grid=g5, method="ld3")], model=model, process=proc)
    T.save_grids(path, [dict(solver="ddim", nfe=3, grid=g3)], model=model, process=proc)  # appended
    got = T.load_grid(path, denoiser=den, solver=S.dpm_solver_pp(2), nfe=5)
    np.testing.assert_array_equal(np.asarray(got), np.float32(g5))
    np.testing.assert_array_equal(np.asarray(T.load_grid(path, denoiser=den, solver="ddim", nfe=3)), np.float32(g3))
    x = jdiff.sample(S.dpm_solver_pp(2), den, bed["x_va"][:4], got)
    assert np.all(np.isfinite(np.asarray(x)))
    # another model, another process, another NFE or solver: refused with the reason
    other = random_mixture(jax.random.key(4), DIM, 3).denoiser(proc)
    with pytest.raises(ValueError, match="made for model"):
        T.load_grid(path, denoiser=other, solver="dpm++2m", nfe=5)
    with pytest.raises(ValueError, match="made for"):
        T.load_grid(path, denoiser=bed["mix"].denoiser(jdiff.vp_cosine()), solver="dpm++2m", nfe=5)
    with pytest.raises(ValueError, match="no grid for dpm\\+\\+2m at nfe 6; it has: .*dpm\\+\\+2m@5"):
        T.load_grid(path, denoiser=den, solver="dpm++2m", nfe=6)
    with pytest.raises(ValueError, match="no grid for unipc2"):
        T.load_grid(path, denoiser=den, solver="unipc2", nfe=5)
    with pytest.raises(ValueError, match="not .* choose another file"):
        T.save_grids(path, [dict(solver="ddim", nfe=3, grid=g3)], model="other", process=proc)
    with pytest.raises(ValueError, match="strictly decreasing"):
        T.save_grids(str(tmp_path / "b.json"), [dict(solver="ddim", nfe=3, grid=g3[::-1])], model=model, process=proc)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a jdiff grid file"):
        T.load_grid(str(tmp_path / "bad.json"), denoiser=den, solver="ddim", nfe=3)


def test_errors_before_fitting(bed):
    den, x, y = bed["den"], bed["x_tr"], bed["y_tr"]
    with pytest.raises(ValueError, match="ipndm4 cannot run with nfe=2"):
        T.ld3(S.ipndm(4), den, x, y, 2)
    with pytest.raises(ValueError, match="heun cannot run with nfe=1"):
        T.gits(S.heun(), den, x, 1)
    with pytest.raises(ValueError, match="non-empty batch"):
        T.ld3(S.ddim(), den, x[:0], y[:0], 3)
    with pytest.raises(ValueError, match="non-finite"):
        T.ld3(S.ddim(), den, x.at[0, 0].set(jnp.nan), y, 3)
    with pytest.raises(ValueError, match="same shape"):
        T.ld3(S.ddim(), den, x, y[:5], 3)
    with pytest.raises(ValueError, match="stochastic"):
        T.ld3(S.ddpm(), den, x, y, 3)
    with pytest.raises(ValueError, match="nfe must be a positive int, got 0"):
        T.ld3(S.ddim(), den, x, y, 0)
    with pytest.raises(ValueError, match="fine_steps"):
        T.gits(S.ddim(), den, x, 5, fine_steps=3)
    with pytest.raises(ValueError, match="log-SNR"):
        T.dmn(jdiff.rectified_flow(), 4)
    with pytest.raises(ValueError, match="num_train must be a positive int .*got 0"):
        T.tune(den, "ddim", [3], shape=(DIM,), num_train=0, progress=False)
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        T.tune(den, "ddim", [3], shape=(DIM,), method="foo", progress=False)
    with pytest.raises(ValueError, match="unipc3 cannot run with nfe=0|positive int"):
        T.tune(den, "unipc3", [5, 0], shape=(DIM,), progress=False)
    with pytest.raises(ValueError, match="teacher .* non-finite"):
        T.tune(den, "ddim", [3], shape=(DIM,), teacher=lambda x, c: x * jnp.nan, progress=False)


def test_tune_writes_a_file_sample_can_use(bed, tmp_path):
    den = bed["den"]
    out = str(tmp_path / "g.json")
    rows = T.tune(
        den,
        "ddim",
        [3],
        teacher=lambda x, c: T.teacher_solve(den, x, steps=100),  # the fixture's compiled teacher
        shape=(DIM,),
        method="dmn",
        num_train=32,
        num_val=64,
        out=out,
        progress=False,
        order=1,
        iters=20,
    )
    assert rows[0]["nfe"] == 3 and np.isfinite(rows[0]["err"]) and np.isfinite(rows[0]["err_baseline"])
    g = T.load_grid(out, denoiser=den, solver="ddim", nfe=3)
    np.testing.assert_array_equal(np.asarray(g), np.float32(rows[0]["grid"]))


def test_network_time_wrapper(bed):
    from jdiff.wrappers import network_time

    den, proc, x = bed["den"], bed["proc"], bed["x_va"][:8]
    grid = jnp.asarray(jdiff.time_grid(proc, 4, kind="quadratic"))
    net = grid.at[2].set(0.5 * (grid[1] + grid[2]))
    mid, t_out = 0.5 * (grid[2] + grid[3]), jnp.float32(0.0005)

    @jax.jit  # one program for all the evaluations below (eager calls compile op by op)
    def evals(x):
        same = network_time(den, grid, grid)
        wx, we = network_time(den, grid, net, keep="x0"), network_time(den, grid, net, keep="eps")
        return dict(
            same=[same(x, t).x0 for t in (mid, t_out)],  # between knots, outside the grid
            den=[den(x, t).x0 for t in (mid, t_out)],
            wx=wx(x, grid[2]),
            we=we(x, grid[2]),
            at_net=den(x, net[2]),  # at the grid point: the network at its own time
            w_mid=we(x, mid).eps,  # linear in t between knots
            den_mid=den(x, 0.5 * (net[2] + net[3])).eps,
        )

    r = evals(x)
    for a, b in zip(r["same"], r["den"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * EPS32)  # the x0/eps round trip in float32
    # the kept prediction is the network's at its own time (one program: XLA may fuse the
    # two evaluations differently, so equal up to a couple of float32 roundings)
    np.testing.assert_allclose(r["wx"].x0, r["at_net"].x0, rtol=4 * EPS32, atol=4 * EPS32)
    np.testing.assert_allclose(r["we"].eps, r["at_net"].eps, rtol=4 * EPS32, atol=4 * EPS32)
    a, s = proc.alpha(grid[2]), proc.sigma(grid[2])  # the other follows at the solver's time
    for p in (r["wx"], r["we"]):
        np.testing.assert_allclose(a * p.x0 + s * p.eps, x, rtol=0, atol=64 * EPS32)
    np.testing.assert_allclose(r["w_mid"], r["den_mid"], rtol=4 * EPS32, atol=4 * EPS32)  # interp vs midpoint
    with pytest.raises(ValueError, match="keep must be"):
        network_time(den, grid, grid, keep="v")
    with pytest.raises(ValueError, match="same length"):
        network_time(den, grid, grid[:-1])
    with pytest.raises(ValueError, match=r"net_grid must be finite times in \[.*2\.0"):
        network_time(den, grid, grid.at[1].set(2.0))


def test_ld3_decoupled_network_times(bed, tmp_path):
    solver, nfe, proc = S.ddim(), 3, bed["proc"]
    kw = dict(iters=30, learning_rate=0.1, seed=7)
    fit = T.ld3(solver, bed["den"], bed["x_tr"], bed["y_tr"], nfe, decouple=0.5, **kw)
    # zero offsets at the start: the first loss is the initial (logSNR) grid's own error
    g0 = jdiff.time_grid(proc, nfe, kind="logsnr")
    x0 = jdiff.sample(solver, bed["den"], bed["x_tr"], g0)
    loss0 = float(jnp.mean(jnp.sum((x0 - bed["y_tr"]) ** 2, -1)))
    np.testing.assert_allclose(fit.history[0], loss0, rtol=256 * EPS32)  # float32 grid round trip, 3 steps
    assert min(fit.history) < 0.9 * loss0
    g, n = fit.grid, fit.net_grid
    assert np.all(np.diff(g) < 0) and n[0] == g[0] and n[-1] == g[-1]
    # the kept prediction follows the solver: eps for the noise-prediction family and iPNDM
    assert fit.keep == "x0"
    for name, keep in (("ipndm3", "eps"), ("ipndm3-v", "eps"), ("dpm2m", "eps"), ("deis2", "eps"), ("dpm++2m", "x0")):
        assert T.default_keep(S.get(name)) == keep, name
    assert T.default_keep(S.unipc(2)) == "x0" and T.default_keep(S.ddim()) == "x0"
    # each interior network time within half its smaller neighbouring log-SNR interval
    lam = lambda v: np.asarray(proc.lambda_(jnp.asarray(v, jnp.float32)), np.float64)  # noqa: E731
    lg, ln = lam(g), lam(n)
    half = 0.5 * np.minimum(np.diff(lg)[:-1], np.diff(lg)[1:])
    assert np.all(np.abs(ln[1:-1] - lg[1:-1]) <= half * (1 + 1e-4)) and np.any(n[1:-1] != g[1:-1])
    e0 = T.grid_error(solver, bed["den"], bed["x_va"], bed["y_va"], g0)
    e1 = T.grid_error(solver, fit.denoiser(bed["den"]), bed["x_va"], bed["y_va"], g)
    assert e1 < 0.8 * e0, (e0, e1)
    # the network times travel with the grid file
    path = str(tmp_path / "g.json")
    model = T.model_fingerprint(bed["den"])
    T.save_grids(path, [dict(solver="ddim", nfe=nfe, grid=g, net_grid=n)], model=model, process=proc)
    g2, n2 = T.load_grid(path, denoiser=bed["den"], solver="ddim", nfe=nfe, with_net=True)
    np.testing.assert_array_equal(np.asarray(n2), np.float32(n))
    with pytest.raises(ValueError, match="decouple must be in"):
        T.ld3(solver, bed["den"], bed["x_tr"], bed["y_tr"], nfe, decouple=0.7)
    with pytest.raises(ValueError, match="net_grid for ddim nfe 3 must be"):
        T.save_grids(path, [dict(solver="ddim", nfe=nfe, grid=g, net_grid=n[:-1])], model=model, process=proc)


@pytest.fixture(scope="module")
def data_end(bed):
    """The fixture's noises with a teacher that ends at the data (t = 0)."""
    y = T.teacher_solve(bed["den"], jnp.concatenate([bed["x_tr"], bed["x_va"]]), t_end=0.0, steps=100)
    return dict(y_tr=y[:32], y_va=y[32:])


def _in_range_to_data(proc, g):
    g = np.asarray(g, np.float64)
    assert g[-1] == 0.0 and np.all(np.diff(g) < 0), g
    assert np.all(g[:-1] >= proc.t_min) and np.all(g[:-1] <= proc.t_max), g  # no tolerance: inside the range


def test_grids_that_end_at_the_data(bed, data_end):
    proc, den = bed["proc"], bed["den"]
    init = jdiff.time_grid(proc, 7, kind="logsnr", final="data")  # its point 6 is t_min itself
    # the logit round trip keeps the t_min point at or above t_min (moved up by 0.1% of the span)
    back = np.asarray(T.grid_from_logits(proc, T.logits_from_grid(proc, init), 1.0, 0.0))
    _in_range_to_data(proc, back)
    lam = np.asarray(proc.lambda_(jnp.asarray([1.0, back[-2], proc.t_min], jnp.float32)), np.float64)
    np.testing.assert_allclose(lam[2] - lam[1], 1e-3 * (lam[2] - lam[0]), rtol=1e-2)
    # a vanishing last fraction still leaves the point inside [t_min, t_max] (clipped, not rounded below)
    z = jnp.asarray([0.0, 0.0, -60.0])
    _in_range_to_data(proc, T.grid_from_logits(proc, z, 1.0, 0.0))
    # the call of the issue: LD3 from a data-ending logSNR grid (iPNDM-AFS: 7 steps for 6 calls)
    solver = S.ipndm(afs=True)
    fit = T.ld3(solver, den, bed["x_tr"], data_end["y_tr"], 6, init=init, t_end=0.0, iters=20, learning_rate=0.2)
    _in_range_to_data(proc, fit.grid)
    assert min(fit.history) < 0.9 * fit.history[0], fit.history
    e0 = T.grid_error(solver, den, bed["x_va"], data_end["y_va"], init)
    e1 = T.grid_error(solver, den, bed["x_va"], data_end["y_va"], fit.grid)
    assert e1 < e0, (e0, e1)
    # GITS over a logSNR fine grid that ends at the data; DMN with its last step from t_min to the data
    g = T.gits(S.ddim(), den, bed["x_tr"][:8], 3, t_end=0.0, fine_kind="logsnr", fine_steps=8)
    fine = np.float32(jdiff.time_grid(proc, 8, kind="logsnr", final="data"))
    _in_range_to_data(proc, g.grid)
    assert set(np.float32(g.grid)) <= set(fine)
    d = T.dmn(proc, 4, t_end=0.0, iters=30)
    _in_range_to_data(proc, d.grid)
    assert d.grid[-2] == np.float32(proc.t_min) and min(d.history) < d.history[0]
    # an initial grid with a point below t_min is refused before any compilation
    bad = np.asarray(init).copy()
    bad[-2] = 0.5 * proc.t_min
    with pytest.raises(ValueError, match="init grid times .*outside the valid range"):
        T.ld3(solver, den, bed["x_tr"], data_end["y_tr"], 6, init=bad, t_end=0.0)


def test_tune_with_own_noises_and_teacher_to_the_data(bed, data_end, tmp_path):
    den, proc = bed["den"], bed["proc"]
    out = str(tmp_path / "g.json")
    rows = T.tune(
        den,
        "ddim",
        [3],
        x_train=bed["x_tr"],
        x_val=bed["x_va"],
        teacher=(data_end["y_tr"], data_end["y_va"]),
        t_end=0.0,
        method="dmn",
        order=1,
        iters=20,
        out=out,
        progress=False,
    )
    (r,) = rows
    _in_range_to_data(proc, r["grid"])
    v = r["heldout"]
    assert v["num"] == 64 and v["fixed"]["kind"] in ("uniform", "logsnr", "quadratic", "karras")
    # the baseline ends at the data too: its error is the one of the fixed grid to t = 0
    fixed = jdiff.time_grid(proc, 3, kind=v["fixed"]["kind"], final="data")
    e = T.grid_error(S.ddim(), den, bed["x_va"], data_end["y_va"], fixed)
    np.testing.assert_allclose(v["fixed"]["mean"], e, rtol=1e-5)
    with pytest.raises(ValueError, match="give both x_train and x_val"):
        T.tune(den, "ddim", [3], x_train=bed["x_tr"], method="dmn", progress=False)
    with pytest.raises(ValueError, match="teacher \\(held out\\) output has shape"):
        T.tune(den, "ddim", [3], x_train=bed["x_tr"], x_val=bed["x_va"], teacher=(data_end["y_tr"], data_end["y_tr"]))


def test_tune_keeps_the_fixed_grid_when_the_fit_loses(bed, tmp_path, capsys):
    den, proc = bed["den"], bed["proc"]
    out = str(tmp_path / "g.json")
    # a deliberately bad fit: one Adam step of a tiny size from a grid crowded near t_max
    # (LD3 returns the lowest training loss, here its start)
    bad = np.asarray([proc.t_max, 0.99, 0.98, proc.t_min])
    kw = dict(x_train=bed["x_tr"][:2], x_val=bed["x_va"], teacher=(bed["y_tr"][:2], bed["y_va"]), method="ld3")
    (r,) = T.tune(den, "ddim", [3], init=bad, iters=1, learning_rate=1e-6, out=out, progress=True, **kw)
    v = r["heldout"]
    assert r["kept"] == "fixed" and v["kept"] == "fixed" and v["fit"]["mean"] > v["fixed"]["mean"]
    fixed = np.asarray(jdiff.time_grid(proc, 3, kind=v["fixed"]["kind"]), np.float64)
    np.testing.assert_array_equal(r["grid"], fixed)
    assert r["err"] == v["fixed"]["mean"] and r["err_fit"] == v["fit"]["mean"]
    # the best fixed grid is the best of the four kinds on the held-out noises
    errs = {
        k: T.grid_error(S.ddim(), den, bed["x_va"], bed["y_va"], jdiff.time_grid(proc, 3, kind=k))
        for k in ("uniform", "logsnr", "quadratic", "karras")
    }
    assert v["fixed"]["kind"] == min(errs, key=errs.get)
    np.testing.assert_allclose(v["fixed"]["mean"], errs[v["fixed"]["kind"]], rtol=1e-6)
    # "far": above 10x the fixed grid's median; the fixed grid's own count follows from its errors
    assert v["far_limit"] == pytest.approx(10 * v["fixed"]["median"]) and v["fit"]["far"] >= v["fixed"]["far"]
    assert "does not beat the fixed" in capsys.readouterr().err  # one line says so
    # the file holds the fixed grid and the held-out comparison
    np.testing.assert_array_equal(np.asarray(T.load_grid(out, denoiser=den, solver="ddim", nfe=3)), np.float32(fixed))
    saved = T.read_grids(out)["grids"][0]
    assert saved["kept"] == "fixed" and saved["heldout"]["fit"]["mean"] == v["fit"]["mean"]


def test_tune_keeps_a_fit_that_wins(bed):
    # LD3 with the settings of test_ld3_monotone_and_lowers_heldout_error (same program),
    # started from the best fixed grid (quadratic here): measured held-out mean 0.4197
    # against 0.4233 (from the logSNR grid it loses: 0.456, and the fixed grid is kept)
    kw = dict(x_train=bed["x_tr"], x_val=bed["x_va"], teacher=(bed["y_tr"], bed["y_va"]), progress=False)
    (r,) = T.tune(bed["den"], "ddim", [3], init="quadratic", **kw, **LD3_KW)
    assert r["kept"] == "fit" and r["heldout"]["fit"]["mean"] < r["heldout"]["fixed"]["mean"]
    assert r["baseline_kind"] == "quadratic"
    # tune's seed is the one of its noises: the fit ran with ld3's default seed
    fit = T.ld3(S.ddim(), bed["den"], bed["x_tr"], bed["y_tr"], 3, init="quadratic", **dict(LD3_KW, seed=0))
    np.testing.assert_array_equal(r["grid"], fit.grid)


def test_equal_fits_share_one_program(bed):
    from jdiff.tune import _ld3
    from jdiff.tune._programs import Bounded

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: compiles.append(ev) if ev == "/jax/core/compile/backend_compile_duration" else None
    )
    den, x, y = bed["den"], bed["x_tr"][:4], bed["y_tr"][:4]
    T.ld3(S.dpm_solver_pp(2), den, x, y, 2, iters=2, init="quadratic")
    size = _ld3._ld3_fit.cache_size()
    n = len(compiles)
    # another seed, learning rate and other noises of the same shape: no new program at all
    x2, y2 = bed["x_tr"][4:8], bed["y_tr"][4:8]
    T.ld3(S.dpm_solver_pp(2), den, x2, y2, 2, iters=2, seed=3, learning_rate=0.2, init="quadratic")
    assert _ld3._ld3_fit.cache_size() == size and len(compiles) == n, len(compiles) - n
    # a bounded cache holds at most its limit of programs
    f = Bounded(jax.jit(lambda a, *, k: a * k), limit=2)
    for k in (1, 2, 3, 1):
        f(jnp.ones(3), k=k)
        assert f.cache_size() <= 2
    assert f.cleared == 1


def test_dmn_objective(bed, x64):
    # last in the module: the x64 fixture stays on for the tests after it
    proc = bed["proc"]
    lam = jnp.asarray(np.linspace(-5.0, 4.0, 6))
    t = proc.t_of_lambda(lam)
    err = proc.sigma(t) ** 2 / proc.alpha(t)
    # order 1: every step is |e^{lam_{n+1}} - e^{lam_n}| err_n (closed form)
    by_hand = jnp.sum(jnp.abs(jnp.exp(lam[1:]) - jnp.exp(lam[:-1])) * err[:-1])
    np.testing.assert_allclose(T.dmn_objective(proc, lam, order=1), by_hand, rtol=64 * EPS64)
    # the Lagrange weights of a step sum to int e^lam (partition of unity), for 1..3 nodes
    nodes = jnp.stack([lam[:3]] * 3)
    mask = np.tril(np.ones((3, 3), bool))  # row k - 1 uses the first k nodes
    w = T._step_weights(nodes, jnp.full(3, lam[2]), jnp.full(3, lam[3]), mask)
    np.testing.assert_allclose(jnp.sum(w, -1), jnp.exp(lam[3]) - jnp.exp(lam[2]), rtol=1e3 * EPS64)
    # the fit decreases the bound, keeps the ends and the order
    fit = T.dmn(proc, 5, order=3, iters=100)
    assert min(fit.history) < 0.9 * fit.history[0]
    assert np.all(np.diff(fit.grid) < 0)
    assert fit.grid[0] == np.float32(proc.t_max) and fit.grid[-1] == np.float32(proc.t_min)


def test_cli_refuses_bad_input_before_loading(capsys, tmp_path):
    from jdiff.cli import main

    out = str(tmp_path / "g.json")
    for argv, msg in (
        (["--solver", "ddpm", "--nfe", "5"], "stochastic"),
        (["--solver", "ipndm4", "--nfe", "2"], "--nfe 2 is below what ipndm4 needs"),
        (["--solver", "unipc2", "--nfe", "5,x"], "comma-separated"),
        (["--solver", "unipc2", "--nfe", "5", "--num-train", "0"], "--num-train must be >= 1"),
        (["--solver", "nope", "--nfe", "5"], "--solver"),
    ):
        assert main(["tune", *argv, "--out", out]) == 2
        assert msg in capsys.readouterr().err
    # an --out that is not a grid file is refused before any work
    (tmp_path / "notes.txt").write_text("not json")
    assert main(["tune", "--solver", "unipc2", "--nfe", "5", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "--out: cannot read grid file" in capsys.readouterr().err


def test_cli_tuning_into_a_run_takes_its_lock(capsys, tmp_path):
    """Grids written into a run directory wait for no one: while another writer holds
    the run's lock, `jdiff tune --run R --out R/...` refuses at once, before loading."""
    from jdiff import runs
    from jdiff.cli import main

    run = tmp_path / "run"
    run.mkdir()
    with runs.lock_run(run):  # another open file description: flock excludes it
        code = main(["tune", "--run", str(run), "--solver", "unipc2", "--nfe", "5", "--out", str(run / "g.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use" in err, err
    assert not (run / "g.json").exists()
