r"""The ``Adjoint`` gradient strategy: gradients through a sampler in memory that does
not grow with the number of steps.

The forward pass runs the solver exactly as :func:`jdiff.sample` does and keeps only
``x_T``, the last two states ``x_{N-1}, x_N``, the grid, the solver's coefficient
tables (``O(N)`` numbers), the conditioning and the denoiser's arrays. The backward
pass (a ``jax.custom_vjp``) walks the grid from ``t_N`` back to ``t_0`` in one
``lax.scan`` whose carry holds a few arrays of the size of ``x`` (the adjoint, the
adjoint of the solver's history buffer, ``order`` model outputs) and the parameter and
conditioning gradients.

**The adjoint equation.** With ``lambda = log(alpha / sigma)`` the probability-flow
ODE is, in data-prediction form (``y = x / sigma``) and noise-prediction form
(``z = x / alpha``),

    dy/dlambda = e^{lambda} x0_hat(x, lambda),        dz/dlambda = -e^{-lambda} eps_hat(x, lambda).

The adjoint ``a = dL/dx(lambda)`` of the data form obeys the linear ODE
``d(sigma a)/dlambda = -alpha sigma J^T a`` (``J = d x0_hat / dx``), whose linear part
integrates exactly:

    a_s = (sigma_t / sigma_s) a_t + (1 / sigma_s) \int_{lambda_s}^{lambda_t} alpha sigma J^T a dlambda,

and the parameters and conditioning collect ``\int alpha (d x0_hat / d theta)^T a
dlambda``; the noise form gives ``alpha_s a_s = alpha_t a_t - \int alpha sigma J_eps^T a``
likewise (AdjointDPM, Pan et al., "AdjointDPM: Adjoint Sensitivity Method for Gradient
Backpropagation of Diffusion Probabilistic Models", ICLR 2024; AdjointDEIS, Blasingame
& Liu, "AdjointDEIS: Efficient Gradients for Diffusion Models", NeurIPS 2024, which
writes these exact-solution forms). What remains is an integral of an exponential
kernel times a vector-Jacobian product of the model, to be approximated from VJPs at
the grid points as the forward solvers approximate ``\int e^{lambda} x0_hat``.

**The discretization used here.** The transpose of the forward solver's own step is
such an exponential-integrator step of the adjoint equation. For DDIM,
``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0_hat(x_s)`` transposes to
``a_s = (sigma_t/sigma_s) a_t + alpha_t (1 - e^{-h}) J(x_s)^T a_t``: the exact linear
part and the first-order rule for the integral; a multistep solver gives the
Adams-type rule over the same nodes, through the adjoint of its history buffer. So each
backward step is the vector-Jacobian product of ``solver.step`` (one model VJP per
model call of the step), with the history's adjoint carried as backprop carries it;
the step is linear in the history, so its transpose needs none of the earlier
outputs' values. Where backprop stores ``x_s``, the adjoint *reconstructs* it from
``x_{s+1}`` by integrating the ODE backward in time with DPM-Solver++ multistep
(Lu et al., 2022) of order ``min(order, 3)`` on the reversed grid, the model outputs
at the points already reconstructed serving as its nodes (``k`` substeps per step for
a solver that makes ``k`` model calls per step, so that the reconstruction is as fine
as the forward pass). The first step is linearized at the true ``x_T`` and the last at
the stored ``x_{N-1}``, so a step that starts at zero terminal SNR (``alpha = 0``) or
ends at the data (``sigma = 0``) is differentiated exactly, and with two steps or
fewer the result is backprop's. Otherwise the gradient differs from backprop's by the
effect of the reconstruction error, and its distance to the exact gradient falls at
the forward solver's order.

Why not integrate the continuous adjoint with a scheme of its own (optimize, then
discretize)? That was tried first: on the Gaussian-mixture testbed at NFE 20 with
DPM-Solver++(2M), such a second-order multistep adjoint was 0.16 (relative) from
backprop's gradient for ``x_T`` and 0.14 from the exact one in data form (0.03 and 0.05
in noise form), against 0.035 and 0.012 for the transposed steps, which are closer to
the exact gradient than backprop itself there (0.032); and the transposed steps need
no special case for any solver's first or last step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._core import ei_weights, phi
from jdiff._gradient import GradientStrategy, Run
from jdiff.solvers._base import evaluate, network_calls

__all__ = ["Adjoint", "check_adjoint", "adjoint_sample"]


_SUPPORTED = (
    "DDIM (eta = 0), Euler and Heun (time 't' or 'rho'), DPM-Solver and DPM-Solver++ "
    "(singlestep and multistep), DEIS, UniPC (with or without UniC), iPNDM and iPNDM-v"
)


@dataclasses.dataclass(frozen=True)
class Adjoint(GradientStrategy):
    """Gradient by the adjoint of the sampler, in memory independent of the number of steps.

    The forward pass keeps only the last two states; the backward pass reconstructs the
    trajectory backward in time and transposes the solver's step at each reconstructed
    state (see :mod:`jdiff._adjoint` for the equations and AdjointDPM, Pan et al.,
    ICLR 2024; AdjointDEIS, Blasingame & Liu, NeurIPS 2024). Gradients with respect to
    ``x_T``, the conditioning and the parameters approach backprop's as the steps
    shrink, at the solver's order; the grid gets the exact flow map's end-time
    gradients (see :func:`adjoint_sample`).

    Supports the deterministic solvers that declare ``supports_adjoint`` (a solver
    attribute): DDIM (``eta = 0``), Euler and Heun, DPM-Solver and DPM-Solver++
    (singlestep and multistep), DEIS, UniPC and iPNDM. Stochastic solvers, the others,
    the guidance options that step along another path (CFG++, guidance memory), a
    denoiser whose network calls vary with t and ``trajectory=True`` raise
    ``ValueError`` (:meth:`check`).

    Attributes:
      order: order of the backward reconstruction (DPM-Solver++ multistep), 1, 2 or 3;
        ``None`` uses the solver's order (plus one with a UniC corrector), at most 3.

    Raises:
      ValueError: ``order`` not None, 1, 2 or 3.
    """

    order: int | None = None

    def __post_init__(self):
        if self.order is not None and (isinstance(self.order, bool) or self.order not in (1, 2, 3)):
            raise ValueError(f"Adjoint(order=...) must be 1, 2, 3 or None, got {self.order!r}")

    def resolve_order(self, solver) -> int:
        """The reconstruction order used with ``solver``."""
        if self.order is not None:
            return self.order
        o = int(getattr(solver, "order", 1))
        if getattr(solver, "corrector", None) is not None:
            o += 1
        return max(1, min(o, 3))

    def check(self, solver, denoiser, num_steps, *, trajectory=False, denoise_to_zero=False):
        """Raise ``ValueError`` unless this strategy supports ``solver``, ``denoiser`` and
        the options (see the class docstring); called before anything runs."""
        if solver.stochastic:
            raise ValueError(
                f"Adjoint() integrates the probability-flow ODE backward; {solver.name} is stochastic: "
                "use Backprop(), Remat() or Truncated(k), or a deterministic solver"
            )
        check_adjoint(self, solver, trajectory=trajectory, denoise_to_zero=denoise_to_zero)
        if getattr(solver, "cfgpp", False) or getattr(solver, "guidance_memory", False):
            raise ValueError(
                f"Adjoint() reconstructs the denoiser's probability-flow ODE backward; {solver.name} steps "
                "along another path (CFG++ / guidance memory): use Backprop() or Remat()"
            )
        if getattr(denoiser, "calls", None) is not None and getattr(denoiser, "fixed_calls", None) is None:
            raise ValueError(
                "Adjoint() cannot count the network calls of a denoiser whose calls vary with t "
                "(a guidance interval): use Backprop() or Remat()"
            )

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory=False) -> Run:
        del key, trajectory  # deterministic solvers only; no trajectory (check)
        grid = grid.astype(x.dtype)
        out = adjoint_sample(self, solver, denoiser, x, grid, cond, nfe=nfe)
        count = _forward_nfe(solver, denoiser.process, grid, nfe) * network_calls(denoiser, grid[0])
        return Run(out, count, grid)


def _forward_nfe(solver, process, grid, nfe):
    """Model calls of a forward pass of ``solver`` over ``grid`` (possibly traced), from
    ``solver.nfe`` and whether the grid starts at alpha = 0 or ends at sigma = 0; for a
    solver whose ``init`` spends an NFE target exactly (``init_uses_nfe``: singlestep),
    the target."""
    N = grid.shape[0] - 1
    if solver.init_uses_nfe and nfe is not None:
        return jnp.asarray(nfe, jnp.int32)
    lam = process.lambda_(jnp.stack([grid[0], grid[-1]]))
    from_noise, to_data = lam[0] == -jnp.inf, lam[1] == jnp.inf
    table = jnp.asarray([[solver.nfe(N, a, b) for b in (False, True)] for a in (False, True)], jnp.int32)
    return table[to_data.astype(jnp.int32), from_noise.astype(jnp.int32)]


def check_adjoint(strategy, solver, *, trajectory: bool = False, denoise_to_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``strategy`` (an :class:`Adjoint`) supports ``solver``.

    Called before anything runs.

    Args:
      strategy: the :class:`Adjoint` strategy.
      solver: the :class:`~jdiff.solvers.Solver` of the sample call.
      trajectory: whether the trajectory is recorded (not supported: the adjoint keeps
        no trajectory; use ``Backprop()`` or ``Remat()``).
      denoise_to_zero: accepted: the final model call happens after the solver, outside
        the adjoint, and is differentiated exactly.

    Raises:
      ValueError: a stochastic solver (the backward pass would need the forward
        noise and a reverse-time SDE), a solver whose ``supports_adjoint`` is False, or
        ``trajectory=True``.
      TypeError: ``strategy`` is not an :class:`Adjoint`.
    """
    del denoise_to_zero
    if not isinstance(strategy, Adjoint):
        raise TypeError(f"expected an Adjoint strategy, got {type(strategy).__name__}")
    name = getattr(solver, "name", type(solver).__name__)
    if getattr(solver, "stochastic", False):
        raise ValueError(
            f"gradient=Adjoint() needs a deterministic solver; {name} is stochastic: "
            "use gradient=Backprop() or Remat() (or a deterministic solver)"
        )
    if not getattr(solver, "supports_adjoint", False):
        raise ValueError(f"gradient=Adjoint() supports {_SUPPORTED}; got {name}: use gradient=Backprop() or Remat()")
    if trajectory:
        raise ValueError(
            "gradient=Adjoint() keeps no trajectory, so trajectory=True is not supported with it: "
            "use gradient=Backprop() or Remat()"
        )


# --------------------------------------------------------------------- pytrees


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


def _is_float(leaf) -> bool:
    return _is_array(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


class _Split(NamedTuple):
    """A pytree as its array leaves (custom_vjp arguments) and everything else."""

    treedef: Any
    static: tuple  # (position, value) of the leaves that are not arrays
    dyn_pos: tuple  # positions of the array leaves
    diff: tuple  # per array leaf: differentiated (floating and not frozen)


def _split(tree, frozen=frozenset()):
    leaves, treedef = jax.tree.flatten(tree)
    static, pos, dyn, diff = [], [], [], []
    for k, leaf in enumerate(leaves):
        if _is_array(leaf):
            pos.append(k)
            dyn.append(leaf)
            diff.append(_is_float(leaf) and id(leaf) not in frozen)
        else:
            static.append((k, leaf))
    return _Split(treedef, tuple(static), tuple(pos), tuple(diff)), dyn


def _merge(sp: _Split, dyn):
    leaves = [None] * (len(sp.static) + len(sp.dyn_pos))
    for k, v in sp.static:
        leaves[k] = v
    for k, v in zip(sp.dyn_pos, dyn):
        leaves[k] = v
    return jax.tree.unflatten(sp.treedef, leaves)


def _pick(xs, mask):
    return [x for x, m in zip(xs, mask) if m]


def _put(xs, mask, new):
    it = iter(new)
    return [next(it) if m else x for x, m in zip(xs, mask)]


def _cotangents(orig, mask, got):
    """Cotangents for every array leaf: ``got`` for the differentiated ones, zeros for
    the other floating ones, None (no cotangent) for integer and boolean ones."""
    it = iter(got)
    out = []
    for v, m in zip(orig, mask):
        if m:
            out.append(next(it).astype(jnp.result_type(v)))
        elif _is_float(v):
            out.append(jnp.zeros_like(v))
        else:
            out.append(None)
    return out


# -------------------------------------------------------------- reconstruction


class _Recon(NamedTuple):
    """Backward DPM-Solver++ multistep on the grid refined into ``K`` substeps per step.

    Refined point ``r = K s + m`` lies at ``lambda_s + m (lambda_{s+1} - lambda_s) / K``.
    Substep ``r`` goes from point ``r + 1`` to point ``r``:
    ``x_r = cx[r] x_{r+1} + sum_slot cm[r, slot] D[slot]``, where the ring buffer holds
    the x0 predictions at points ``r + 1 .. r + P`` (point ``n`` in slot ``n % P``)."""

    t: jax.Array  # (K N,) the time of each refined point (a safe grid time where unused)
    ok: jax.Array  # (K N,) substep r is used (1 <= s <= N - 2)
    cx: jax.Array  # (K N,)
    cm: jax.Array  # (K N, P)


def _recon_table(process, grid, P: int, K: int) -> _Recon:
    N = grid.shape[0] - 1
    R = K * N
    r_idx = jnp.arange(R)
    s_idx, m_idx = r_idx // K, r_idx % K
    ok = (s_idx >= 1) & (s_idx <= N - 2)
    lam = process.lambda_(grid)
    lam = jnp.where(jnp.isfinite(lam), lam, 0.0)  # only the finite interior is used
    s1 = jnp.minimum(s_idx + 1, N)
    lam_r = lam[s_idx] + m_idx * (lam[s1] - lam[s_idx]) / K
    safe_t = grid[jnp.clip(s_idx, 1, max(N - 1, 1))]
    t_sub = jnp.where(ok, process.t_of_lambda(jnp.where(ok, lam_r, 0.0)), safe_t).astype(grid.dtype)
    t_r = jnp.where(m_idx == 0, grid[s_idx], t_sub)
    t_pts = jnp.concatenate([t_r, grid[-1:]])  # (R + 1,): point r's time
    la, ls = process.log_alpha(t_pts), process.log_sigma(t_pts)
    lam_pts = jnp.where(jnp.isfinite(la - ls), la - ls, 0.0)
    top = K * (N - 1)  # the last point with a prediction: x_{N-1}

    def one(r):
        use = ok[r]
        h = jnp.where(use, lam_pts[r + 1] - lam_pts[r], 1.0)
        n = r + 1 + jnp.arange(P)
        nv = jnp.clip(top - r, 1, P)
        q = nv - 1
        rr = (lam_pts[r + 1] - lam_pts[jnp.minimum(n[1:], R)]) / h
        rr = jnp.where(jnp.arange(1, P) < nv, rr, -1.0)
        # the data-prediction step from point r + 1 back to r, with step -h (z = h)
        w = ei_weights(rr, q, h, "exact") if P > 1 else jnp.zeros((0,), h.dtype)
        w = jnp.where(jnp.arange(P - 1) < q, w, 0.0)
        coef = -jnp.exp(jnp.where(use, la[r], 0.0)) * h * jnp.concatenate([(phi(1, h) - jnp.sum(w))[None], w])
        coef = jnp.where(use, coef, 0.0)
        cx = jnp.where(use, jnp.exp(jnp.where(use, ls[r] - ls[r + 1], 0.0)), 0.0)
        return cx, jnp.zeros((P,), coef.dtype).at[n % P].set(coef)

    cx, cm = jax.vmap(one)(r_idx)
    dt = grid.dtype
    return _Recon(t_r.astype(dt), ok, cx.astype(dt), cm.astype(dt))


def _substeps(solver, N: int) -> int:
    """Model calls per step of the solver (rounded up, at most 3)."""
    try:
        calls = int(solver.nfe(N))
    except Exception:  # noqa: BLE001 - a solver whose count needs more than N
        calls = N
    return int(min(max(math.ceil(calls / N), 1), 3))


# ---------------------------------------------------------------------- sample


def adjoint_sample(strategy: Adjoint, solver, denoiser, x, grid, cond=None, *, nfe: int | None = None):
    """Run ``solver`` from ``x`` over ``grid`` with the :class:`Adjoint` backward pass.

    The forward pass is ``state = solver.init(x, grid, denoiser.process, nfe=nfe)``
    followed by ``N`` steps under ``lax.scan``, exactly as :func:`jdiff.sample`; the
    result is differentiable (``jax.grad``/``vjp``; not forward mode) with respect to
    ``x``, the float arrays of ``cond`` and of ``denoiser`` (its parameters) and the
    grid, in memory independent of ``N``.

    Gradients: ``x``, the conditioning and the parameters get the adjoint described in
    :mod:`jdiff._adjoint`. The grid gets the gradient of the exact flow map
    ``x_N = Phi(t_N, t_0, x_T)``: ``dL/dt_N = a_N . v(x_N, t_N)`` and
    ``dL/dt_0 = -a_0 . v(x_T, t_0)`` with ``v = alpha' x0_hat + sigma' eps_hat`` the
    ODE velocity and ``a`` the adjoint, and zero at the interior points (whose
    influence vanishes as the steps shrink) and at an end at the data (``t_N = t_data``,
    where ``v`` may be infinite and the time cannot move). To learn a grid, use
    ``Backprop()`` or ``Remat()``, which differentiate the discrete map. The arrays of
    ``denoiser.process`` (a discrete schedule's table) get zero gradient.

    Args:
      strategy: the :class:`Adjoint` settings.
      solver: a deterministic solver accepted by :func:`check_adjoint`.
      denoiser: the denoiser (a pytree; its float array leaves are differentiated).
      x: ``(B, ...)`` the starting noise ``x_T`` in the compute dtype (float32 or wider).
      grid: ``(N + 1,)`` decreasing times (validated by the caller).
      cond: any pytree passed to the denoiser.
      nfe: the target number of model calls, passed to ``solver.init`` as
        :func:`jdiff.sample` does (singlestep solvers use it to pick their orders).

    Returns:
      ``x_N`` in ``x``'s dtype.
    """
    P = strategy.resolve_order(solver)
    process = denoiser.process
    frozen = frozenset(id(v) for v in jax.tree.leaves(process))
    dsp, d_dyn = _split(denoiser, frozen)
    csp, c_dyn = _split(cond)
    grid = jnp.asarray(grid).astype(x.dtype)
    N = grid.shape[0] - 1
    K = _substeps(solver, N)

    def build(dd, cc):
        return _merge(dsp, dd), _merge(csp, cc)

    def forward(x, grid, dd, cc, keep_last):
        den, c = build(dd, cc)
        state0 = solver.init(x, grid, den.process, nfe=nfe)

        def body(carry, _):
            st, last = carry
            return (solver.step(den, st, c), st.x if keep_last else last), None

        (state, last), _ = jax.lax.scan(body, (state0, state0.x), None, length=N)
        return state.x, last, state0

    @jax.custom_vjp
    def run(x, grid, dd, cc):
        return forward(x, grid, dd, cc, False)[0]

    def fwd(x, grid, dd, cc):
        x_N, x_last, state0 = forward(x, grid, dd, cc, True)
        # the initial state (its coefficient tables: O(N) numbers) is kept rather than
        # rebuilt, so that the backward program does not contain the tables twice
        return x_N, (x, grid, dd, cc, x_last, x_N, state0)

    def bwd(res, a_N):
        return _backward(res, a_N, solver, dsp, csp, P, K)

    run.defvjp(fwd, bwd)
    return run(x, grid, d_dyn, c_dyn)


def _velocity(process, t, pred):
    """The probability-flow velocity ``alpha'(t) x0 + sigma'(t) eps``."""
    return process.d_alpha(t) * pred.x0 + process.d_sigma(t) * pred.eps


def _backward(res, a_N, solver, dsp, csp, P: int, K: int):
    x_T, grid, dd, cc, x_last, x_N, state0 = res
    dt = x_T.dtype
    N = grid.shape[0] - 1
    dmask, cmask = dsp.diff, csp.diff
    dfl, cfl = _pick(dd, dmask), _pick(cc, cmask)

    def build(df, cf):
        return _merge(dsp, _put(dd, dmask, df)), _merge(csp, _put(cc, cmask, cf))

    den0, cond0 = build(dfl, cfl)
    process = den0.process
    hist0 = jnp.zeros_like(state0.hist)
    rec = _recon_table(process, grid, P, K)

    def step_fn(s, x, hist, df, cf):
        # The step is linear in the history buffer, so its transpose does not depend on
        # the buffer's values: zeros stand in for the (unknown) earlier outputs.
        den, c = build(df, cf)
        new = solver.step(den, state0._replace(x=x, i=s, hist=hist), c)
        return (new.x, new.hist), new.pred

    def predict(den, x, t):
        return evaluate(den, x, t, cond0)

    def body(carry, s):
        x_next, a_x, a_h, gd, gc, buf, _ = carry
        # reconstruct x_s from x_{s+1}: K substeps of backward DPM-Solver++ multistep
        x_r = x_next
        for m in reversed(range(K)):
            r = K * s + m
            x_r = rec.cx[r] * x_r
            for j in range(P):
                x_r = x_r + rec.cm[r, j] * buf[j]
            if m > 0:
                d = predict(den0, x_r, rec.t[r]).x0
                buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(rec.ok[r], d, 0.0), r % P, 0)
        x_s = jnp.where(s == N - 1, x_last, jnp.where(s == 0, x_T, x_r.astype(dt)))
        # transpose of the solver's step at x_s
        _, vjp, pred = jax.vjp(lambda *a: step_fn(s, *a), x_s, hist0, dfl, cfl, has_aux=True)
        a_x, a_h, d_d, d_c = vjp((a_x, a_h))
        buf = jax.lax.dynamic_update_index_in_dim(buf, pred.x0, (K * s) % P, 0)
        gd = [u + v for u, v in zip(gd, d_d)]
        gc = [u + v for u, v in zip(gc, d_c)]
        return (x_s, a_x, a_h, gd, gc, buf, pred), None

    zeros = lambda vs: [jnp.zeros_like(v) for v in vs]  # noqa: E731
    pred0 = state0.pred
    carry = (x_last, a_N.astype(dt), hist0, zeros(dfl), zeros(cfl), jnp.zeros((P,) + x_T.shape, dt), pred0)
    carry, _ = jax.lax.scan(body, carry, jnp.arange(N, dtype=jnp.int32), reverse=True)
    _, a_0, _, gd, gc, _, pred_T = carry

    # the grid: the exact flow map's end-time derivatives
    t_0, t_N = grid[0], grid[N]
    g0 = -jnp.sum(a_0 * _velocity(process, t_0, pred_T))

    def end_grad():
        return jnp.sum(a_N * _velocity(process, t_N, predict(den0, x_N, t_N))).astype(dt)

    gN = jax.lax.cond(process.sigma(t_N) > 0, end_grad, lambda: jnp.zeros((), dt))
    g_grid = jnp.zeros_like(grid).at[0].set(g0.astype(grid.dtype)).at[N].add(gN.astype(grid.dtype))
    return a_0.astype(dt), g_grid, _cotangents(dd, dmask, gd), _cotangents(cc, cmask, gc)
