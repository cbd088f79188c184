"""Optimized and learned time grids for few-step sampling.

Three ways to place the ``N + 1`` points of a time grid for a given denoiser, process
and solver, each returning an ordinary grid (a decreasing array) that
:func:`jdiff.sample` takes like any other:

- :func:`ld3` -- learned by gradient descent through the sampler (LD3: Tong et al.,
  "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025). The grid is a
  cumulative softmax of ``N`` free logits mapped between the two end points (in
  log-SNR, or in t where the log-SNR is infinite), so it is strictly decreasing and
  starts and ends where asked for any logits. Adam (optax) fits the logits so that the
  student solver at N steps lands where a teacher (a high-NFE or exact solve from the
  same noise) lands, on about 100 training noises; optionally the student may start
  anywhere in a small ball around each noise (LD3's slack, "soft teacher forcing"),
  and the network may be fed its own times near the grid's (``decouple``: LD3's second
  set of learned times; :func:`jdiff.wrappers.network_time`).
- :func:`gits` -- dynamic programming over the time points of a fine teacher
  trajectory (GITS: Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
  Sampling", ICML 2024): the cost of a coarse step between two fine points is the error
  of one student step started on the teacher's state, and the DP picks the N steps of
  least total cost. No gradients.
- :func:`dmn` -- no model calls at all (Xue et al., "Accelerating Diffusion Sampling
  with Optimized Time Steps", CVPR 2024): the interior log-SNR points minimize the
  paper's bound on the discretization error of a multistep data-prediction solver
  (:func:`dmn_objective`).

:func:`save_grids` / :func:`load_grid` keep grids in a small JSON file tied to the
model (a fingerprint of its parameters), the process, the solver and the NFE; a file
made for another model, process, solver or NFE is refused. :func:`tune` fits, saves and
evaluates grids for a list of NFEs with a progress bar (the ``jdiff tune`` command).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "grid_from_logits",
    "logits_from_grid",
    "grid_space",
    "net_grid_from",
    "ld3",
    "gits",
    "gits_path",
    "gits_costs",
    "dmn",
    "dmn_objective",
    "GridFit",
    "teacher_solve",
    "grid_error",
    "model_fingerprint",
    "save_grids",
    "load_grid",
    "read_grids",
    "tune",
    "METHODS",
]

METHODS = ("ld3", "gits", "dmn")
FORMAT = "jdiff-grids"


@dataclasses.dataclass
class GridFit:
    """What a grid optimizer returns.

    Attributes:
      grid: ``(N + 1,)`` numpy float64, strictly decreasing.
      method: ``"ld3"``, ``"gits"`` or ``"dmn"``.
      history: the objective along the fit (LD3: training loss per step; DMN: the bound
        per step; GITS: the DP's total cost, one value).
      seconds: wall time of the fit.
      net_grid: ``(N + 1,)`` the network's times (LD3 with ``decouple > 0``; use them with
        :func:`jdiff.wrappers.network_time`), else None.
      keep: the prediction :func:`jdiff.wrappers.network_time` keeps (with ``net_grid``).
    """

    grid: np.ndarray
    method: str
    history: list
    seconds: float
    net_grid: np.ndarray | None = None
    keep: str = "x0"

    def denoiser(self, denoiser):
        """``denoiser`` as the fitted configuration uses it: wrapped by
        :func:`jdiff.wrappers.network_time` when the fit has network times."""
        if self.net_grid is None:
            return denoiser
        from jdiff.wrappers import network_time

        return network_time(
            denoiser, jnp.asarray(self.grid, jnp.float32), jnp.asarray(self.net_grid, jnp.float32), keep=self.keep
        )


# ------------------------------------------------------------------ parameterization
def _lam(process, t):
    return process.lambda_(jnp.asarray(t, jnp.float32))


def grid_space(process, t_start: float, t_end: float) -> str:
    """``"logsnr"`` when the log-SNR is finite at both ends, else ``"t"``."""
    lam = np.asarray(process.lambda_(jnp.asarray([t_start, t_end], jnp.float32)), np.float64)
    return "logsnr" if np.all(np.isfinite(lam)) else "t"


def grid_from_logits(process, logits, t_start: float, t_end: float, space: str = "logsnr"):
    """The grid of ``len(logits)`` intervals whose fractions of the span are ``softmax(logits)``.

    ``t_0 = t_start``, ``t_N = t_end`` exactly; interior point ``i`` sits at the
    fraction ``sum_{k < i} softmax(logits)_k`` of the way from start to end, in log-SNR
    (``space="logsnr"``) or in t (``space="t"``). Every fraction is positive, so the
    grid is strictly decreasing for any finite logits (LD3, Tong et al., ICLR 2025).
    Differentiable in ``logits``.
    """
    logits = jnp.asarray(logits)
    dt = jnp.result_type(logits.dtype, jnp.float32)
    c = jnp.cumsum(jax.nn.softmax(logits.astype(dt)))[:-1]
    if space == "logsnr":
        l0, l1 = process.lambda_(jnp.asarray(t_start, dt)), process.lambda_(jnp.asarray(t_end, dt))
        inner = process.t_of_lambda(l0 + (l1 - l0) * c)
    elif space == "t":
        inner = t_start + (t_end - t_start) * c
    else:
        raise ValueError(f"space must be 'logsnr' or 't', got {space!r}")
    return jnp.concatenate([jnp.asarray([t_start], dt), inner.astype(dt), jnp.asarray([t_end], dt)])


def logits_from_grid(process, grid, space: str = "logsnr"):
    """Logits whose :func:`grid_from_logits` is ``grid`` (up to rounding): the logs of
    its interval fractions in ``space``."""
    g = np.asarray(grid, np.float64)
    if space == "logsnr":
        u = np.asarray(process.lambda_(jnp.asarray(g, jnp.float32)), np.float64)
    else:
        u = g
    d = np.diff(u) / (u[-1] - u[0])
    if not np.all(d > 0):
        raise ValueError(f"the initial grid must be strictly monotone in {space}, got {g.tolist()}")
    return jnp.asarray(np.log(d), jnp.float32)


def net_grid_from(process, grid, z, window: float, space: str = "logsnr"):
    """Network times around ``grid`` (LD3's decoupled times, Tong et al., ICLR 2025): the
    interior point ``i`` moves by ``window * tanh(z[i-1])`` times the smaller of its two
    intervals, in log-SNR (``space="logsnr"``) or in t; the end points stay. With
    ``window <= 0.5`` the network times stay strictly ordered. Differentiable in ``grid``
    and ``z`` (``(N - 1,)``)."""
    grid = jnp.asarray(grid)
    z = jnp.asarray(z, grid.dtype)
    full = process.lambda_(grid) if space == "logsnr" else grid
    u = full[1:-1]
    gap = jnp.abs(jnp.diff(full))
    m = jnp.minimum(gap[:-1], gap[1:])
    u2 = u + window * jnp.tanh(z) * m
    inner = process.t_of_lambda(u2) if space == "logsnr" else u2
    return jnp.concatenate([grid[:1], inner.astype(grid.dtype), grid[-1:]])


# ------------------------------------------------------------------------- checks
def _check_steps(solver, nfe, what="nfe"):
    from jdiff.solvers._base import Solver

    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    if solver.stochastic:
        raise ValueError(f"{solver.name} is stochastic: grids are tuned for deterministic solvers")
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"{what} must be a positive int, got {nfe!r}")
    n = int(solver.num_steps(int(nfe)))
    if n < max(1, solver.min_steps) or (_nfe_arg(solver, nfe) is None and solver.nfe(n) > nfe):
        raise ValueError(
            f"{solver.name} cannot run with nfe={nfe}: it needs at least {solver.min_steps} steps "
            f"(nfe {solver.nfe(max(1, solver.min_steps))})"
        )
    return n


def _nfe_arg(solver, nfe):
    """The ``nfe`` target a singlestep solver spends exactly on its grid; None for the others."""
    from jdiff.solvers.dpm_solver import Singlestep

    return int(nfe) if isinstance(solver, Singlestep) else None


def _check_noise(x, what):
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty batch (n, ...) with n >= 1, got shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} of shape {x.shape} has non-finite values")
    return x


def _ends(process, t_start, t_end):
    t0 = float(process.t_max if t_start is None else t_start)
    t1 = float(process.t_min if t_end is None else t_end)
    if not t0 > t1:
        raise ValueError(f"t_start ({t0}) must be larger than t_end ({t1})")
    process.check_times(np.array([t0]), allow_data=False, what="t_start")
    process.check_times(np.array([t1]), allow_data=True, what="t_end")
    return t0, t1


def _per_sample_l2(a, b):
    d = (a - b).reshape(a.shape[0], -1)
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


def grid_error(solver, denoiser, x_T, x_ref, grid, *, nfe=None, cond=None) -> float:
    """Mean L2 distance (per sample) between ``jdiff.sample(solver, denoiser, x_T, grid)``
    and ``x_ref``."""
    from jdiff._sample import sample

    x = sample(solver, denoiser, jnp.asarray(x_T), jnp.asarray(grid, jnp.float32), nfe=nfe, cond=cond)
    return float(jnp.mean(_per_sample_l2(x.astype(jnp.float32), jnp.asarray(x_ref, jnp.float32))))


def teacher_solve(denoiser, x_T, t_start=None, t_end=None, *, solver=None, steps: int = 200, cond=None):
    """A high-accuracy solve of the probability-flow ODE: ``solver`` (default
    DPM-Solver++(3M)) over a log-SNR grid of ``steps`` intervals (a t grid where the
    log-SNR is infinite), from ``t_start`` to ``t_end`` (default ``t_max``, ``t_min``)."""
    from jdiff import solvers as S
    from jdiff._grid import time_grid
    from jdiff._sample import sample

    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    solver = S.dpm_solver_pp(3) if solver is None else solver
    if grid_space(process, t0, t1) == "logsnr":
        grid = time_grid(process, steps, kind="logsnr", t_start=t0, t_end=t1)
    else:
        grid = jnp.asarray(np.linspace(t0, t1, steps + 1), jnp.float32)
    return sample(solver, denoiser, jnp.asarray(x_T), grid, cond=cond)


# ---------------------------------------------------------------------------- LD3
def ld3(
    solver,
    denoiser,
    x_train,
    x_teacher,
    nfe: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    init="logsnr",
    space: str = "auto",
    iters: int = 300,
    learning_rate: float = 0.05,
    slack: float = 0.0,
    decouple: float = 0.0,
    keep: str = "x0",
    batch_size: int = 0,
    seed: int = 0,
    cond=None,
) -> GridFit:
    """Learn a grid by gradient descent through the sampler (LD3; Tong et al., "Learning
    to Discretize Denoising Diffusion ODEs", ICLR 2025).

    The grid is :func:`grid_from_logits` of ``N`` free logits (``N`` intervals for
    ``nfe`` model calls of ``solver``); Adam minimizes the mean squared L2 distance
    between the student ``jdiff.sample(solver, denoiser, x_T', grid)`` and the teacher's
    ``x_teacher`` over the training noises. With ``slack > 0`` each student start is a
    free ``x_T' = x_T + delta`` kept in the ball ``|delta| <= slack * |x_T|`` (LD3's
    relaxed objective, "soft teacher forcing"); the grid is what is returned, the deltas
    are discarded. One jitted training step; the noises are the batch of the sampler.

    Args:
      solver: a deterministic :class:`~jdiff.solvers.Solver`.
      denoiser: the model (``.process`` gives the process).
      x_train: ``(n, ...)`` training noises at ``t_start``.
      x_teacher: ``(n, ...)`` the teacher's end states at ``t_end`` from the same noises
        (:func:`teacher_solve`, or the exact ODE solution on a testbed).
      nfe: model calls of the student.
      t_start, t_end: the grid's end points (default ``t_max``, ``t_min``).
      init: the initial grid: a kind of :func:`jdiff.time_grid` or an array.
      space: ``"logsnr"``, ``"t"`` or ``"auto"`` (:func:`grid_space`).
      iters: Adam steps; learning_rate: its step size.
      slack: the radius of the start ball relative to ``|x_T|`` (0: plain LD3 loss).
      decouple: with ``decouple > 0``, also learn the network's times (LD3's second set
        of times, in its released code): each interior network time moves within
        ``decouple`` times its smaller neighbouring interval (:func:`net_grid_from`, at most
        0.5); the fit's ``net_grid`` is used through :func:`jdiff.wrappers.network_time`
        (``GridFit.denoiser``). 0: the network runs at the grid's times.
      keep: the prediction the decoupled network call keeps (``"eps"`` or ``"x0"``).
      batch_size: noises per step (0: all; else a random subset per step, from ``seed``).
      seed: the PRNG seed of the batches (fitting is deterministic for a seed).
      cond: per-sample conditioning (array leaves with leading axis ``n``), e.g. labels.

    Returns:
      A :class:`GridFit`.

    Raises:
      ValueError: ``nfe`` below the solver's minimum, empty or non-finite noises,
        mismatched shapes, bad settings (before any fitting).
    """
    from jdiff._grid import time_grid

    process = denoiser.process
    N = _check_steps(solver, nfe)
    x_train = _check_noise(x_train, "x_train")
    x_teacher = _check_noise(x_teacher, "x_teacher")
    if x_train.shape != x_teacher.shape:
        raise ValueError(f"x_train {x_train.shape} and x_teacher {x_teacher.shape} must have the same shape")
    for name, v in (("iters", iters), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or v < (1 if name == "iters" else 0):
            raise ValueError(f"{name} must be a {'positive' if name == 'iters' else 'non-negative'} int, got {v!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")
    if not (np.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack must be a non-negative number, got {slack!r}")
    if not (np.isfinite(decouple) and 0 <= decouple <= 0.5):
        raise ValueError(f"decouple must be in [0, 0.5], got {decouple!r}")
    if decouple > 0 and N < 2:
        raise ValueError(f"decouple needs interior grid points (at least 2 steps), got {N} step(s)")
    if keep not in ("eps", "x0"):
        raise ValueError(f"keep must be 'eps' or 'x0', got {keep!r}")
    t0, t1 = _ends(process, t_start, t_end)
    if space == "auto":
        space = grid_space(process, t0, t1)
    if space == "logsnr" and grid_space(process, t0, t1) != "logsnr":
        raise ValueError(f"space='logsnr' needs finite log-SNR at t_start={t0} and t_end={t1}; use space='t'")
    if isinstance(init, str):
        kind = init
        if kind == "logsnr" and space == "logsnr":
            g0 = None
        else:
            if kind == "logsnr" and space == "t":
                kind = "uniform"
            g0 = np.asarray(time_grid(process, N, kind=kind, t_start=t0, t_end=t1), np.float64)
    else:
        g0 = np.asarray(init, np.float64)
        if g0.shape != (N + 1,) or g0[0] != np.float32(t0) or g0[-1] != np.float32(t1):
            raise ValueError(f"init must be a grid of {N + 1} points from {t0} to {t1}, got {g0.tolist()}")
    logits0 = jnp.zeros((N,), jnp.float32) if g0 is None else logits_from_grid(process, g0, space)
    n = x_train.shape[0]
    bs = n if batch_size in (0, None) or batch_size >= n else int(batch_size)
    use_nfe = _nfe_arg(solver, nfe)

    radius = slack * jnp.sqrt(jnp.sum(x_train.reshape(n, -1).astype(jnp.float32) ** 2, -1))
    start = time.perf_counter()
    best, hist = _ld3_fit(
        denoiser,
        x_train,
        x_teacher,
        logits0,
        radius,
        jnp.float32(learning_rate),
        jax.random.key(seed),
        cond,
        solver=solver,
        space=space,
        t0=t0,
        t1=t1,
        bs=bs,
        use_slack=slack > 0,
        iters=int(iters),
        nfe=use_nfe,
        window=float(decouple),
        keep=keep,
    )
    hist = [float(v) for v in np.asarray(hist)]
    g32 = grid_from_logits(process, best["logits"], t0, t1, space)
    grid = np.array(g32, np.float64)
    net = None
    if decouple > 0:
        net = np.array(net_grid_from(process, g32, best["z"], float(decouple), space), np.float64)
    return GridFit(grid=grid, method="ld3", history=hist, seconds=time.perf_counter() - start, net_grid=net, keep=keep)


def _ld3_fit_impl(
    denoiser,
    x_train,
    x_teacher,
    logits0,
    radius,
    lr,
    key,
    cond,
    *,
    solver,
    space,
    t0,
    t1,
    bs,
    use_slack,
    iters,
    nfe,
    window=0.0,
    keep="eps",
):
    """The whole LD3 fit as one program: ``iters`` Adam steps (Kingma & Ba, 2015, the
    default betas) under ``lax.scan``; returns the logits of the lowest training loss and
    the loss history. Module-level and jitted with the settings static, so fitting again
    with the same settings (another seed, learning rate, data) reuses the compilation."""
    from jdiff._sample import sample

    process = denoiser.process
    n = x_train.shape[0]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_fn(p, idx):
        grid = grid_from_logits(process, p["logits"], t0, t1, space)
        den = denoiser
        if window > 0:
            from jdiff.wrappers import network_time

            den = network_time(denoiser, grid, net_grid_from(process, grid, p["z"], window, space), keep=keep)
        x = x_train[idx].astype(jnp.float32)
        if use_slack:
            x = x + p["delta"][idx]
        c = None if cond is None else jax.tree.map(lambda a: a[idx] if jnp.ndim(a) else a, cond)
        out = sample(solver, den, x, grid, nfe=nfe, cond=c)
        d = (out - x_teacher[idx].astype(out.dtype)).reshape(idx.shape[0], -1)
        return jnp.mean(jnp.sum(d * d, -1))

    def body(carry, k):
        p, m, v, best_loss, best_p = carry
        idx = jnp.arange(n) if bs == n else jax.random.choice(jax.random.fold_in(key, k), n, (bs,), replace=False)
        loss, g = jax.value_and_grad(loss_fn)(p, idx)
        better = jnp.isfinite(loss) & (loss < best_loss)
        best_loss = jnp.where(better, loss, best_loss)
        best_p = {k: jnp.where(better, p[k], best_p[k]) for k in best_p}
        c = (k + 1).astype(jnp.float32)
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        p = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - b1**c)) / (jnp.sqrt(v / (1 - b2**c)) + eps), p, m, v)
        if use_slack:  # project each start back into its ball
            dn = jnp.sqrt(jnp.sum(p["delta"].reshape(n, -1) ** 2, -1))
            scale = jnp.minimum(1.0, radius / jnp.maximum(dn, 1e-30))
            p = dict(p, delta=p["delta"] * scale.reshape((n,) + (1,) * (x_train.ndim - 1)))
        return (p, m, v, best_loss, best_p), loss

    p = {"logits": logits0.astype(jnp.float32)}
    if window > 0:
        p["z"] = jnp.zeros((logits0.shape[0] - 1,), jnp.float32)
    if use_slack:
        p["delta"] = jnp.zeros(x_train.shape, jnp.float32)
    zeros = jax.tree.map(jnp.zeros_like, p)
    init = (p, zeros, zeros, jnp.float32(jnp.inf), {k: v for k, v in p.items() if k != "delta"})
    (_, _, _, _, best), hist = jax.lax.scan(body, init, jnp.arange(iters))
    return best, hist


_ld3_fit = jax.jit(
    _ld3_fit_impl,
    static_argnames=("solver", "space", "t0", "t1", "bs", "use_slack", "iters", "nfe", "window", "keep"),
)


# --------------------------------------------------------------------------- GITS
def gits_costs(solver, denoiser, fine_grid, xs, *, nfe_step=None, cond=None):
    """``C[i, j]`` (``i < j``): mean L2 distance between one ``solver`` step from the
    teacher state ``xs[i]`` at ``fine_grid[i]`` to ``fine_grid[j]`` and the teacher state
    ``xs[j]`` (GITS's local cost, Chen et al., ICML 2024); ``inf`` for ``j <= i``.

    ``xs`` is ``(M + 1, B, ...)``, the teacher trajectory on the ``M + 1`` fine points. A
    multistep solver's single step is its first-order start (DDIM for the exponential
    integrators), as in GITS's cost. Computed as one program: a map over ``i``, a vmap
    over ``j``.
    """
    fine = jnp.asarray(fine_grid, jnp.float32)
    return np.asarray(
        _gits_costs(solver, denoiser, jnp.asarray(xs, jnp.float32), fine, cond, nfe_step=nfe_step), np.float64
    )


def _gits_costs_impl(solver, denoiser, xs, fine, cond, *, nfe_step):
    from jdiff._sample import sample

    M = fine.shape[0] - 1

    def one(x, i, j):
        # pairs j <= i are masked below; they run on the whole span so that every grid is valid
        g = jnp.where(j > i, jnp.stack([fine[i], fine[j]]), jnp.stack([fine[0], fine[M]]))
        return sample(solver, denoiser, x, g, nfe=nfe_step, cond=cond)

    def row(i):
        out = jax.vmap(lambda j: one(xs[i], i, j))(jnp.arange(M + 1))
        err = jax.vmap(_per_sample_l2)(out, xs).mean(-1)
        return jnp.where(jnp.arange(M + 1) > i, err, jnp.inf)

    return jax.lax.map(row, jnp.arange(M + 1))


_gits_costs = jax.jit(_gits_costs_impl, static_argnames=("solver", "nfe_step"))


def gits_path(cost, num_steps: int):
    """The indices ``0 = k_0 < k_1 < ... < k_N = M`` minimizing ``sum_n cost[k_{n-1}, k_n]``
    (dynamic programming, O(N M^2)); returns ``(indices, total)``."""
    C = np.asarray(cost, np.float64)
    M = C.shape[0] - 1
    if C.shape != (M + 1, M + 1):
        raise ValueError(f"cost must be square, got {C.shape}")
    if not 1 <= num_steps <= M:
        raise ValueError(f"num_steps must be in 1..{M} (the fine grid's intervals), got {num_steps}")
    D = np.full((num_steps + 1, M + 1), np.inf)
    arg = np.zeros((num_steps + 1, M + 1), np.int64)
    D[0, 0] = 0.0
    for k in range(1, num_steps + 1):
        tot = D[k - 1][:, None] + C  # [i, j]
        arg[k] = np.argmin(tot, axis=0)
        D[k] = tot[arg[k], np.arange(M + 1)]
    path = [M]
    for k in range(num_steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return path[::-1], float(D[num_steps, M])


def gits(
    solver,
    denoiser,
    x_T,
    nfe: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    fine_steps: int = 100,
    fine_kind: str = "auto",
    teacher=None,
    step_solver=None,
    cond=None,
) -> GridFit:
    """A grid by dynamic programming over a fine teacher trajectory (GITS; Chen et al.,
    "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024).

    The teacher (default DPM-Solver++(3M)) runs over a fine grid of ``fine_steps``
    intervals from the noises ``x_T``; :func:`gits_costs` measures the error of one step
    of ``step_solver`` (default: ``solver``, or DDIM for a solver that cannot take a
    single step) between every pair of fine points from the
    teacher's states, and :func:`gits_path` picks the ``N`` steps (``N`` intervals of
    ``solver`` for ``nfe`` calls) of least total cost. No gradients; the grid's points
    are points of the fine grid.

    Raises:
      ValueError: ``nfe`` below the solver's minimum, ``fine_steps < N``, empty or
        non-finite noises.
    """
    from jdiff import solvers as S
    from jdiff._grid import time_grid
    from jdiff._sample import sample

    process = denoiser.process
    N = _check_steps(solver, nfe)
    x_T = _check_noise(x_T, "x_T")
    if not isinstance(fine_steps, (int, np.integer)) or fine_steps < N:
        raise ValueError(f"fine_steps must be an int >= the {N} steps of the grid, got {fine_steps!r}")
    t0, t1 = _ends(process, t_start, t_end)
    if fine_kind == "auto":
        fine_kind = "logsnr" if grid_space(process, t0, t1) == "logsnr" else "uniform"
    if fine_kind == "uniform":  # also down to t_data, which time_grid reaches only with final="data"
        fine = jnp.asarray(np.linspace(t0, t1, int(fine_steps) + 1), jnp.float32)
    else:
        fine = time_grid(process, int(fine_steps), kind=fine_kind, t_start=t0, t_end=t1)
    start = time.perf_counter()
    teacher = S.dpm_solver_pp(3) if teacher is None else teacher
    _, info = sample(teacher, denoiser, x_T, fine, return_info=True, trajectory=True, cond=cond)
    if step_solver is None:  # a solver that cannot take one step alone (iPNDM-k) is costed by its DDIM start
        step_solver = solver if solver.min_steps <= 1 else S.ddim()
    if step_solver.min_steps > 1:
        raise ValueError(f"step_solver {step_solver.name} cannot take a single step; pass step_solver=ddim()")
    cost = gits_costs(step_solver, denoiser, fine, info.xs, cond=cond)
    path, total = gits_path(cost, N)
    grid = np.asarray(fine, np.float64)[path]
    grid[0], grid[-1] = np.float32(t0), np.float32(t1)
    return GridFit(grid=grid, method="gits", history=[total], seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------- DMN
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def _lagrange_weights(nodes, a, b):
    """``int_a^b e^l L_j(l) dl`` for the Lagrange basis ``L_j`` on ``nodes`` (Gauss-Legendre,
    16 points: exact to rounding for the smooth integrands of a step)."""
    nodes = jnp.asarray(nodes)
    k = nodes.shape[0]
    w = _step_weights(nodes[None], jnp.reshape(a, (1,)), jnp.reshape(b, (1,)), np.ones((1, k), bool))
    return w[0]


def _step_weights(nodes, a, b, mask):
    """Vectorized :func:`_lagrange_weights`: ``nodes`` ``(S, K)`` (entries where ``mask``
    is False are ignored), intervals ``[a_s, b_s]``; returns ``(S, K)`` (0 where masked)."""
    dt = nodes.dtype
    x = 0.5 * (b - a)[:, None] * jnp.asarray(_GL_X, dt) + 0.5 * (a + b)[:, None]  # (S, Q)
    w = 0.5 * (b - a)[:, None] * jnp.asarray(_GL_W, dt)
    K = nodes.shape[1]
    other = mask[:, None, :] & mask[:, :, None] & ~np.eye(K, dtype=bool)[None]  # (S, j, m): factors of L_j
    den = jnp.where(other, nodes[:, :, None] - nodes[:, None, :], 1.0)  # (S, j, m)
    num = jnp.where(other[..., None], x[:, None, None, :] - nodes[:, None, :, None], 1.0)  # (S, j, m, Q)
    L = jnp.prod(num / den[..., None], axis=2)  # (S, j, Q)
    out = jnp.sum(w[:, None, :] * jnp.exp(x)[:, None, :] * L, axis=-1)
    return jnp.where(mask, out, 0.0)


def dmn_objective(process, lambdas, order: int = 3, warmup: int = 3):
    """The bound of Xue et al. ("Accelerating Diffusion Sampling with Optimized Time
    Steps", CVPR 2024, Sec. 3) on the error of a multistep data-prediction solver over
    the log-SNR points ``lambdas`` (increasing, ``N + 1`` of them).

    Step ``n`` (``lambda_n -> lambda_{n+1}``) replaces ``x0(lambda)`` in
    ``int e^lambda x0 dlambda`` by its Lagrange interpolant through the last ``k``
    nodes (``k = min(order, n + 1, N - n)``: warm-up and lower order at the end), so a
    model error ``delta_m`` at node ``m`` enters the result with the weight
    ``J_{n,m} = int e^lambda L_m``. The model's x0 error at node ``m`` is taken as
    ``c * sigma_m^2 / alpha_m`` (the paper's assumption; ``c`` does not change the
    minimizer). The first ``warmup`` steps add the Euclidean norm of their weighted
    errors; the later ones add up the signed weights per node and the bound adds the
    absolute values. This is the objective of the paper's released code
    (``scxue/DM-NonUniform``) written for any order and process; the paper minimizes it
    with a constrained trust-region method, :func:`dmn` with Adam on the softmax
    parameterization (no constraint needed). All steps are computed at once, in one
    compiled program per (process, order, number of points).
    """
    return _dmn_objective(process, jnp.asarray(lambdas), order=int(order), warmup=int(warmup))


def _dmn_objective_impl(process, lam, *, order, warmup):
    lam = jnp.asarray(lam)
    N = lam.shape[0] - 1
    t = process.t_of_lambda(lam)
    err = process.sigma(t) ** 2 / process.alpha(t)
    K = max(1, min(order, N))
    n = np.arange(N)
    k = np.minimum(np.minimum(order, n + 1), N - n)  # nodes per step (static)
    j = np.arange(K)
    mask = j[None] < k[:, None]
    idx = np.where(mask, n[:, None] - (k[:, None] - 1) + j[None], 0)  # nodes n-k+1..n
    J = _step_weights(lam[idx], lam[:-1], lam[1:], mask) * err[idx]  # (N, K)
    warm = n < warmup
    total = jnp.sum(jnp.where(warm, jnp.sqrt(jnp.sum(J * J, -1)), 0.0))
    late = jnp.where((~warm)[:, None] & mask, J, 0.0)
    per_node = jnp.zeros((N + 1,), J.dtype).at[idx.ravel()].add(late.ravel())
    return total + jnp.sum(jnp.abs(per_node))


_dmn_objective = jax.jit(_dmn_objective_impl, static_argnames=("order", "warmup"))


def _dmn_lams(z, l0, l1):
    c = jnp.cumsum(jax.nn.softmax(z))[:-1]
    return jnp.concatenate([jnp.reshape(l0, (1,)), l0 + (l1 - l0) * c, jnp.reshape(l1, (1,))]).astype(z.dtype)


def _dmn_fit_impl(process, z, l0, l1, lr, *, order, iters):
    """``iters`` Adam steps on :func:`dmn_objective` under ``lax.scan``; returns the logits
    of the lowest bound and the bound's history."""
    b1, b2, eps = 0.9, 0.999, 1e-8

    def body(carry, k):
        z, m, v, best_v, best_z = carry
        val, g = jax.value_and_grad(
            lambda z: _dmn_objective_impl(process, _dmn_lams(z, l0, l1), order=order, warmup=3)
        )(z)
        better = jnp.isfinite(val) & (val < best_v)
        best_v, best_z = jnp.where(better, val, best_v), jnp.where(better, z, best_z)
        c = (k + 1).astype(z.dtype)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        z = z - lr * (m / (1 - b1**c)) / (jnp.sqrt(v / (1 - b2**c)) + eps)
        return (z, m, v, best_v, best_z), val

    zeros = jnp.zeros_like(z)
    (_, _, _, _, best), hist = jax.lax.scan(
        body, (z, zeros, zeros, jnp.asarray(jnp.inf, z.dtype), z), jnp.arange(iters)
    )
    return best, hist


_dmn_fit = jax.jit(_dmn_fit_impl, static_argnames=("order", "iters"))


def dmn(
    process,
    num_steps: int,
    *,
    order: int = 3,
    t_start: float | None = None,
    t_end: float | None = None,
    init: str = "logsnr",
    iters: int = 500,
    learning_rate: float = 0.05,
) -> GridFit:
    """A grid of ``num_steps`` intervals whose interior log-SNR points minimize
    :func:`dmn_objective` (Xue et al., CVPR 2024), without any model call.

    The points are :func:`grid_from_logits` in log-SNR (so ordered by construction), the
    logits fitted by Adam (float64 when ``jax_enable_x64`` is on), started from the
    ``init`` grid kind. ``order`` is the solver's multistep order (3 for UniPC-3 /
    DPM-Solver++(3M), as in the paper).

    Raises:
      ValueError: ``num_steps < 1``, ``order`` not in 1..3, an end point with infinite
        log-SNR (e.g. rectified flow's ``t = 1``: pass a smaller ``t_start``).
    """
    from jdiff._grid import time_grid

    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    t0, t1 = _ends(process, t_start, t_end)
    if grid_space(process, t0, t1) != "logsnr":
        raise ValueError(
            f"dmn works in log-SNR, which is infinite at t_start={t0} or t_end={t1} for {process!r}: "
            "pass finite end points"
        )
    g0 = np.asarray(time_grid(process, int(num_steps), kind=init, t_start=t0, t_end=t1), np.float64)
    logits0 = logits_from_grid(process, g0, "logsnr")
    dt = jnp.asarray(1.0).dtype.type  # float64 under jax_enable_x64
    l0, l1 = (float(v) for v in np.asarray(process.lambda_(jnp.asarray([t0, t1], dt)), np.float64))

    start = time.perf_counter()
    best, hist = _dmn_fit(
        process,
        jnp.asarray(logits0, dt),
        jnp.asarray(l0, dt),
        jnp.asarray(l1, dt),
        dt(learning_rate),
        order=order,
        iters=int(iters),
    )
    hist = [float(v) for v in np.asarray(hist)]
    grid = np.array(process.t_of_lambda(_dmn_lams(best, l0, l1)), np.float64)
    grid[0], grid[-1] = np.float32(t0), np.float32(t1)
    return GridFit(grid=grid, method="dmn", history=hist, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------- grid files
def model_fingerprint(denoiser) -> str:
    """A short hash of what the denoiser computes: its parameters (a
    :class:`~jdiff.Denoiser`'s ``params``, a testbed's mixture) and its process.

    Raises:
      TypeError: for an object whose parameters cannot be found (pass ``model=`` by hand).
    """
    from jdiff.runs import flatten_params

    h = hashlib.sha256()
    inner = denoiser
    while hasattr(inner, "inner") and not hasattr(inner, "params"):
        h.update(type(inner).__name__.encode())  # a wrapper (guidance): its kind and scale count
        scale = getattr(inner, "scale", None)
        if scale is not None and np.ndim(scale) == 0 and not isinstance(scale, jax.core.Tracer):
            h.update(repr(float(scale)).encode())
        inner = inner.inner
    mix = getattr(inner, "mixture", None)
    if mix is not None:
        for a in (mix.weights, mix.means, mix.stds):
            h.update(np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    elif getattr(inner, "params", None) is not None:
        for k, v in sorted(flatten_params(inner.params).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    else:
        raise TypeError(f"cannot fingerprint a {type(denoiser).__name__}: pass model='<an id>' explicitly")
    h.update(repr(denoiser.process).encode())
    return h.hexdigest()[:16]


def save_grids(path: str, entries: Sequence[dict], *, model: str, process) -> None:
    """Write grids to a JSON file tied to ``model`` (an id, e.g. :func:`model_fingerprint`)
    and ``process``. Each entry holds ``solver`` (a registry name), ``nfe``, ``grid`` and
    optionally ``method``, ``net_grid`` (LD3's decoupled network times, same length as
    ``grid``) and measured errors. Entries of an existing file for the same
    model and process are kept unless replaced (same solver and NFE).

    Raises:
      ValueError: an existing file for another model or process, a grid that is not
        strictly decreasing or not finite.
    """
    old = []
    if os.path.exists(path):
        data = read_grids(path)
        if data["model"] != model or data["process"] != repr(process):
            raise ValueError(
                f"{path} holds grids for model {data['model']} / {data['process']}, not {model} / {process!r}: "
                "choose another file"
            )
        old = data["grids"]
    new = []
    for e in entries:
        g = np.asarray(e["grid"], np.float64)
        if g.ndim != 1 or g.size < 2 or not np.all(np.isfinite(g)) or not np.all(np.diff(g) < 0):
            raise ValueError(f"grid for {e.get('solver')} nfe {e.get('nfe')} is not strictly decreasing: {g}")
        row = dict(e, solver=str(e["solver"]), nfe=int(e["nfe"]), grid=[float(v) for v in g])
        if e.get("net_grid") is not None:
            ng = np.asarray(e["net_grid"], np.float64)
            if ng.shape != g.shape or not np.all(np.isfinite(ng)):
                raise ValueError(
                    f"net_grid for {e.get('solver')} nfe {e.get('nfe')} must be finite and of the grid's shape "
                    f"{g.shape}, got {ng.tolist()}"
                )
            row["net_grid"] = [float(v) for v in ng]
        new.append(row)
    keys = {(e["solver"], e["nfe"]) for e in new}
    merged = [e for e in old if (e["solver"], e["nfe"]) not in keys] + new
    out = {"format": FORMAT, "version": 1, "model": model, "process": repr(process), "grids": merged}
    tmp = path + ".tmp"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def read_grids(path: str) -> dict:
    """The raw content of a grid file (checked for its format)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no grid file at {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read grid file {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("grids"), list):
        raise ValueError(f"{path} is not a jdiff grid file")
    return data


def load_grid(
    path: str, *, denoiser=None, model: str | None = None, process=None, solver, nfe: int, with_net: bool = False
):
    """The grid stored in ``path`` for ``solver`` at ``nfe``, checked against the model.

    Args:
      path: a file written by :func:`save_grids` / :func:`tune`.
      denoiser: the model it will be used with (its :func:`model_fingerprint` and
        process are checked); or give ``model`` and ``process``.
      solver: a :class:`~jdiff.solvers.Solver` or registry name.
      nfe: the number of model calls.
      with_net: also return the stored network times (None when the entry has none).

    Returns:
      A float32 ``jnp`` array, usable as ``jdiff.sample(solver, denoiser, x_T, grid)``;
      with ``with_net``, ``(grid, net_grid)``: a ``net_grid`` is used through
      ``jdiff.wrappers.network_time(denoiser, grid, net_grid)``.

    Raises:
      ValueError: the file was made for another model or process, or holds no grid for
        this solver and NFE (the message lists those it holds).
    """
    from jdiff import solvers as S

    data = read_grids(path)
    if denoiser is not None:
        model = model_fingerprint(denoiser) if model is None else model
        process = denoiser.process if process is None else process
    if model is None or process is None:
        raise ValueError("give the denoiser (or model and process) the grid is for")
    if data["model"] != model:
        raise ValueError(f"{path} was made for model {data['model']}, not {model}")
    if data["process"] != repr(process):
        raise ValueError(f"{path} was made for process {data['process']}, not {process!r}")
    name = (S.get(solver) if isinstance(solver, str) else solver).name
    for e in data["grids"]:
        if e["solver"] == name and int(e["nfe"]) == int(nfe):
            grid = jnp.asarray(e["grid"], jnp.float32)
            if not with_net:
                return grid
            net = e.get("net_grid")
            return grid, None if net is None else jnp.asarray(net, jnp.float32)
    have = ", ".join(f"{e['solver']}@{e['nfe']}" for e in data["grids"])
    raise ValueError(f"{path} has no grid for {name} at nfe {nfe}; it has: {have}")


# ---------------------------------------------------------------------------- tune
def tune(
    denoiser,
    solver,
    nfes: Sequence[int],
    *,
    shape: Sequence[int],
    method: str = "ld3",
    num_train: int = 100,
    num_val: int = 100,
    seed: int = 0,
    teacher: Callable | None = None,
    num_classes: int = 0,
    baseline_kind: str = "default",
    out: str | None = None,
    model: str | None = None,
    progress: bool = True,
    **options,
) -> list[dict]:
    """Fit, evaluate and (optionally) save a grid per NFE for ``denoiser`` and ``solver``.

    Noises come from the process's prior (training: ``seed``; validation: ``seed + 1``,
    held out). The teacher maps noises at ``t_max`` to their end states at ``t_min``
    (default :func:`teacher_solve`, 200 DPM-Solver++(3M) steps). Each grid is evaluated
    on the held-out noises as the mean L2 distance to the teacher, next to the same
    solver on the fixed grid of kind ``baseline_kind``.

    Args:
      denoiser: the model.
      solver: a deterministic solver or registry name.
      nfes: the NFEs to fit.
      shape: the shape of one sample.
      method: ``"ld3"``, ``"gits"`` or ``"dmn"``.
      num_train, num_val: training and held-out noises.
      teacher: ``(x_T, cond) -> x_end`` (default: :func:`teacher_solve`).
      num_classes: for a class-conditional model, sample ``i`` gets the int32 label
        ``i % num_classes`` as ``cond`` (0: no conditioning).
      out: a JSON file to save the grids to (:func:`save_grids`).
      model: the model id stored in the file (default :func:`model_fingerprint`).
      progress: a progress bar on stderr.
      options: passed to the method (:func:`ld3`, :func:`gits`, :func:`dmn`).

    Returns:
      One dict per NFE: ``solver``, ``nfe``, ``method``, ``grid`` (and ``net_grid`` for
      LD3 with ``decouple``), ``err`` (held-out mean L2 to the teacher), ``err_baseline``,
      ``seconds``.

    Raises:
      ValueError: before any fitting, for an unknown method or solver, an NFE below the
        solver's minimum, an empty noise set, a non-finite teacher output.
    """
    from tqdm.auto import tqdm

    from jdiff import solvers as S
    from jdiff._grid import time_grid

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(solver, str):
        solver = S.get(solver)
    nfes = list(nfes)
    if not nfes:
        raise ValueError("give at least one NFE")
    steps = {int(n): _check_steps(solver, n) for n in nfes}
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int (a non-empty noise set), got {v!r}")
    process = denoiser.process
    if method == "dmn" and grid_space(process, process.t_max, process.t_min) != "logsnr":
        raise ValueError(f"method 'dmn' needs finite log-SNR at both ends of {process!r}")
    if out is not None and model is None:
        model = model_fingerprint(denoiser)
    shape = tuple(int(s) for s in shape)
    x_tr = process.prior_sample(jax.random.key(seed), (int(num_train), *shape))
    x_va = process.prior_sample(jax.random.key(seed + 1), (int(num_val), *shape))
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")

    def labels(n):
        return jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None

    c_tr, c_va = labels(int(num_train)), labels(int(num_val))
    teach = teacher or (lambda x, c: teacher_solve(denoiser, x, cond=c))
    y = jnp.asarray(teach(jnp.concatenate([x_tr, x_va]), labels(int(num_train) + int(num_val))))  # one program
    y_tr, y_va = y[: int(num_train)], y[int(num_train) :]
    for name, y in (("teacher (training)", y_tr), ("teacher (held out)", y_va)):
        if not bool(jnp.all(jnp.isfinite(y))):
            raise ValueError(f"the {name} output has non-finite values")
    rows = []
    bar = tqdm(nfes, desc=f"tune {method} {solver.name}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for nfe in bar:
        N = steps[int(nfe)]
        use_nfe = _nfe_arg(solver, nfe)
        if method == "ld3":
            fit = ld3(solver, denoiser, x_tr, y_tr, int(nfe), cond=c_tr, **options)
        elif method == "gits":
            fit = gits(solver, denoiser, x_tr, int(nfe), cond=c_tr, **options)
        else:
            fit = dmn(process, N, **options)
        base = time_grid(process, N, kind=baseline_kind)
        row = dict(
            solver=solver.name,
            nfe=int(nfe),
            method=method,
            grid=[float(v) for v in fit.grid],
            err=grid_error(solver, fit.denoiser(denoiser), x_va, y_va, fit.grid, nfe=use_nfe, cond=c_va),
            err_baseline=grid_error(solver, denoiser, x_va, y_va, base, nfe=use_nfe, cond=c_va),
            baseline_kind=baseline_kind,
            seconds=round(fit.seconds, 3),
        )
        if fit.net_grid is not None:
            row["net_grid"] = [float(v) for v in fit.net_grid]
        bar.set_postfix_str(f"nfe {nfe}: {row['err']:.3g} vs {row['err_baseline']:.3g}")
        rows.append(row)
    bar.close()
    if out is not None:
        save_grids(out, rows, model=model, process=process)
    return rows


def _brute_force_path(cost, num_steps):
    """Exhaustive search for :func:`gits_path` (tests)."""
    C = np.asarray(cost, np.float64)
    M = C.shape[0] - 1
    best = (np.inf, None)
    for inner in itertools.combinations(range(1, M), num_steps - 1):
        p = (0, *inner, M)
        c = sum(C[a, b] for a, b in zip(p[:-1], p[1:]))
        if c < best[0]:
            best = (c, list(p))
    return best[1], best[0]
