"""SuperDiff: compose diffusion models at sampling time with the Ito density estimator
(Skreta, Atanackovic, Bose, Tong & Neklyudov, "The Superposition of Diffusion Models
Using the Ito Density Estimator", ICLR 2025).

``M`` denoisers sharing one process give scores ``s_i = -eps_i / sigma``; their
superposition samples with the score ``sum_i kappa_i s_i`` (``sum_i kappa_i = 1``),
i.e. with the prediction ``sum_i kappa_i (x0_i, eps_i)``, while the Ito density
estimator (:func:`jdiff.likelihood.ito_increment`) tracks each model's
``log q_i(x_t)`` along the trajectory from the actual increments:

- **OR** (the mixture ``sum_i pi_i q_i``): its score is the posterior-weighted score,
  ``kappa = softmax(log pi_i + log q_i(x_t))``, computed at the start of each step.
- **AND** (the density where every ``q_i`` is equal): ``kappa`` is chosen each step,
  after the step's noise is drawn, so that every ``log q_i`` has the same value at the
  end of the step. Each step is affine in the prediction, so the step with ``kappa``
  is ``x_next = sum_j kappa_j x_next^(j)`` (``x_next^(j)``: the step with model ``j``'s
  prediction and the same noise), and ``log q_i`` changes by
  ``c_i + sum_j kappa_j G_ij`` with ``G_ij = -eps_i . (x_next^(j) - x) / sigma``:
  ``M - 1`` linear equations plus ``sum kappa = 1`` (the paper's Prop. 6 for any
  ``M``). When the equations do not fix ``kappa`` (identical models, say) the
  minimum-norm change from the uniform ``1/M`` is taken (a pseudo-inverse).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdiff._checks import batch_array, concrete
from jdiff._grid import time_grid
from jdiff._param import Prediction, check_cond_batch
from jdiff._process import same_process
from jdiff._sample import _jittable, check_x_T, validate_grid
from jdiff.likelihood import gaussian_prior_log_prob, ito_increment
from jdiff.solvers import Solver, ddpm
from jdiff.solvers._base import compute_dtype, evaluate
from jdiff.solvers._multistep import Multistep
from jdiff.solvers.ddim import DDIM
from jdiff.solvers.euler import EulerMaruyama

__all__ = ["MODES", "SuperDiffInfo", "sample_superdiff"]

MODES = ("or", "and")


class SuperDiffInfo(NamedTuple):
    """What :func:`sample_superdiff` returns besides the samples with ``return_info=True``.

    Attributes:
      log_q: ``(N + 1, M, B)`` each model's estimated ``log q_i(x_t)`` at every grid point
        (starting from the Gaussian prior's log-density, shared by all models).
      kappa: ``(N, B, M)`` the weights used at each step.
      nfe: model calls made (``M`` per step).
      grid: the time grid.
    """

    log_q: jax.Array
    kappa: jax.Array
    nfe: jax.Array
    grid: jax.Array


@dataclasses.dataclass(frozen=True)
class _Fixed:
    """A 'denoiser' returning a prediction computed beforehand (one model call per step
    and model, whatever the solver does with it)."""

    process: Any
    pred: Prediction

    def __call__(self, x, t, cond=None):
        return self.pred


def _check_solver(solver):
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    ok = (
        (isinstance(solver, DDIM) and solver.eta == 1.0)
        or isinstance(solver, EulerMaruyama)
        or (isinstance(solver, Multistep) and solver.mode == "sde_data" and solver.order == 1)
    )
    if not ok:
        raise ValueError(
            f"SuperDiff needs a one-call reverse-SDE solver whose noise has the reverse SDE's variance "
            f"(ddpm(), euler_maruyama() or sde_dpm_solver_pp(1)) for the Ito density estimate; got {solver.name}"
        )


def _kappa_and(b, P):
    """Per sample: ``kappa`` with ``sum kappa = 1`` and ``P kappa = b`` (``M - 1``
    equations), the minimum-norm change from the uniform ``1/M`` when the equations do
    not fix it. ``b``: ``(B, M-1)``, ``P``: ``(B, M-1, M)``."""
    Bn, M = P.shape[0], P.shape[2]
    u = jnp.full((M,), 1.0 / M, P.dtype)
    K = jnp.concatenate([P, jnp.ones((Bn, 1, M), P.dtype)], axis=1)  # (B, M, M)
    rhs = jnp.concatenate([b - jnp.einsum("bij,j->bi", P, u), jnp.zeros((Bn, 1), P.dtype)], axis=1)
    return u[None] + jnp.einsum("bij,bj->bi", jnp.linalg.pinv(K), rhs)


def _combine(kb, ys):
    """``sum_j kappa_j y_j`` for ``sum kappa = 1`` as ``y_0 + sum_j kappa_j (y_j - y_0)``: the
    differences are exact where the models agree, so large weights of opposite sign
    (AND where the models nearly agree) do not amplify rounding of ``y`` itself."""
    return ys[0] + jnp.sum(kb * (ys - ys[:1]), axis=0)


def _superdiff_impl(solver, denoisers, x_T, grid, conds, key, log_weights, *, mode):
    process = denoisers[0].process
    dt = compute_dtype(x_T)
    M = len(denoisers)
    B = x_T.shape[0]
    state = solver.init(x_T.astype(dt), grid, process, key=key)
    grid = state.grid
    lw = jnp.zeros((M,), dt) if log_weights is None else jnp.asarray(log_weights, dt)
    ell0 = jnp.broadcast_to(gaussian_prior_log_prob(process, state.x), (M, B))

    def body(carry, _):
        st, ell = carry
        x = st.x
        t, t_next = st.grid[st.i], st.grid[st.i + 1]
        preds = [evaluate(d, x, t, c) for d, c in zip(denoisers, conds)]
        steps = [solver.step(_Fixed(process, p), st, None) for p in preds]
        eps = jnp.stack([p.eps for p in preds])  # (M, B, ...)
        nxt = jnp.stack([s.x for s in steps])  # (M, B, ...)
        if mode == "or":
            kappa = jax.nn.softmax(lw[None] + ell.T, axis=-1)
        else:
            # log q_i - log q_0 after the step, linear in kappa, written with differences
            # d_i = eps_i - eps_0 and w_j = x_next_j - x_next_0 (exact where models agree)
            sig = process.sigma(t)
            d = (eps[1:] - eps[:1]).reshape(M - 1, B, -1)
            w = (nxt - nxt[:1]).reshape(M, B, -1)
            c = jax.vmap(lambda e: ito_increment(process, x, x, e, t, t_next))(eps)  # (M, B), zero increment
            dy0 = (nxt[0] - x).reshape(B, -1)
            P = jnp.einsum("ibd,jbd->bij", d, w) / sig  # (B, M-1, M)
            b = (ell[1:] - ell[:1] + c[1:] - c[:1]).T - jnp.einsum("ibd,bd->bi", d, dy0) / sig
            kappa = _kappa_and(b, P)
        kb = kappa.T.reshape((M, B) + (1,) * (x.ndim - 1)).astype(dt)
        x_new = _combine(kb, nxt)
        pred = Prediction(_combine(kb, jnp.stack([p.x0 for p in preds])), _combine(kb, eps))
        d_ell = jax.vmap(lambda e: ito_increment(process, x, x_new, e, t, t_next))(eps)  # (M, B)
        new = steps[0]._replace(x=x_new.astype(dt), pred=pred, nfe=st.nfe + M)
        return (new, ell + d_ell), (ell + d_ell, kappa)

    (state, _), (ells, kappas) = jax.lax.scan(body, (state, ell0), None, length=grid.shape[0] - 1)
    log_q = jnp.concatenate([ell0[None], ells], axis=0)
    return state.x.astype(x_T.dtype), SuperDiffInfo(log_q, kappas, state.nfe, grid)


_superdiff_jit = jax.jit(_superdiff_impl, static_argnames=("solver", "mode"))


def sample_superdiff(
    denoisers,
    x_T,
    grid=None,
    *,
    key,
    mode: str = "or",
    conds=None,
    solver=None,
    nfe: int | None = None,
    grid_kind: str = "default",
    log_weights=None,
    return_info: bool = False,
):
    """Sample from the superposition of two or more denoisers (SuperDiff; Skreta et al.,
    ICLR 2025, Alg. 1): the mixture (``mode="or"``) or the equal-density "AND".

    Args:
      denoisers: a sequence of ``M >= 2`` :class:`~jdiff.Denoiser` sharing one process
        (the same denoiser may appear twice with different ``conds``, e.g. two prompts).
      x_T: ``(B, ...)`` starting noise (:func:`jdiff.prior_sample`).
      grid: ``(N + 1,)`` decreasing times ending where ``sigma > 0`` (default: built from
        ``nfe``, ending at ``t_min``).
      key: PRNG key of the solver's noise (as :func:`jdiff.sample`).
      mode: ``"or"`` (mixture, ``kappa = softmax(log_weights + log q)``) or ``"and"``
        (``kappa`` solved each step so that all ``log q_i`` stay equal).
      conds: one conditioning per denoiser (a sequence of length ``M``), or None.
      solver: the reverse-SDE step (default ``jdiff.solvers.ddpm()``; also
        ``euler_maruyama()`` or ``sde_dpm_solver_pp(1)``): the Ito estimate needs
        steps whose noise has the reverse SDE's variance.
      nfe: number of steps when no grid is given (``M`` model calls per step).
      log_weights: ``(M,)`` log mixture weights ``log pi_i`` for OR (default equal).
      return_info: also return a :class:`SuperDiffInfo`.

    Returns:
      The samples (dtype of ``x_T``), or ``(samples, SuperDiffInfo)``.

    Raises:
      TypeError: ``denoisers`` not a sequence of denoisers, a solver that is not one.
      ValueError: fewer than 2 denoisers; denoisers on different processes, or one that
        does not map ``x_T``'s shape to itself (the message names its index); ``conds``
        not one per denoiser or with the wrong batch; an unknown ``mode``; a solver the
        Ito estimate does not hold for; a grid ending at ``sigma = 0``; ``log_weights``
        of the wrong shape; and whatever :func:`jdiff.sample` rejects (bad grid,
        non-finite ``x_T``).
    """
    if not isinstance(denoisers, (list, tuple)):
        raise TypeError(f"denoisers must be a list or tuple of denoisers, got {type(denoisers).__name__}")
    M = len(denoisers)
    if M < 2:
        raise ValueError(f"SuperDiff composes two or more denoisers, got {M}")
    for i, d in enumerate(denoisers):
        if getattr(d, "process", None) is None or not callable(d):
            raise TypeError(f"denoisers[{i}] is not a jdiff Denoiser (no .process), got {type(d).__name__}")
    process = denoisers[0].process
    for i, d in enumerate(denoisers[1:], 1):
        if not same_process(d.process, process):
            raise ValueError(
                f"denoisers[{i}] has process {d.process!r} but denoisers[0] has {process!r}: "
                "SuperDiff composes models of one process"
            )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    solver = ddpm() if solver is None else solver
    _check_solver(solver)
    x_T = batch_array(x_T, "x_T", min_ndim=2)
    if conds is None:
        conds = (None,) * M
    if not isinstance(conds, (list, tuple)) or len(conds) != M:
        raise ValueError(f"conds must be a list of one conditioning per denoiser ({M}), got {type(conds).__name__}")
    conds = tuple(conds)
    for i, c in enumerate(conds):
        check_cond_batch(c, x_T.shape[0], f"x_T (conds[{i}])", x_T.shape)
    t_probe = jnp.asarray(process.t_min, jnp.result_type(x_T.dtype, jnp.float32))
    for i, (d, c) in enumerate(zip(denoisers, conds)):
        try:
            out = jax.eval_shape(lambda x, d=d, c=c: d(x, t_probe, c), x_T)
        except (ValueError, TypeError) as e:
            raise ValueError(f"denoisers[{i}] cannot denoise x_T of shape {x_T.shape}: {e}") from e
        shapes = {tuple(o.shape) for o in jax.tree.leaves(out)}
        if shapes != {tuple(x_T.shape)}:
            raise ValueError(
                f"denoisers[{i}] returns shapes {sorted(shapes)} for x_T of shape {x_T.shape}: "
                "every denoiser must map the data shape to itself"
            )
    if log_weights is not None:
        lw = jnp.asarray(log_weights)
        if lw.shape != (M,):
            raise ValueError(f"log_weights must have shape ({M},), got {lw.shape}")
        if mode != "or":
            raise ValueError("log_weights are the mixture weights of mode='or'")
    if grid is None:
        if nfe is None:
            raise ValueError("give a time grid or a number of steps nfe")
        grid = time_grid(process, int(nfe), kind=grid_kind, final="t_min")
    grid = validate_grid(process, grid)
    g = concrete(grid)
    if g is not None and process.t_data is not None and float(g[-1]) == process.t_data:
        raise ValueError("SuperDiff needs sigma > 0 at every grid point (Ito density): end the grid at t_min")
    x_T = check_x_T(x_T)
    if key is None:
        raise ValueError("SuperDiff samples a reverse SDE: pass key=jax.random.key(seed)")
    args = (solver, tuple(denoisers), x_T, grid, conds, key, log_weights)
    run = _superdiff_jit if _jittable(args[1:]) else _superdiff_impl
    x, info = run(*args, mode=mode)
    return (x, info) if return_info else x
