"""Guidance scales: a number, one per sample, a callable of ``t`` or a :func:`schedule`
(values on a time grid, interpolated), checked when concrete and at run time when
traced."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._param import TreeValue, _FnKey, broadcast_to_x

__all__ = ["Schedule", "schedule"]


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule(TreeValue):
    """A guidance scale given on a time grid: ``values[k]`` at ``times[k]``, linear in
    between (``jnp.interp``) and constant beyond the ends. Build with :func:`schedule`."""

    times: Any
    values: Any

    def __call__(self, t):
        ts, vs = jnp.asarray(self.times), jnp.asarray(self.values)
        flip = ts[0] > ts[-1]  # a decreasing (sampling) grid: searchsorted needs increasing points
        ts, vs = jnp.where(flip, ts[::-1], ts), jnp.where(flip, vs[::-1], vs)
        t = jnp.clip(jnp.asarray(t, ts.dtype), ts[0], ts[-1])
        if ts.shape[0] == 1:
            return jnp.broadcast_to(vs[0], t.shape)
        # v_i + frac (v_{i+1} - v_i) with t_i <= t: exactly v_i at a grid point and
        # exactly v when the neighbours are equal (a schedule of ones is neutral)
        i = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, ts.shape[0] - 2)
        frac = (t - ts[i]) / (ts[i + 1] - ts[i])
        return vs[i] + frac * (vs[i + 1] - vs[i])


jax.tree_util.register_dataclass(Schedule, data_fields=["times", "values"], meta_fields=[])


def schedule(times, values) -> Schedule:
    """A guidance scale that varies with time, given on a grid (e.g. the sampling grid
    from :func:`jdiff.time_grid`): exact at the grid points, piecewise linear in ``t``
    between them (a solver's intermediate evaluations) and constant beyond the ends.

    Args:
      times: ``(K,)`` strictly monotone times (increasing or decreasing).
      values: ``(K,)`` finite scales.

    Returns:
      A :class:`Schedule`, usable as the ``scale`` of every wrapper in this module.

    Raises:
      ValueError: shapes that are not ``(K,)`` alike with ``K >= 1``, non-finite
        entries or times that are not strictly monotone (checked when concrete).
    """
    ts, vs = jnp.asarray(times), jnp.asarray(values)
    if ts.ndim != 1 or vs.shape != ts.shape or ts.shape[0] < 1:
        raise ValueError(f"a schedule needs times and values of one shape (K,), got {ts.shape} and {vs.shape}")
    t_np, v_np = concrete(ts), concrete(vs)
    if t_np is not None:
        if not np.all(np.isfinite(t_np)):
            raise ValueError(f"schedule times must be finite, got {t_np.tolist()[:8]}")
        d = np.diff(t_np.astype(np.float64))
        if not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError(f"schedule times must be strictly monotone, got {t_np.tolist()[:8]}")
    if v_np is not None and not np.all(np.isfinite(v_np)):
        raise ValueError(f"a guidance scale must be finite, got schedule values {v_np.tolist()[:8]}")
    if t_np is None:  # traced: the same checks at run time
        d = jnp.diff(ts)
        ts = error_if(ts, ~jnp.all(jnp.isfinite(ts)), "schedule times must be finite (got NaN or inf)")
        ts = error_if(ts, ~(jnp.all(d > 0) | jnp.all(d < 0)), "schedule times must be strictly monotone")
    if v_np is None:
        msg = "a guidance scale must be finite (got NaN or inf schedule values)"
        vs = error_if(vs, ~jnp.all(jnp.isfinite(vs)), msg)
    if not jnp.issubdtype(vs.dtype, jnp.floating):
        vs = vs.astype(jnp.float32)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.float32)
    return Schedule(ts, vs)


def _split_scale(scale, what="scale"):
    """``(scale leaf, scale function key)``: a callable that is not a pytree value goes to
    the static part (compared like a denoiser's ``apply_fn``); numbers are checked now."""
    if isinstance(scale, Schedule):
        return scale, None
    if callable(scale) and not hasattr(scale, "__jax_array__"):
        return None, _FnKey(scale)
    if isinstance(scale, bool) or scale is None:
        raise TypeError(f"the guidance {what} must be a number, an array, a callable of t or a schedule, got {scale!r}")
    a = concrete(scale)
    if a is not None:
        if not np.issubdtype(a.dtype, np.number) or a.ndim > 1:
            raise ValueError(f"the guidance {what} must be a number or one per sample (B,), got {scale!r}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"the guidance {what} must be finite, got {a.tolist()}")
        return scale, None
    # traced (built inside the caller's jit): the same checks, the value one at run time
    if not jnp.issubdtype(scale.dtype, jnp.number) or scale.ndim > 1:
        raise ValueError(f"the guidance {what} must be a number or one per sample (B,), got {scale!r}")
    return error_if(scale, ~jnp.isfinite(scale), f"the guidance {what} must be finite (got NaN or inf)"), None


def _scale_at(scale, fn, t, x, what="scale"):
    """The scale at time ``t`` (scalar or ``(B,)``) in the predictions' dtype (at least
    float32), as a scalar or broadcast against ``x``; checked before any network call."""
    dt = jnp.result_type(x.dtype, jnp.float32)
    if fn is not None:
        w = jnp.asarray(fn.fn(t), dt)
        w = error_if(w, ~jnp.all(jnp.isfinite(w)), f"the guidance {what} callable returned a non-finite value")
    elif isinstance(scale, Schedule):
        w = scale(t).astype(dt)
    else:
        w = jnp.asarray(scale, dt)
    if w.ndim == 0:
        return w
    if w.shape != (x.shape[0],):
        raise ValueError(f"the guidance {what} has shape {w.shape}; expected () or one per sample ({x.shape[0]},)")
    return broadcast_to_x(w, x)
