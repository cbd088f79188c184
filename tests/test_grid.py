"""Time grids."""

import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S


def test_spacings():
    p = jdiff.vp_linear()
    g = np.asarray(jdiff.time_grid(p, 10, kind="logsnr"))
    assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(1e-3)
    lam = np.asarray(p.lambda_(jnp.asarray(g)))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)
    u = np.asarray(jdiff.time_grid(p, 10, kind="uniform"))
    np.testing.assert_allclose(np.diff(u), np.diff(u)[0], rtol=1e-5)
    q = np.asarray(jdiff.time_grid(p, 10, kind="quadratic"))
    np.testing.assert_allclose(np.diff(np.sqrt(q)), np.diff(np.sqrt(q))[0], rtol=1e-4)


def test_karras_matches_edm_formula():
    e = jdiff.edm()
    g = np.asarray(jdiff.time_grid(e, 18, kind="karras"))
    i = np.arange(19)
    want = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. Eq. 5
    np.testing.assert_allclose(g, want, rtol=1e-5)
    assert jdiff.default_grid_kind(e) == "karras"


def test_final_to_data_and_nfe():
    p = jdiff.vp_linear()
    g = np.asarray(jdiff.time_grid(p, 5, final="data"))
    assert g.shape == (6,) and g[-1] == 0.0 and g[-2] == pytest.approx(1e-3)
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
    np.testing.assert_allclose(g, [0.8, 0.625, 0.45, 0.275, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="larger than"):
        jdiff.time_grid(p, 4, t_start=0.1, t_end=0.5)
