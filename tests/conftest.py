"""Shared fixtures: scoped float64, the solver zoo and small exact testbeds."""

from __future__ import annotations

import jax
import pytest

from jdiff import solvers as S


@pytest.fixture(scope="module")
def x64():
    """Run a module's tests (and its module fixtures that request this) in float64."""
    with jax.enable_x64(True):
        yield


# Solvers that are proven identical to another one by tests/test_solvers.py (to 1e-6 or
# 1e-10) and so need no separate convergence run.
EQUIVALENT = {
    "euler(rho)",
    "dpm_solver-1",
    "dpm_solver++(1)",
    "deis-1",
    "unip-1",
    "unip-2",
    "unip-3",
    "deis-3(log_rho)",
    "ipndm_v-3",
}


def deterministic_zoo():
    """name -> (solver, order of convergence it must show on smooth problems)."""
    return {
        "ddim": (S.ddim(), 1),
        "euler(t)": (S.euler(), 1),
        "euler(rho)": (S.euler("rho"), 1),
        "heun(t)": (S.heun(), 2),
        "heun(rho)": (S.heun("rho"), 2),
        "dpm_solver-1": (S.dpm_solver(1), 1),
        "dpm_solver-2": (S.dpm_solver(2), 2),
        "dpm_solver-3": (S.dpm_solver(3), 3),
        "dpm_solver-2M": (S.dpm_solver(2, method="multistep"), 2),
        "dpm_solver-3M": (S.dpm_solver(3, method="multistep"), 3),
        "dpm_solver++(1)": (S.dpm_solver_pp(1), 1),
        "dpm_solver++(2S)": (S.dpm_solver_pp(2, method="singlestep"), 2),
        "dpm_solver++(3S)": (S.dpm_solver_pp(3, method="singlestep"), 3),
        "dpm_solver++(2M)": (S.dpm_solver_pp(2), 2),
        "dpm_solver++(2M,heun)": (S.dpm_solver_pp(2, solver_type="heun"), 2),
        "dpm_solver++(3M)": (S.dpm_solver_pp(3), 3),
        "deis-1": (S.deis(1), 1),
        "deis-2(t)": (S.deis(2), 2),
        "deis-3(t)": (S.deis(3), 3),
        "deis-3(rho)": (S.deis(3, basis="rho"), 3),
        "deis-3(log_rho)": (S.deis(3, basis="log_rho"), 3),
        "unip-1": (S.unipc(1, corrector=False), 1),
        "unip-2": (S.unipc(2, corrector=False), 2),
        "unip-3": (S.unipc(3, corrector=False), 3),
        "unipc-1(bh1)": (S.unipc(1, variant="bh1"), 2),
        "unipc-2(bh1)": (S.unipc(2, variant="bh1"), 3),
        "unipc-1(bh2)": (S.unipc(1), 2),
        "unipc-2(bh2)": (S.unipc(2), 3),
        "unipc-3(bh2)": (S.unipc(3), 4),
        "ipndm-2": (S.ipndm(2), 2),
        "ipndm-3": (S.ipndm(3), 2),  # fixed-step coefficients: order 2 on graded grids
        "ipndm-4": (S.ipndm(4), 2),
        "ipndm_v-3": (S.ipndm(3, variable_step=True), 3),
        "ipndm_v-4": (S.ipndm(4, variable_step=True), 4),
    }


def stochastic_zoo():
    return {
        "ddim(eta=0.5)": S.ddim(eta=0.5),
        "ddpm": S.ddpm(),
        "sde_dpm_solver++(1)": S.sde_dpm_solver_pp(1),
        "sde_dpm_solver++(2M)": S.sde_dpm_solver_pp(2),
        "euler_maruyama": S.euler_maruyama(),
    }
