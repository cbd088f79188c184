"""Gradient strategies own their loop and checks (issue 22, point 4): ``sample`` runs a
strategy it has never heard of, and Adjoint support is a solver attribute."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff._adjoint import check_adjoint
from jdiff._gradient import GradientStrategy, Run, scan_steps

PROC = jdiff.vp_linear()
DEN = jdiff.denoiser(lambda x, t, c: jnp.tanh(x), PROC, "eps")
X = jax.random.normal(jax.random.key(0), (3, 2))
GRID = jdiff.time_grid(PROC, 4)


@dataclasses.dataclass(frozen=True)
class HalfGradient(GradientStrategy):
    """A strategy defined outside jdiff: the forward pass of Backprop, half its gradient,
    and at most ``max_steps`` grid intervals."""

    max_steps: int = 10

    def check(self, solver, denoiser, num_steps, *, trajectory=False, denoise_to_zero=False):
        if num_steps > self.max_steps:
            raise ValueError(f"HalfGradient: at most {self.max_steps} steps")

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory=False):
        x = 0.5 * x + jax.lax.stop_gradient(0.5 * x)  # same value, half the cotangent
        state = solver.init(x, grid, denoiser.process, key=key, nfe=nfe)
        state, traj = scan_steps(solver, state, grid.shape[0] - 1, denoiser, cond, trajectory=trajectory)
        return Run(state.x, state.nfe, state.grid, traj)


def test_sample_runs_a_strategy_it_does_not_know():
    solver = S.get("dpm++2m")
    a, info = jdiff.sample(solver, DEN, X, GRID, gradient=HalfGradient(), return_info=True)
    np.testing.assert_array_equal(a, jdiff.sample(solver, DEN, X, GRID))
    assert int(info.nfe) == 4

    def loss(x, g):
        return jnp.sum(jdiff.sample(solver, DEN, x, GRID, gradient=g) ** 2)

    np.testing.assert_array_equal(
        jax.grad(loss)(X, HalfGradient()), 0.5 * jax.grad(loss)(X, jdiff.Backprop())
    )  # a halving is exact in binary floating point
    with pytest.raises(ValueError, match="at most 2 steps"):
        jdiff.sample(solver, DEN, X, GRID, gradient=HalfGradient(2))
    with pytest.raises(TypeError, match="gradient strategy"):
        jdiff.sample(solver, DEN, X, GRID, gradient="adjoint")


def test_adjoint_support_is_a_solver_attribute():
    @dataclasses.dataclass(frozen=True)
    class MyDDIM(type(S.ddim())):  # a new solver opts in by its attribute alone
        @property
        def name(self):
            return "my-ddim"

    with pytest.raises(ValueError, match="my-ddim"):
        check_adjoint(jdiff.Adjoint(), dataclasses.replace(MyDDIM(), eta=0.5))  # DDIM's rule: eta = 0 only
    check_adjoint(jdiff.Adjoint(), MyDDIM())
    supported = {n for n in S.names() if S.get(n).supports_adjoint}
    assert {"ddim", "euler", "heun-rho", "dpm++3s", "dpm2m", "deis3-rho", "unipc3-bh1", "ipndm4-v"} <= supported
    assert not {"ddpm", "euler-maruyama", "sde-dpm++2m"} & supported
    assert not S.ipndm(4, afs=True).supports_adjoint
