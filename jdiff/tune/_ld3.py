"""LD3: a grid learned by gradient descent through the sampler (Tong et al., ICLR 2025)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._grid import time_grid
from jdiff._sample import sample
from jdiff.tune._grids import (
    GridFit,
    _check_noise,
    _check_steps,
    _ends,
    _flags,
    _nfe_arg,
    _to_data,
    default_keep,
    grid_from_logits,
    grid_space,
    logits_from_grid,
    net_grid_from,
)
from jdiff.tune._programs import Bounded
from jdiff.wrappers import network_time


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
    keep: str = "auto",
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
      t_start, t_end: the grid's end points (default ``t_max``, ``t_min``). ``t_end``
        may be the data (the process's ``t_data``, e.g. ``0.0``): the interior points
        then stay in ``[t_min, t_start]`` (:func:`grid_from_logits`), and the initial
        grid kind ends with ``final="data"``.
      init: the initial grid: a kind of :func:`jdiff.time_grid` or an array.
      space: ``"logsnr"``, ``"t"`` or ``"auto"`` (:func:`grid_space`).
      iters: Adam steps; learning_rate: its step size.
      slack: the radius of the start ball relative to ``|x_T|`` (0: plain LD3 loss).
      decouple: with ``decouple > 0``, also learn the network's times (LD3's second set
        of times, in its released code): each interior network time moves within
        ``decouple`` times its smaller neighbouring interval (:func:`net_grid_from`, at most
        0.5); the fit's ``net_grid`` is used through :func:`jdiff.wrappers.network_time`
        (``GridFit.denoiser``). 0: the network runs at the grid's times.
      keep: the prediction the decoupled network call keeps (``"eps"`` or ``"x0"``;
        ``"auto"``: :func:`default_keep`, the one the solver's update integrates).
      batch_size: noises per step (0: all; else a random subset per step, from ``seed``).
      seed: the PRNG seed of the batches (fitting is deterministic for a seed).
      cond: per-sample conditioning (array leaves with leading axis ``n``), e.g. labels.

    Returns:
      A :class:`GridFit`.

    Raises:
      ValueError: ``nfe`` below the solver's minimum, empty or non-finite noises,
        mismatched shapes, bad settings (before any fitting).
    """
    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    N = _check_steps(solver, nfe, **dict(zip(("to_data", "from_noise"), _flags(process, t0, t1))))
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
    if keep == "auto":
        keep = default_keep(solver)
    if keep not in ("eps", "x0"):
        raise ValueError(f"keep must be 'auto', 'eps' or 'x0', got {keep!r}")
    to_data = _to_data(process, t1)
    if space == "auto":
        space = grid_space(process, t0, t1)
    if space == "logsnr" and grid_space(process, t0, t1) != "logsnr":
        end = f"t_min={process.t_min}" if to_data else f"t_end={t1}"
        raise ValueError(f"space='logsnr' needs finite log-SNR at t_start={t0} and {end}; use space='t'")
    if isinstance(init, str):
        kind = init
        if kind == "logsnr" and space == "logsnr" and not to_data:
            g0 = None
        else:
            if kind == "logsnr" and space == "t":
                kind = "uniform"
            ends = dict(final="data") if to_data else dict(t_end=t1)
            g0 = np.asarray(time_grid(process, N, kind=kind, t_start=t0, **ends), np.float64)
    else:
        g0 = np.asarray(init, np.float64)
        if g0.shape != (N + 1,) or np.float32(g0[0]) != np.float32(t0) or np.float32(g0[-1]) != np.float32(t1):
            raise ValueError(f"init must be a grid of {N + 1} points from {t0} to {t1}, got {g0.tolist()}")
        process.check_times(g0, allow_data=to_data, what="init grid times")
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
    process = denoiser.process
    n = x_train.shape[0]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def loss_fn(p, idx):
        grid = grid_from_logits(process, p["logits"], t0, t1, space)
        den = denoiser
        if window > 0:
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


_ld3_fit = Bounded(
    jax.jit(
        _ld3_fit_impl,
        static_argnames=("solver", "space", "t0", "t1", "bs", "use_slack", "iters", "nfe", "window", "keep"),
    )
)
