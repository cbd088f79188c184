"""Finite results for every solver family across NFE, input dtypes, the final step to
t = 0 (infinite log-SNR) and zero-terminal-SNR processes (alpha = 0 at t_max)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

FAMILIES = {
    "ddim": lambda k: S.ddim(),
    "euler(t)": lambda k: S.euler(),
    "euler(rho)": lambda k: S.euler("rho"),
    "heun(t)": lambda k: S.heun(),
    "heun(rho)": lambda k: S.heun("rho"),
    "dpm_solver-3": lambda k: S.dpm_solver(3),
    "dpm_solver-3M": lambda k: S.dpm_solver(3, method="multistep"),
    "dpm_solver++(2S)": lambda k: S.dpm_solver_pp(2, method="singlestep"),
    "dpm_solver++(2M)": lambda k: S.dpm_solver_pp(2),
    "dpm_solver++(3M)": lambda k: S.dpm_solver_pp(3),
    "deis-3(t)": lambda k: S.deis(3),
    "deis-3(rho)": lambda k: S.deis(3, basis="rho"),
    "unipc-3(bh1)": lambda k: S.unipc(3, variant="bh1"),
    "unipc-2(bh2)": lambda k: S.unipc(2),
    "unip-3": lambda k: S.unipc(3, corrector=False),
    "ipndm": lambda k: S.ipndm(min(4, k)),
    "ipndm_v": lambda k: S.ipndm(min(4, k), variable_step=True),
    "ddim(eta=0.7)": lambda k: S.ddim(eta=0.7),
    "ddpm": lambda k: S.ddpm(),
    "sde_dpm_solver++(2M)": lambda k: S.sde_dpm_solver_pp(2),
    "euler_maruyama": lambda k: S.euler_maruyama(),
}

MIX = random_mixture(jax.random.key(0), 2, 3, std_range=(0.05, 0.3))  # sharp modes: a hard case
KEY = jax.random.key(1)


def _run(make, proc, nfe, dtype, prediction=None, final="data", kind="default"):
    den = MIX.denoiser(proc, prediction)
    probe = make(nfe)
    n = probe.num_steps(nfe, final == "data")
    solver = make(max(1, n))
    grid = jdiff.time_grid(proc, n, final=final, kind=kind)
    x_T = jdiff.prior_sample(proc, KEY, (16, 2), dtype)
    x, info = jdiff.sample(solver, den, x_T, grid, key=KEY, return_info=True)
    assert x.dtype == dtype
    return np.asarray(x.astype(jnp.float32)), int(info.nfe)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finite_over_nfe_dtypes_and_endpoints(name):
    make = FAMILIES[name]
    vp = jdiff.vp_linear()
    zsnr = jdiff.vp_discrete(
        jdiff.rescale_zero_terminal_snr(jdiff.ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012))
    )
    # NFE from 3 to 100 with float32, bfloat16 and float16 inputs (float32 inside), every
    # grid ending with a step straight to x0 (lambda = inf); the zero-terminal-SNR cases
    # (alpha = 0 at the start) are rectified flow with an x0 network and a rescaled
    # discrete table with a v network (Lin et al. 2024). One compilation per case.
    cases = [
        (vp, 3, jnp.bfloat16, None, "default"),
        (vp, 10, jnp.float16, None, "default"),
        (vp, 100, jnp.float32, None, "default"),
        (jdiff.rectified_flow(), 5, jnp.float32, "x0", "uniform"),
        (zsnr, 30, jnp.bfloat16, "v", "uniform"),
    ]
    for proc, nfe, dtype, prediction, kind in cases:
        x, used = _run(make, proc, nfe, dtype, prediction=prediction, kind=kind)
        assert np.all(np.isfinite(x)), (name, proc.name, nfe, dtype)
        assert used <= nfe + 1, (name, nfe, used)


def test_unipc_bh1_final_step_to_zero_matches_x0():
    # diffusers' UniPC-bh1 returns NaN on a final step to sigma = 0; here it is the exact x0 jump
    vp = jdiff.vp_linear()
    den = MIX.denoiser(vp)
    grid = jdiff.time_grid(vp, 6, final="data")
    x_T = jdiff.prior_sample(vp, KEY, (8, 2))
    x, info = jdiff.sample(S.unipc(3, variant="bh1"), den, x_T, grid, return_info=True, trajectory=True)
    np.testing.assert_allclose(x, info.x0s[-1], rtol=1e-6, atol=1e-6)
