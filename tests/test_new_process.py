"""A new process is one class in one file: capabilities are attributes of the process
(``default_grid``, ``discrete``, ``default_time_input``), so the grid, the denoiser, the
samplers and the training loss need no edit to use it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff import train as T
from jdiff.testbed import GaussianMixture

pytestmark = pytest.mark.usefixtures("x64")


@dataclasses.dataclass(frozen=True, repr=False)
class TrigFlow(jdiff.Process):
    """``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``: defined here and nowhere else."""

    t_min: float = 1e-3
    t_max: float = 0.999
    t_data: float | None = 0.0
    name: str = "trig_flow"

    default_grid = "quadratic"  # no built-in process defaults to it
    discrete = False
    default_time_input = "t"

    def log_alpha(self, t):
        return jnp.log(jnp.cos(0.5 * jnp.pi * jnp.asarray(t)))

    def log_sigma(self, t):
        return jnp.log(jnp.sin(0.5 * jnp.pi * jnp.asarray(t)))

    def t_of_lambda(self, lam):
        # cot(pi t / 2) = e^lam
        return 2.0 / jnp.pi * jnp.arctan(jnp.exp(-jnp.asarray(lam)))


jax.tree_util.register_dataclass(TrigFlow, data_fields=[], meta_fields=["t_min", "t_max", "t_data", "name"])

MU, STD = np.array([0.7, -1.2]), np.array([0.4, 0.9])


def _exact_flow(proc, x_T, t_end):
    """The probability-flow ODE of one Gaussian N(MU, STD^2) is affine (see test_testbed)."""
    aT, sT = proc.alpha(proc.t_max), proc.sigma(proc.t_max)
    at, st = proc.alpha(t_end), proc.sigma(t_end)
    return at * MU + jnp.sqrt(at**2 * STD**2 + st**2) / jnp.sqrt(aT**2 * STD**2 + sT**2) * (x_T - aT * MU)


def test_samples_with_its_own_default_grid():
    proc = TrigFlow()
    assert jdiff.default_grid_kind(proc) == "quadratic"
    den = GaussianMixture([1.0], [MU], [STD]).denoiser(proc)
    x_T = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
    errs = []
    for nfe in (20, 40):
        x, info = jdiff.sample(S.heun(), den, x_T, nfe=nfe, return_info=True)
        want_grid = np.asarray(jdiff.time_grid(proc, nfe // 2, kind="quadratic"), info.grid.dtype)
        np.testing.assert_array_equal(info.grid, want_grid)  # the process's own default kind
        assert int(info.nfe) == nfe
        errs.append(float(jnp.max(jnp.abs(x - _exact_flow(proc, x_T, proc.t_min)))))
    # Heun is second order: doubling the steps divides the error by about 4 (3 leaves
    # room for the pre-asymptotic regime); float64 rounding (~1e-15) is far below
    assert errs[1] < errs[0] / 3, errs
    assert errs[1] < 1e-2, errs


def test_trains_with_the_library_loss():
    proc = TrigFlow()
    c = jnp.asarray([0.5, -0.25])

    # a perfect eps predictor for data at the point c: its loss is 0 only if the loss
    # noises with this process's alpha and sigma
    def perfect(params, x, t, cond, key=None):
        a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
        return (x - a * c) / s

    cfg = T.LossConfig(process=proc, prediction="eps")
    batch = {"x": jnp.broadcast_to(c, (64, 2))}
    loss, _ = jax.jit(T.make_loss_fn(perfect, cfg))(None, batch, jax.random.key(1))
    # float64 rounding of (x - a c) / s with s >= sin(pi t_min / 2) ~ 1.6e-3: relative
    # error ~ 1e-16 / 1.6e-3 per entry, squared in the loss
    assert float(loss) < 1e-20

    # a linear eps model trained a few steps by gradient descent gets better
    def linear(params, x, t, cond, key=None):
        return x @ params["w"] + params["b"] + t[:, None] * params["u"]

    loss_fn = jax.jit(T.make_loss_fn(linear, cfg))
    grad_fn = jax.jit(jax.grad(lambda p, k: loss_fn(p, batch, k)[0]))
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2), "u": jnp.zeros(2)}
    eval_key = jax.random.key(2)  # a fixed evaluation batch of times and noises
    before = float(loss_fn(params, batch, eval_key)[0])
    for i in range(30):
        g = grad_fn(params, jax.random.key(10 + i))
        params = jax.tree.map(lambda p, d: p - 0.3 * d, params, g)
    after = float(loss_fn(params, batch, eval_key)[0])
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
