"""Samplers as optax-style ``(init, step)`` pairs. See :mod:`jdiff.solvers._base`."""

from jdiff.solvers._base import Solver, State, order_schedule
from jdiff.solvers._registry import get, names
from jdiff.solvers.dc_solver import dc_solver, fit_dc_ratios
from jdiff.solvers.ddim import ddim, ddpm
from jdiff.solvers.deis import deis
from jdiff.solvers.dpm_solver import dpm_solver, dpm_solver_pp, sde_dpm_solver_pp
from jdiff.solvers.dpm_solver_v3 import ModelStatistics, dpm_solver_v3, load_statistics, model_statistics
from jdiff.solvers.euler import euler, euler_maruyama, heun
from jdiff.solvers.ipndm import ipndm
from jdiff.solvers.unipc import unipc

__all__ = [
    "Solver",
    "State",
    "order_schedule",
    "get",
    "names",
    "dc_solver",
    "fit_dc_ratios",
    "ddim",
    "ddpm",
    "deis",
    "dpm_solver",
    "dpm_solver_pp",
    "sde_dpm_solver_pp",
    "dpm_solver_v3",
    "ModelStatistics",
    "model_statistics",
    "load_statistics",
    "euler",
    "euler_maruyama",
    "heun",
    "ipndm",
    "unipc",
]
