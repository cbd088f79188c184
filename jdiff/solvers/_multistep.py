"""The multistep engine behind DPM-Solver(++) multistep, SDE-DPM-Solver++, DEIS and UniPC.

One model call per step. The step evaluates the model at ``(x_i, t_i)``, optionally
corrects ``x_i`` with UniPC's UniC corrector using that new output (no extra call),
pushes the output into the history and takes an exponential-integrator predictor step
whose polynomial goes through up to ``order`` most recent outputs.

Warm-up is data, not Python control flow: the effective order is
``min(order, usable history)``, with history entries at infinite log-SNR (a start at
zero terminal SNR) not usable, and ``lower_order_final`` lowers the order on the last
steps of short grids (fewer than 15 steps), as in diffusers, and on longer grids makes the
last step first order when it is more than 1.5x as long in log-SNR as the one before
(:func:`jdiff.solvers._base.multistep_order`; data prediction only). Since the history's
log-SNRs are the grid's, every coefficient is computed in ``init`` for all steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff._core import ei_coefficients
from jdiff.solvers._base import (
    LONG_STEP_RATIO,
    Solver,
    check_key,
    empty_state,
    evaluate,
    geometry_at,
    grid_curves,
    history_lambdas,
    multistep_order,
    network_calls,
    row,
    step_noise,
    steps_of,
)

__all__ = ["Multistep", "multistep"]


class _Table(NamedTuple):
    """One step as ``x_{i+1} = cx x_i + sum_slot cm[slot] hist[slot] + cx0 x0`` after
    ``m_i`` is written to its ring-buffer slot (``m_{i-j}`` lives in slot ``(i-j) % H``),
    with UniPC's corrector folded in."""

    cx: jax.Array
    cm: jax.Array  # (H,) by ring-buffer slot
    cx0: jax.Array
    noise: jax.Array  # SDE noise scale
    order: jax.Array  # effective predictor order


def _check_order(order, allowed, name):
    if order not in allowed:
        raise ValueError(f"{name} supports order in {tuple(allowed)}, got {order!r}")


@dataclasses.dataclass(frozen=True)
class Multistep(Solver):
    """A multistep exponential-integrator solver (one model call per step).

    Attributes:
      order: polynomial order of the predictor (1 to ``max_order``).
      mode: ``"data"`` (x0 prediction), ``"noise"`` (eps prediction) or ``"sde_data"``
        (SDE-DPM-Solver++; stochastic).
      coef: coefficient variant for the predictor (``"exact"``, ``"bh1"``, ``"bh2"``).
      corrector: None, or the coefficient variant of a UniC corrector.
      lower_order_final: lower the order on the last steps of grids shorter than 15 and,
        on longer grids, on a last step more than 1.5x as long in log-SNR as the one before
        (data prediction without ``weights`` only; :func:`jdiff.solvers._base.multistep_order`).
      weights: None, or a hashable ``(process, geometry, lam_nodes, q) -> w`` replacing
        the closed-form node weights (tAB-DEIS: a module-level function or a frozen
        dataclass, so that equal settings stay equal).
      half_second: the predictor's two-node (third-order) steps put half the exact
        weight on the second difference, as the reference implementation of
        DPM-Solver(++)(3M) and diffusers do (locally ``O(h^3)``, globally second order;
        see :mod:`jdiff._core`).
      name: the registry name (set by the family's factory).
      max_order: the largest order the family supports.
      min_steps: the fewest grid intervals accepted.
    """

    order: int
    mode: str
    coef: str = "exact"
    corrector: str | None = None
    lower_order_final: bool = True
    weights: Callable | None = None
    half_second: bool = False
    name: str = "multistep"
    max_order: int = 3
    min_steps: int = 1

    padded_tables = True  # row i reads grid points 0..i+1 and steps_of(grid) only

    def __post_init__(self):
        _check_order(self.order, range(1, self.max_order + 1), self.name)
        if self.mode not in ("data", "noise", "sde_data"):
            raise ValueError(f"unknown multistep mode {self.mode!r}")

    @property
    def supports_adjoint(self) -> bool:
        return self.mode in ("data", "noise")  # not the SDE solver

    @property
    def stochastic(self) -> bool:
        return self.mode == "sde_data"

    def _coefs(self, process, g, lam_nodes, q, variant, custom=False, half_second=False):
        if lam_nodes.shape[0] == 0:
            return ei_coefficients(g, mode=self.mode, K=0)
        # a node before the grid start has lambda = -inf (inactive): keep its r out of
        # the derivative, or d r / d h = -r / h would give 0 * inf = NaN
        ok = jnp.isfinite(lam_nodes)
        r = jnp.where(ok, (jnp.where(ok, lam_nodes, g.lam_s) - g.lam_s) / g.h_safe, -jnp.inf)
        if custom:
            return ei_coefficients(g, r, q, mode=self.mode, w=self.weights(process, g, lam_nodes, q))
        return ei_coefficients(g, r, q, mode=self.mode, coef=variant, half_second=half_second)

    def table(self, process, grid) -> _Table:
        order, K, corrector = self.order, self.order, self.corrector
        use_corr = corrector is not None
        N = grid.shape[0] - 1  # rows (the grid may be padded past its true length)
        num_steps = steps_of(grid)
        gc = grid_curves(process, grid)

        # the long-step rule is for data-prediction polynomials in log-SNR: DEIS (quadrature
        # in t or rho, or noise prediction in log-rho) extrapolates the long last step of a
        # uniform grid well and got worse with it (benchmarks/long_steps.py)
        long_ratio = LONG_STEP_RATIO if self.weights is None and self.mode != "noise" else None

        def order_at(i):
            return multistep_order(gc.lam, i, order, num_steps, self.lower_order_final, long_ratio)

        def one(i):
            g = geometry_at(gc.steps, i)
            p = order_at(i)
            nodes = history_lambdas(gc.lam, i, K)[1:]
            pred = self._coefs(
                process, g, nodes, p - 1, self.coef, custom=self.weights is not None, half_second=self.half_second
            )
            noise = g.sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * jnp.where(g.finite, g.h, jnp.inf)))
            if use_corr:
                ip = jnp.maximum(i - 1, 0)
                gp = geometry_at(gc.steps, ip)
                old = history_lambdas(gc.lam, ip, K)[1:]
                nodes = jnp.concatenate([jnp.reshape(gc.lam[i], (1,)), old])
                corr = self._coefs(process, gp, nodes, order_at(ip), corrector)
                # entries [m_{i-1}, m_i (new), m_{i-2}, ..., m_{i-K}]
                corr_old = jnp.concatenate([corr.cm[:1], corr.cm[2:]])
                corr_new = corr.cm[1]
                corr_on = (i > 0) & gp.finite
            else:
                corr_old, corr_new, corr_on = jnp.zeros((K,), g.h.dtype), jnp.zeros((), g.h.dtype), False
            return pred, corr_old, corr_new, corr_on, noise, p

        pred, corr_old, corr_new, corr_on, noise, p = jax.vmap(one)(jnp.arange(N))
        cm = pred.cm  # on [m_i, ..., m_{i-K+1}]
        if use_corr:
            # UniC redoes step i-1 with the same x_{i-1} coefficient the predictor used, so
            # corrected x_i = x_i + corr_new m_i + sum_j (corr_j - pred_{i-1, j}) m_{i-1-j};
            # folding that into this step's predictor keeps x_{i-1} out of the scan carry.
            prev = jnp.concatenate([jnp.zeros_like(pred.cm[:1]), pred.cm[:-1]], axis=0)
            delta = jnp.where(corr_on[:, None], corr_old - prev, 0.0)  # on [m_{i-1}, ..., m_{i-K}]
            corr = jnp.concatenate([jnp.where(corr_on, corr_new, 0.0)[:, None], delta], axis=1)
            cm = jnp.concatenate([cm, jnp.zeros_like(cm[:, :1])], axis=1) + pred.cx[:, None] * corr
        # from "j steps back" to ring-buffer slots (i - j) % H
        H = cm.shape[1]
        idx = jnp.arange(N)
        slots = (idx[:, None] - jnp.arange(H)[None, :]) % H
        cm = jnp.zeros_like(cm).at[idx[:, None], slots].set(cm)
        return _Table(pred.cx, cm, pred.cx0, noise, p)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        del nfe
        check_key(self, key)
        # UniC's oldest node m_{i-K} must survive the push: one more slot
        hist_size = self.order + int(self.corrector is not None)
        state = empty_state(x_T, grid, hist_size=hist_size, key=key if self.stochastic else None, process=process)
        return state._replace(aux=self.table(process, state.grid))

    def transition(self, denoiser, state, cond=None):
        """The step as a Gaussian ``x_next ~ N(mean, std^2 I)``: returns ``(state, std)``
        with ``state.x`` the mean (the exponential-integrator update) and ``std`` the SDE
        noise scale ``sigma_t sqrt(1 - e^{-2h})`` (0 for the deterministic modes).
        :meth:`step` adds ``std * z`` to that mean."""
        new = self._mean_step(denoiser, state, cond)
        c = row(state.aux, state.i)
        std = c.noise if self.stochastic else jnp.zeros_like(c.noise)
        return new, std.astype(state.x.dtype)

    def step(self, denoiser, state, cond=None):
        new = self._mean_step(denoiser, state, cond)
        if self.stochastic:
            c = row(state.aux, state.i)
            new = new._replace(x=new.x + c.noise.astype(state.x.dtype) * step_noise(state))
        return new

    def _mean_step(self, denoiser, state, cond):
        x, i = state.x, state.i
        c = row(state.aux, i)
        pred = evaluate(denoiser, x, state.grid[i], cond)
        m = pred.eps if self.mode == "noise" else pred.x0
        dt = x.dtype
        # write first, then read only the updated buffer: XLA then updates it in place
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, m.astype(state.hist.dtype), i % state.hist.shape[0], 0)
        x_next = c.cx.astype(dt) * x + c.cx0.astype(dt) * pred.x0
        for k in range(hist.shape[0]):
            x_next = x_next + c.cm[k].astype(dt) * hist[k]
        return state._replace(
            x=x_next, i=i + 1, pred=pred, hist=hist, nfe=state.nfe + network_calls(denoiser, state.grid[i])
        )


def multistep(
    order: int,
    *,
    mode: str,
    coef: str = "exact",
    corrector: str | None = None,
    lower_order_final: bool = True,
    weights=None,
    half_second: bool = False,
    name: str = "multistep",
    max_order: int = 3,
    min_steps: int = 1,
) -> Multistep:
    """Build a :class:`Multistep` solver (see its attributes)."""
    return Multistep(
        order=order,
        mode=mode,
        coef=coef,
        corrector=corrector,
        lower_order_final=lower_order_final,
        weights=weights,
        half_second=half_second,
        name=name,
        max_order=max_order,
        min_steps=min_steps,
    )
