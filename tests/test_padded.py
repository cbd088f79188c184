"""``sample_padded``: one compiled loop per solver serves every grid length, with the
same result as ``sample``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32

import jdiff
from jdiff import solvers as S
from jdiff._padded import _loop, sample_padded
from jdiff.testbed import random_mixture

MIX = random_mixture(jax.random.key(0), 3)
PROC = jdiff.vp_cosine()
DEN = MIX.denoiser(PROC)
X_T = jdiff.prior_sample(PROC, jax.random.key(1), (8, 3))
KEY = jax.random.key(2)
MAX_STEPS = 12


@pytest.mark.parametrize("name", ["dpm++3s", "unipc3-bh1", "ddpm"])
def test_padded_equals_sample_for_every_length(name):
    solver = S.get(name)
    before = _loop._cache_size()
    for nfe in (4, 9):
        a, info = jdiff.sample(solver, DEN, X_T, nfe=nfe, key=KEY, return_info=True)
        b, used = sample_padded(solver, DEN, X_T, nfe=nfe, key=KEY, max_steps=MAX_STEPS, return_nfe=True)
        assert int(used) == int(info.nfe)
        # the same operations in a while_loop instead of a scan: XLA may fuse and reorder
        # them differently, a few roundings per step of values of order |x| <= 4,
        # amplified by at most the steps' Lipschitz constants (the sharp testbed modes:
        # up to ~30 over a 9-step run); 64 * nfe roundings of 4 bound that.
        tol = 64 * nfe * 4 * EPS32
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=tol, rtol=0)
    # both lengths ran the same compiled loop
    assert _loop._cache_size() - before == 1


def test_padded_rejects_long_grids_and_bad_bounds():
    with pytest.raises(ValueError, match="more than max_steps=3"):
        sample_padded(S.ddim(), DEN, X_T, nfe=5, max_steps=3)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        sample_padded(S.ddim(), DEN, X_T, nfe=5, max_steps=0)
    with pytest.raises(ValueError, match="non-finite"):
        sample_padded(S.ddim(), DEN, X_T.at[0, 0].set(jnp.nan), nfe=5, max_steps=8)
