"""Finite results for every solver family across NFE, input dtypes, the final step to
t = 0 (infinite log-SNR) and zero-terminal-SNR processes (alpha = 0 at t_max); with
bfloat16 inputs, also close to the float32 result from the same x_T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import random_mixture

# One family per distinct code path (step and coefficient tables). Variants left out run
# the same code with another setting that a kept family already exercises: Euler in rho is
# Heun(rho)'s predictor; Heun in t is Euler(t) plus the trapezoid corrector that Heun(rho)
# runs; DPM-Solver++(2M) is DPM-Solver++(3M)'s warm-up and lower-order-final steps (orders
# 1, 2 at these NFEs); DEIS in rho differs from DEIS in t only in the basis variable; UniP is
# UniPC without the corrector; DDIM(eta) is the DDPM code at another eta. Every variant is
# checked against closed forms and for convergence in float64 in test_solvers.py.
FAMILIES = {
    "ddim": lambda k: S.ddim(),
    "euler(t)": lambda k: S.euler(),
    "heun(rho)": lambda k: S.heun("rho"),
    "dpm_solver-3": lambda k: S.dpm_solver(3),
    "dpm_solver-3M": lambda k: S.dpm_solver(3, method="multistep"),
    "dpm_solver++(2S)": lambda k: S.dpm_solver_pp(2, method="singlestep"),
    "dpm_solver++(3M)": lambda k: S.dpm_solver_pp(3),
    "deis-3(t)": lambda k: S.deis(3),
    "unipc-3(bh1)": lambda k: S.unipc(3, variant="bh1"),
    "unipc-2(bh2)": lambda k: S.unipc(2),
    "ipndm": lambda k: S.ipndm(min(4, k)),
    "ipndm_v": lambda k: S.ipndm(min(4, k), variable_step=True),
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
    # the same x_T, grid and noise with a float32 network input
    ref = None if dtype == jnp.float32 else jdiff.sample(solver, den, x_T.astype(jnp.float32), grid, key=KEY)
    return np.asarray(x.astype(jnp.float32)), int(info.nfe), ref


# Closeness to float32. The solver state is float32 in both runs, so they differ only by
# the rounding of the network's input to the low dtype (relative eps/2 at each of the
# n model calls) and of the result (eps/2). Errors add over the calls, each amplified by
# the step's sensitivity to its model input: at most 16 here (the eps-parameterized
# steps of a 3-call grid multiply an input error by sigma/alpha ratios of the first
# coarse step; up to about 8 seen over the families). Hence, per sample,
#     |x_low - x_f32| <= (16 n + 1) eps/2 max(1, |x|)   -- about 0.1 for bfloat16 at n = 3.
# The median over the 16 samples is compared: a sample near the boundary between the
# sharp modes may legitimately flow to the other mode.
SENSITIVITY = 16


def _close_to_float32(x, ref, used, dtype):
    ref = np.asarray(ref, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    tol = (SENSITIVITY * used + 1) * eps / 2 * max(1.0, float(np.max(np.abs(ref))))
    err = float(np.median(np.max(np.abs(x - ref), axis=1)))
    return err <= tol, err, tol


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finite_over_nfe_dtypes_and_endpoints(name):
    make = FAMILIES[name]
    vp = jdiff.vp_linear()
    zsnr = jdiff.vp_discrete(
        jdiff.rescale_zero_terminal_snr(jdiff.ddpm_betas("scaled_linear", beta_start=0.00085, beta_end=0.012))
    )
    # NFE from 3 to 100 with float32 and bfloat16 inputs (float32 inside), every
    # grid ending with a step straight to x0 (lambda = inf); the zero-terminal-SNR cases
    # (alpha = 0 at the start) are rectified flow with an x0 network and a rescaled
    # discrete table with a v network (Lin et al. 2024). One compilation per case, plus
    # the float32 reference of each low-precision case (the discrete table's programs
    # compile about 4x slower than the others, so its case runs in float32 only). float16
    # inputs run for one family only: the cast of the network input is the same code for
    # every solver, and with the state in float32 and |x| of order 1 (VP) they only round
    # less than bfloat16 (10 mantissa bits against 7).
    cases = [
        (vp, 3, jnp.bfloat16, None, "default"),
        (vp, 100, jnp.float32, None, "default"),
        (jdiff.rectified_flow(), 5, jnp.float32, "x0", "uniform"),
        (zsnr, 30, jnp.float32, "v", "uniform"),
    ]
    if name == "ddim":
        cases.append((vp, 10, jnp.float16, None, "default"))
    for proc, nfe, dtype, prediction, kind in cases:
        x, used, ref = _run(make, proc, nfe, dtype, prediction=prediction, kind=kind)
        assert np.all(np.isfinite(x)), (name, proc.name, nfe, dtype)
        assert used <= nfe + 1, (name, nfe, used)
        if ref is not None:
            ok, err, tol = _close_to_float32(x, ref, used, dtype)
            assert ok, f"{name} {proc.name} NFE {used} {dtype.__name__}: median error {err:.3g} > {tol:.3g}"


def test_unipc_bh1_final_step_to_zero_matches_x0():
    # diffusers' UniPC-bh1 returns NaN on a final step to sigma = 0; here it is the exact x0 jump
    vp = jdiff.vp_linear()
    den = MIX.denoiser(vp)
    grid = jdiff.time_grid(vp, 6, final="data")
    x_T = jdiff.prior_sample(vp, KEY, (8, 2))
    x, info = jdiff.sample(S.unipc(3, variant="bh1"), den, x_T, grid, return_info=True, trajectory=True)
    # the last step is x = x0 prediction exactly (sigma_t = 0): a handful of float32
    # roundings of values of order 1
    eps = float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(x, info.x0s[-1], rtol=8 * eps, atol=8 * eps)
