"""Held-out validation of a fitted grid against the best fixed grid of the same solver
and NFE (:func:`validate`), used by :func:`jdiff.tune.tune`.

A fit learned on few training noises can lose on noises it never saw: one held-out noise
that ends in another mixture component dominates a mean. So every fit is scored on
held-out noises next to the fixed grids of :data:`FIXED_KINDS` (each a
``jdiff.time_grid`` of the same number of intervals and end points), and the fixed grid
with the lowest held-out mean is kept instead when the fit does not beat it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._grid import GRID_KINDS, time_grid
from jdiff._sample import sample
from jdiff.tune._grids import _per_sample_l2, _to_data, grid_space
from jdiff.tune._programs import Bounded

FIXED_KINDS = GRID_KINDS  # uniform, logsnr, quadratic, karras
FAR = 10.0  # a held-out noise is "far" beyond this many times the fixed grid's median error


def fixed_grids(process, num_steps: int, t_start: float, t_end: float, kinds=FIXED_KINDS) -> dict:
    """``{kind: grid}``: the ``jdiff.time_grid`` of each kind in ``kinds`` with
    ``num_steps`` intervals from ``t_start`` to ``t_end`` (``final="data"`` when
    ``t_end`` is the data); kinds that need a finite log-SNR (``logsnr``, ``karras``) are
    left out where it is infinite."""
    finite = grid_space(process, t_start, t_end) == "logsnr"
    ends = dict(final="data") if _to_data(process, t_end) else dict(t_end=t_end)
    return {
        k: time_grid(process, int(num_steps), kind=k, t_start=t_start, **ends)
        for k in kinds
        if finite or k in ("uniform", "quadratic")
    }


def heldout_errors(solver, denoiser, x_T, x_ref, grid, *, nfe=None, cond=None) -> np.ndarray:
    """``(n,)`` float64: the L2 distance of each sample of ``jdiff.sample(solver, denoiser,
    x_T, grid)`` to its reference ``x_ref``. One compiled program per solver, NFE,
    denoiser structure and shapes (the grid is data), kept in a bounded cache."""
    args = (denoiser, jnp.asarray(x_T), jnp.asarray(x_ref, jnp.float32), jnp.asarray(grid, jnp.float32), cond)
    if _jittable(args):
        return np.asarray(_errors(*args, solver=solver, nfe=nfe), np.float64)
    return np.asarray(_errors_impl(*args, solver=solver, nfe=nfe), np.float64)


def _errors_impl(denoiser, x_T, x_ref, grid, cond, *, solver, nfe):
    x = sample(solver, denoiser, x_T, grid, nfe=nfe, cond=cond)
    return _per_sample_l2(x.astype(jnp.float32), x_ref)


_errors = Bounded(jax.jit(_errors_impl, static_argnames=("solver", "nfe")))


def _jittable(tree) -> bool:
    """Whether every leaf can be a ``jit`` argument (else the same body runs uncompiled)."""
    kinds = (jax.Array, np.ndarray, np.generic, int, float, complex, bool)
    return all(isinstance(a, kinds) or hasattr(a, "__jax_array__") for a in jax.tree.leaves(tree))


def summary(errors, far_limit: float) -> dict:
    """``{"mean", "median", "far"}`` of per-noise errors; ``far`` counts the errors above
    ``far_limit`` (non-finite errors count as far and make the mean infinite)."""
    e = np.where(np.isfinite(errors), np.asarray(errors, np.float64), np.inf)
    return dict(mean=float(np.mean(e)), median=float(np.median(e)), far=int(np.sum(e > far_limit)))


def validate(fit_errors, fixed_errors: dict, *, far: float = FAR) -> dict:
    """Compare a fit with the fixed grids on the same held-out noises.

    Args:
      fit_errors: ``(n,)`` the fitted grid's per-noise errors (:func:`heldout_errors`).
      fixed_errors: ``{kind: (n,) errors}`` of the fixed grids.
      far: a held-out noise ends *far* from its teacher when its error exceeds ``far``
        times the median error of the best fixed grid (the fixed grid of lowest mean).

    Returns:
      ``{"num", "far_factor", "far_limit", "fit": summary, "fixed": dict(summary,
      kind=...), "kept": "fit" | "fixed"}``: the fit is kept only when its held-out
      mean error is lower than the best fixed grid's.
    """
    if not fixed_errors:
        raise ValueError("no fixed grid to validate against")
    if not (np.isfinite(far) and far > 0):
        raise ValueError(f"far must be a positive number, got {far!r}")
    means = {k: summary(v, np.inf)["mean"] for k, v in fixed_errors.items()}
    kind = min(means, key=lambda k: (means[k], k))
    limit = float(far * np.median(fixed_errors[kind]))
    fit, fixed = summary(fit_errors, limit), dict(summary(fixed_errors[kind], limit), kind=kind)
    return dict(
        num=int(np.size(fit_errors)),
        far_factor=float(far),
        far_limit=limit,
        fit=fit,
        fixed=fixed,
        kept="fit" if fit["mean"] < fixed["mean"] else "fixed",
    )


def verdict(solver_name: str, nfe: int, method: str, v: dict) -> str:
    """The one line that says which grid is kept and why."""
    f, b = v["fit"], v["fixed"]
    nums = (
        f"held-out mean {f['mean']:.4g} / median {f['median']:.4g} / {f['far']} far of {v['num']}, "
        f"vs the fixed {b['kind']} grid's {b['mean']:.4g} / {b['median']:.4g} / {b['far']} far"
    )
    if v["kept"] == "fit":
        return f"{solver_name} nfe {nfe}: the {method} grid is kept ({nums})"
    head = f"{solver_name} nfe {nfe}: the {method} grid does not beat the fixed {b['kind']} grid"
    return f"{head}; keeping the fixed grid ({nums})"
