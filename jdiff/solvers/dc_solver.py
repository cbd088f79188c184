"""DC-Solver's dynamic compensation (Zhao et al., "DC-Solver: Improving Predictor-Corrector
Diffusion Sampler via Dynamic Compensation", ECCV 2024, Sec. 3.2-3.3).

In a multistep predictor-corrector sampler (UniPC) the model output ``m_i`` at step
``i`` is taken at the predicted ``x_i``, before the corrector moves it: the output and
the state it is used with are misaligned. Dynamic compensation replaces ``m_i`` by the
Lagrange interpolant of the last ``k`` outputs evaluated at a shifted log-SNR,

    m_i <- sum_j l_j(lambda_i + rho_i (lambda_i - lambda_{i-1})) m_{i-j},   j = 0..k-1,

with one ratio ``rho_i`` per step fit on a few trajectories so that the final samples
match a fine reference solve (:func:`fit_dc_ratios`, with optax). ``rho = 0`` gives the
base solver back exactly. The compensated output is what the history keeps, so both the
corrector and the next predictor use it. Ratios are fit for one grid length (and are
refused on another).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.solvers._base import (
    evaluate,
    grid_curves,
    history_lambdas,
    network_calls,
    row,
    settings_name,
    valid_history,
)
from jdiff.solvers._multistep import Multistep

__all__ = ["DCSolver", "dc_solver", "fit_dc_ratios"]


def _dc_weights(lam, ratios, K: int, H: int):
    """``(N, H)`` weights by ring slot of the compensated output at each step."""
    N = ratios.shape[0]

    def one(i):
        nodes = history_lambdas(lam, i, K)  # [lam_i, lam_{i-1}, ...]
        k = jnp.minimum(valid_history(nodes), K)
        prev = jnp.where(jnp.isfinite(nodes[1]), nodes[1], nodes[0] - 1.0)
        target = nodes[0] + ratios[i] * (nodes[0] - prev)
        active = jnp.arange(K) < k
        safe = jnp.where(active, nodes, nodes[0] - 1.0 - jnp.arange(K))
        w = []
        for j in range(K):
            num = jnp.ones((), lam.dtype)
            for m in range(K):
                if m != j:
                    f = (target - safe[m]) / (safe[j] - safe[m])
                    num = num * jnp.where(active[m], f, 1.0)
            w.append(jnp.where(active[j], num, 0.0))
        w = jnp.stack(w)
        w = jnp.where(k > 1, w, jnp.zeros_like(w).at[0].set(1.0))
        return jnp.zeros((H,), lam.dtype).at[(i - jnp.arange(K)) % H].add(w)

    return jax.vmap(one)(jnp.arange(N))


@dataclasses.dataclass(frozen=True)
class DCSolver(Multistep):
    """A :class:`~jdiff.solvers._multistep.Multistep` solver (UniPC) with DC-Solver's
    dynamic compensation: ``ratios`` (one per step, a tuple of floats) and the
    interpolation order ``dc_order``."""

    ratios: tuple = ()
    dc_order: int = 3

    padded_tables = False  # the ratios are for one grid length
    supports_adjoint = False  # the compensated outputs are not the ODE's

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("data", "noise"):
            raise ValueError("dynamic compensation needs a deterministic multistep solver")
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if not all(np.isfinite(self.ratios)):
            raise ValueError(f"ratios must be finite, got {self.ratios}")
        if self.dc_order not in (1, 2, 3, 4):
            raise ValueError(f"dc_order must be 1 to 4, got {self.dc_order!r}")

    def check_inputs(self, process, grid, x_T) -> None:
        n = np.shape(grid)[0] - 1
        if len(self.ratios) != n:
            raise ValueError(
                f"{self.name}: the compensation ratios were fit for {len(self.ratios)} steps; the grid has {n}"
            )

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        return self.init_with(x_T, grid, process, jnp.asarray(self.ratios, jnp.result_type(float)))

    def init_with(self, x_T, grid, process, ratios):
        """``init`` with the ratios given as an array (possibly traced: for fitting)."""
        state = Multistep.init(self, x_T, grid, process)
        H = state.hist.shape[0]
        lam = grid_curves(process, state.grid).lam
        w = _dc_weights(lam, jnp.asarray(ratios, state.grid.dtype), self.dc_order, H)
        return state._replace(aux=(state.aux, w))

    def step(self, denoiser, state, cond=None):
        x, i = state.x, state.i
        table, w = state.aux
        c = row(table, i)
        wi = w[i]
        pred = evaluate(denoiser, x, state.grid[i], cond)
        m = pred.eps if self.mode == "noise" else pred.x0
        dt = x.dtype
        H = state.hist.shape[0]
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, m.astype(state.hist.dtype), i % H, 0)
        comp = sum(wi[k].astype(dt) * hist[k] for k in range(H))
        hist = jax.lax.dynamic_update_index_in_dim(hist, comp.astype(hist.dtype), i % H, 0)
        x_next = c.cx.astype(dt) * x + c.cx0.astype(dt) * pred.x0
        for k in range(H):
            x_next = x_next + c.cm[k].astype(dt) * hist[k]
        return state._replace(
            x=x_next, i=i + 1, pred=pred, hist=hist, nfe=state.nfe + network_calls(denoiser, state.grid[i])
        )


def dc_solver(base: Multistep, ratios, *, dc_order: int = 3) -> DCSolver:
    """``base`` (a multistep solver such as ``unipc(2)``) with dynamic compensation.

    Args:
      base: a deterministic :class:`~jdiff.solvers._multistep.Multistep` solver.
      ratios: one compensation ratio per step (from :func:`fit_dc_ratios`; zeros give
        ``base`` back).
      dc_order: number of outputs in the compensating interpolant (1-4).

    Raises:
      TypeError: ``base`` is not a multistep solver. ValueError: a stochastic base,
      non-finite ratios or ``dc_order`` outside 1-4.
    """
    if not isinstance(base, Multistep) or isinstance(base, DCSolver):
        raise TypeError(f"dc_solver needs a multistep solver (unipc, dpm_solver_pp, deis), got {base!r}")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Multistep)}
    fields["name"] = settings_name(base.name + "-dc", dc_order=dc_order) if dc_order != 3 else base.name + "-dc"
    return DCSolver(**fields, ratios=tuple(ratios), dc_order=dc_order)


def fit_dc_ratios(
    base: Multistep,
    denoiser,
    x_T,
    grid,
    target,
    *,
    dc_order: int = 3,
    iterations: int = 200,
    learning_rate: float = 0.02,
):
    """Fit DC-Solver's per-step ratios (Zhao et al. 2024, Sec. 3.3): minimize the mean
    squared distance between the compensated sampler's result from ``x_T`` and
    ``target`` (the same noises solved finely, e.g. by a 100-step solver or the exact
    ODE) with Adam, from ``rho = 0``. A few trajectories suffice.

    Args:
      base: the multistep solver to compensate.
      denoiser: the model.
      x_T: ``(n, ...)`` starting noises; target: their reference results.
      grid: the time grid (the ratios are for its length).
      dc_order: interpolation order. iterations, learning_rate: Adam settings.

    Returns:
      ``dc_solver(base, ratios, dc_order=dc_order)`` with the fitted ratios.
    """
    import optax  # only for fitting: not loaded with every `import jdiff`

    probe = dc_solver(base, [0.0] * (np.shape(grid)[0] - 1), dc_order=dc_order)
    x_T = jnp.asarray(x_T)
    target = jnp.asarray(target, x_T.dtype)
    grid = jnp.asarray(grid, x_T.dtype)

    def loss(r):
        state = probe.init_with(x_T, grid, denoiser.process, r)
        state, _ = jax.lax.scan(lambda s, _: (probe.step(denoiser, s, None), None), state, None, length=r.shape[0])
        return jnp.mean((state.x - target) ** 2)

    opt = optax.adam(learning_rate)

    @jax.jit
    def fit(r):
        def body(carry, _):
            r, st = carry
            val, g = jax.value_and_grad(loss)(r)
            up, st = opt.update(g, st, r)
            return (optax.apply_updates(r, up), st), val

        (r, _), losses = jax.lax.scan(body, (r, opt.init(r)), None, length=iterations)
        return r, losses

    r, _ = fit(jnp.zeros((grid.shape[0] - 1,), x_T.dtype))
    return dc_solver(base, [float(v) for v in np.asarray(r)], dc_order=dc_order)
