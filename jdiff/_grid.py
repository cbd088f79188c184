"""Time grids for sampling.

A grid is a decreasing array ``t_0 = t_start > t_1 > ... > t_N``: data, not Python
state, so one compiled sampler serves every grid of the same length. Spacings:

- ``"uniform"``: uniform in t (diffusers' "linspace"; the flow-matching default).
- ``"logsnr"``: uniform in ``lambda = log(alpha / sigma)`` (DPM-Solver's
  ``time_uniform_lambda``, its recommendation for low-resolution data).
- ``"quadratic"``: uniform in ``sqrt(t)`` (DDIM / DPM-Solver ``time_quadratic``).
- ``"karras"``: uniform in ``rho^(1/p)`` for ``rho = sigma / alpha`` with ``p = 7``
  (Karras et al., NeurIPS 2022, Eq. 5), for any process.

``final="data"`` ends the grid at the time where ``sigma = 0``, so the last step goes
straight to x0 (first order, no extra call). Uniform and quadratic grids (in t) then
space all ``num_steps + 1`` points down to that time, as flow-matching samplers do
(unless ``t_end`` is given); logSNR and Karras grids, which cannot reach infinite
log-SNR, space ``num_steps`` points down to ``t_end`` and append it (diffusers'
``final_sigmas_type="zero"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._process import Process

__all__ = ["time_grid", "GRID_KINDS", "default_grid_kind"]

GRID_KINDS = ("uniform", "logsnr", "quadratic", "karras")


def default_grid_kind(process: Process) -> str:
    """The process's own default (``process.default_grid``): Karras spacing for EDM and
    VE, uniform t for rectified flow, logSNR otherwise."""
    return process.default_grid


# one compiled program per grid length instead of one per elementwise op
_t_of_lambda = jax.jit(lambda process, lam: process.t_of_lambda(lam))


def time_grid(process: Process, num_steps: int | None = None, **kw):
    """Build a time grid of ``num_steps`` intervals (``num_steps + 1`` points).

    Args:
      process: the process whose times the grid holds.
      num_steps: number of intervals; or give ``nfe`` and ``solver`` to derive it from
        the solver's model calls per step (``solver.num_steps(nfe, ...)``).
      kind: ``"uniform"``, ``"logsnr"``, ``"quadratic"``, ``"karras"`` or
        ``"default"`` (:func:`default_grid_kind`).
      t_start, t_end: first and last spaced times (default ``t_max`` and ``t_min``).
      final: ``"t_min"`` to end at ``t_end``, ``"data"`` to end where sigma = 0.
      rho: the Karras exponent.
      dtype: dtype of the returned array.
    Returns:
      ``jnp`` array of shape ``(num_steps + 1,)``, decreasing. The grid depends only on
      these static arguments, so it is computed eagerly even inside ``jit``.
    """
    with jax.ensure_compile_time_eval():
        return _time_grid(process, num_steps, **kw)


def _time_grid(
    process: Process,
    num_steps: int | None = None,
    *,
    kind: str = "default",
    nfe: int | None = None,
    solver=None,
    t_start: float | None = None,
    t_end: float | None = None,
    final: str = "t_min",
    rho: float = 7.0,
    dtype=jnp.float32,
):
    if final not in ("t_min", "data"):
        raise ValueError(f"final must be 't_min' or 'data', got {final!r}")
    to_data = final == "data"
    if to_data and process.t_data is None:
        raise ValueError(f"{process!r} never reaches sigma = 0; use final='t_min' and denoise_to_zero=True")
    if num_steps is None:
        if nfe is None or solver is None:
            raise ValueError("give num_steps, or nfe together with solver")
        t_first = float(process.t_max if t_start is None else t_start)
        from_noise = float(process.alpha(jnp.asarray(t_first, jnp.float32))) == 0.0
        if int(nfe) != nfe or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        num_steps = solver.num_steps(int(nfe), to_data, from_noise)
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t0 = float(process.t_max if t_start is None else t_start)
    t1 = float(process.t_min if t_end is None else t_end)
    if not t0 > t1:
        raise ValueError(f"t_start ({t0}) must be larger than t_end ({t1})")
    process.check_times(np.array([t0, t1]), allow_data=False, what="grid end points")
    if kind == "default":
        kind = default_grid_kind(process)
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; expected one of {GRID_KINDS} or 'default'")
    straight = to_data and kind in ("uniform", "quadratic") and t_end is None
    if straight:
        t1 = float(process.t_data)
    n = num_steps if (not to_data or straight) else num_steps - 1
    if n == 0:
        ts = np.array([t0], np.float64)
    else:
        u = np.linspace(0.0, 1.0, n + 1)
        if kind == "uniform":
            ts = t0 + (t1 - t0) * u
        elif kind == "quadratic":
            ts = (np.sqrt(t0) + (np.sqrt(t1) - np.sqrt(t0)) * u) ** 2
        else:
            lam0, lam1 = (float(v) for v in np.asarray(process.lambda_(jnp.asarray([t0, t1], jnp.float32))))
            if not (np.isfinite(lam0) and np.isfinite(lam1)):
                raise ValueError(
                    f"a {kind!r} grid needs finite log-SNR at both ends; {process!r} has log-SNR "
                    f"{lam0} at t={t0} (zero terminal SNR?): pass a smaller t_start or use kind='uniform'"
                )
            if kind == "logsnr":
                lams = lam0 + (lam1 - lam0) * u
            else:
                r0, r1 = np.exp(-lam0) ** (1.0 / rho), np.exp(-lam1) ** (1.0 / rho)
                lams = -rho * np.log(r0 + (r1 - r0) * u)
            ts = np.asarray(_t_of_lambda(process, jnp.asarray(lams, jnp.float32)), np.float64)
            ts[0], ts[-1] = t0, t1
    if to_data and not straight:
        ts = np.concatenate([ts, [process.t_data]])
    return jnp.asarray(ts, dtype)
