"""Time grids."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S


def test_spacings():
    p = jdiff.vp_linear()
    g = np.asarray(jdiff.time_grid(p, 10, kind="logsnr"))
    # the end points are float64 constants rounded once to float32
    assert g[0] == pytest.approx(1.0, rel=EPS32) and g[-1] == pytest.approx(1e-3, rel=EPS32)
    lam = np.asarray(p.lambda_(jnp.asarray(g)))
    # lambda -> t -> lambda round trip in float32: ~32 ulps of |lambda| for the ~10 ops each
    # way and the rounding of t (|d lambda / d log t| <= 10 here), per node: ~5e-5 absolute
    # against spacings of ~0.96 (|lambda| <= 5), while another spacing kind is off by O(1)
    dl = np.diff(lam)
    np.testing.assert_allclose(dl, dl[0], rtol=0, atol=64 * EPS32 * (1 + np.abs(lam).max()))
    # uniform and quadratic grids: float64 values rounded once to float32 (<= EPS32 / 2 of
    # values <= 1), so a difference is off by <= EPS32 absolute; 4x margin
    u = np.asarray(jdiff.time_grid(p, 10, kind="uniform"))
    np.testing.assert_allclose(np.diff(u), np.diff(u)[0], rtol=0, atol=4 * EPS32 * np.abs(u).max())
    q = np.asarray(jdiff.time_grid(p, 10, kind="quadratic"))
    sq = np.sqrt(q.astype(np.float64))
    np.testing.assert_allclose(np.diff(sq), np.diff(sq)[0], rtol=0, atol=4 * EPS32 * sq.max())


def test_karras_matches_edm_formula():
    e = jdiff.edm()
    g = np.asarray(jdiff.time_grid(e, 18, kind="karras"))
    i = np.arange(19)
    want = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. Eq. 5
    # log-SNR nodes rounded to float32 (EPS32 / 2 * |lambda| absolute), then t = exp(-lambda)
    # in float32 (a few ulps): relative error ~ EPS32 * (1 + max |lambda|), |lambda| <= log 500;
    # 8x margin, about 6e-6; a wrong exponent (rho = 5 instead of 7) is off by 10%
    np.testing.assert_allclose(g, want, rtol=8 * EPS32 * (1 + np.log(500.0)))
    assert jdiff.default_grid_kind(e) == "karras"


def test_final_to_data_and_nfe():
    p = jdiff.vp_linear()
    g = np.asarray(jdiff.time_grid(p, 5, final="data"))
    assert g.shape == (6,) and g[-1] == 0.0 and g[-2] == pytest.approx(1e-3, rel=EPS32)
    rf = np.asarray(jdiff.time_grid(jdiff.rectified_flow(), 4, final="data"))
    np.testing.assert_allclose(rf, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert jdiff.time_grid(p, nfe=10, solver=S.heun()).shape == (6,)
    assert jdiff.time_grid(p, nfe=9, solver=S.heun(), final="data").shape == (6,)
    assert jdiff.time_grid(p, nfe=10, solver=S.dpm_solver(3)).shape == (5,)
    assert jdiff.time_grid(p, nfe=10, solver=S.unipc(3)).shape == (11,)
    with pytest.raises(ValueError, match="nfe together with solver"):
        jdiff.time_grid(p)


def test_custom_range():
    p = jdiff.vp_linear()
    g = np.asarray(jdiff.time_grid(p, 4, t_start=0.8, t_end=0.1, kind="uniform"))
    # float64 values rounded once to float32: <= EPS32 / 2 relative
    np.testing.assert_allclose(g, [0.8, 0.625, 0.45, 0.275, 0.1], rtol=EPS32)
    with pytest.raises(ValueError, match="larger than"):
        jdiff.time_grid(p, 4, t_start=0.1, t_end=0.5)
