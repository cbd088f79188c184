"""Any Gaussian process read as a rectified flow, teacher pairs, and straightness.

Every jdiff process has marginals ``x_t = alpha_t x0 + sigma_t eps``. Dividing by
``alpha_t + sigma_t`` gives

    x_rf(s) = x_t / (alpha_t + sigma_t) = (1 - s) x0 + s eps,   s = sigma_t / (alpha_t + sigma_t),

the marginal of rectified flow (``alpha = 1 - s``, ``sigma = s``) at time ``s`` with the
same ``(x0, eps)``. So a denoiser of any process is a rectified-flow denoiser after the
change of variables: at ``(x_rf, s)`` call it at ``t(s)`` (``lambda(t) = log((1 - s) /
s)``, i.e. ``s = sigmoid(-lambda)``) on ``(alpha + sigma) x_rf`` and keep its ``(x0,
eps)``. Its probability-flow ODE is the same curve: the ODE depends on the process only
through the log-SNR (the exponential-integrator form of Lu et al., "DPM-Solver", NeurIPS
2022, Eq. 3.4, in which ``x / alpha`` moves along ``x0`` against ``e^{-lambda}``), so the
rectified-flow velocity ``eps - x0`` transports ``x_rf`` exactly as the original ODE
transports ``x_t`` (tested against :meth:`jdiff.testbed.GaussianMixture.reference_ode`).

:func:`rectified_view` does this for a denoiser (the teacher side, exact on the
teacher's own time range); :func:`rectified_apply` does it for a network (the student
side: the teacher's architecture, initialized from the teacher, seen as a rectified-flow
velocity on all of ``s in [0, 1]``, times outside the teacher's range clipped to it).

:func:`generate_pairs` draws teacher pairs ``(z, ODE(z))`` (Liu et al., "Flow Straight
and Fast: Learning to Generate and Transfer Data with Rectified Flow", ICLR 2023,
Algorithm 1: the coupling a reflow is trained on), and :func:`straightness` measures how
straight a flow's paths are (Liu et al. 2023, the straightness ``S(Z)`` of a flow).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff._param import Prediction, broadcast_to_x, model_time, to_x0_eps
from jdiff._process import Process, RectifiedFlow
from jdiff._random import normal_per_sample, per_sample_keys

__all__ = [
    "rectified_time",
    "process_time",
    "rectified_view",
    "RectifiedView",
    "rectified_apply",
    "velocity_of",
    "generate_pairs",
    "load_pairs",
    "straightness",
]


def rectified_time(process: Process, t):
    """The rectified-flow time ``s = sigma_t / (alpha_t + sigma_t) = sigmoid(-lambda_t)``
    of ``process``'s time ``t`` (``s = t`` for rectified flow itself)."""
    return jax.nn.sigmoid(-process.lambda_(t))


def _s_range(process: Process):
    """``(s(t_min), s(t_max))`` as Python floats (computed eagerly, also under ``jit``)."""
    with jax.ensure_compile_time_eval():
        dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        lo, hi = (float(rectified_time(process, jnp.asarray(v, dt))) for v in (process.t_min, process.t_max))
    return lo, hi


def process_time(process: Process, s):
    """The inverse of :func:`rectified_time`: the time ``t`` of ``process`` with
    ``sigma_t / (alpha_t + sigma_t) = s``, for ``s`` clipped to the image of
    ``[t_min, t_max]`` (so ``s = 0`` and ``s = 1`` give ``t_min`` and ``t_max``)."""
    s = jnp.asarray(s)
    s = s.astype(jnp.result_type(s.dtype, jnp.float32))
    lo, hi = _s_range(process)
    s = jnp.clip(s, lo, hi)
    t = process.t_of_lambda(jnp.log1p(-s) - jnp.log(s))
    return jnp.clip(t, process.t_min, process.t_max)


@dataclasses.dataclass(frozen=True)
class RectifiedView:
    """A denoiser of any process seen as a rectified-flow denoiser (see the module
    docstring): ``view(x_rf, s, cond) = base((alpha_t + sigma_t) x_rf, t(s), cond)``,
    the same ``(x0, eps)``. ``process`` is :class:`jdiff.RectifiedFlow` on the image of
    the base's ``[t_min, t_max]``; there the change of variables is exact."""

    base: Any
    process: RectifiedFlow

    def __call__(self, x, s, cond=None) -> Prediction:
        bp = self.base.process
        t = process_time(bp, s)
        c = broadcast_to_x(bp.alpha(t) + bp.sigma(t), x)
        dt = jnp.result_type(x.dtype, jnp.float32)
        return self.base((c * x.astype(dt)).astype(x.dtype), t, cond)

    def calls(self, s):
        f = getattr(self.base, "calls", None)
        return jnp.int32(1) if f is None else f(process_time(self.base.process, s))


jax.tree_util.register_dataclass(RectifiedView, data_fields=["base", "process"], meta_fields=[])


def rectified_view(denoiser) -> RectifiedView:
    """``denoiser`` (any object with ``.process`` and ``__call__(x, t, cond) ->
    Prediction``, e.g. a :class:`jdiff.Denoiser` or :class:`jdiff.testbed.ExactDenoiser`)
    as a rectified-flow denoiser on ``s in [s(t_min), s(t_max)]``; sample it with any
    jdiff solver (its starting point for ``x_T`` at ``t_max`` is ``x_T / (alpha + sigma)``
    at ``s(t_max)``)."""
    lo, hi = _s_range(denoiser.process)
    return RectifiedView(denoiser, RectifiedFlow(t_min=lo, t_max=hi))


def rectified_apply(apply: Callable, process: Process, prediction: str, time_input) -> Callable:
    """A network trained on ``process`` (output of kind ``prediction``, time input
    ``time_input``, as in :class:`jdiff.Denoiser`) as a rectified-flow velocity network.

    Returns:
      ``apply_rf(params, x, s, cond=None, key=None) -> v`` with ``v = eps - x0`` of the
      network at ``((alpha_t + sigma_t) x, t(s))``: the flow-matching output of a
      :class:`jdiff.Denoiser` with process :func:`jdiff.rectified_flow` and
      ``prediction="flow"``. Exact (the teacher's own ODE, read in ``s``) for ``s`` in
      the image of ``[t_min, t_max]``; outside it (``s`` near 0 or 1) the time is
      clipped to the range, so a student initialized from the teacher starts close to,
      not exactly at, the teacher's flow there.
    """

    def apply_rf(params, x, s, cond=None, key=None):
        dt = jnp.result_type(x.dtype, jnp.float32)
        s = jnp.broadcast_to(jnp.asarray(s, dt), (x.shape[0],))
        t = process_time(process, s)
        c = broadcast_to_x(process.alpha(t) + process.sigma(t), x)
        xin = c * x.astype(dt)
        out = apply(params, xin.astype(x.dtype), model_time(process, time_input, t), cond, key)
        p = to_x0_eps(prediction, out.astype(dt), xin, t, process)
        return (p.eps - p.x0).astype(x.dtype)

    return apply_rf


def velocity_of(denoiser, x, s, cond=None):
    """The rectified-flow velocity ``dx/ds = eps - x0`` of a rectified-flow denoiser."""
    p = denoiser(x, s, cond)
    return p.eps - p.x0


# ----------------------------------------------------------------------------- pairs


def _final(process):
    return "data" if process.t_data is not None else "t_min"


def generate_pairs(
    denoiser,
    n: int,
    shape,
    *,
    key,
    solver=None,
    nfe: int = 10,
    num_classes: int = 0,
    batch: int = 256,
    path=None,
    tag: str = "",
) -> dict:
    """Teacher pairs ``(z, x = ODE(z))``: the coupling of a reflow (Liu et al. 2023,
    Algorithm 1: the pairs drawn by simulating the flow from noise).

    Args:
      denoiser: the flow to simulate: any jdiff denoiser (a teacher of any process, or
        a rectified-flow student); ``z`` is its standard-normal draw, started at its
        ``t_max`` as ``z * prior_std``.
      n: number of pairs; shape: one sample's shape.
      key: sample ``i``'s noise comes from ``fold_in(key, i)`` only, so the pairs do not
        depend on ``batch`` and the first ``m`` pairs of ``n`` are the pairs of ``m``.
      solver: a jdiff solver (default DPM-Solver++(2M)); nfe: its network evaluations.
      num_classes: > 0 for a class-conditional model: labels cycle ``0..num_classes-1``.
      batch: samples per compiled call (the last batch is padded: one compilation).
      path: an ``.npz`` file: loaded if it holds ``n`` pairs of this ``shape`` made
        with the same ``tag``, else written after generation.
      tag: what made the pairs (stored with them; e.g. the flow, solver, NFE and seed),
        so that a cache file of other pairs is not reused.

    Returns:
      ``{"z": (n, *shape), "x": (n, *shape), "label": (n,) int32}`` host float32 arrays
      (``label`` all 0 for an unconditional model).
    """
    shape = tuple(int(v) for v in shape)
    if path is not None and os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            same = "tag" in f.files and str(f["tag"]) == tag
        pairs = load_pairs(path)
        if same and pairs["z"].shape == (n, *shape):
            return pairs
    solver = jdiff.solvers.dpm_solver_pp(2) if solver is None else solver
    labels = (np.arange(n) % num_classes).astype(np.int32) if num_classes else np.zeros(n, np.int32)
    process = denoiser.process
    std = float(process.prior_std())
    bs = min(int(batch), n)
    zs, xs = [], []
    for start in range(0, n, bs):
        idx = np.arange(start, start + bs) % n
        keys = per_sample_keys(key, bs, offset=start)
        z = normal_per_sample(keys, (bs, *shape))
        cond = jnp.asarray(labels[idx]) if num_classes else None
        x = jdiff.sample(solver, denoiser, z * std, nfe=nfe, final=_final(process), cond=cond)
        m = min(bs, n - start)
        zs.append(np.asarray(z)[:m])
        xs.append(np.asarray(x, np.float32)[:m])
    pairs = {"z": np.concatenate(zs), "x": np.concatenate(xs), "label": labels}
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, tag=np.asarray(tag), **pairs)
    return pairs


def load_pairs(path) -> dict:
    """Pairs written by :func:`generate_pairs` (``z``, ``x``, ``label``)."""
    with np.load(path, allow_pickle=False) as f:
        missing = {"z", "x", "label"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: not a pairs file (missing {sorted(missing)})")
        return {k: np.asarray(f[k]) for k in ("z", "x", "label")}


# ----------------------------------------------------------------------- straightness


def straightness(velocity: Callable, z, *, steps: int = 64, s_max: float = 1.0, cond=None):
    """The straightness of a flow's paths (Liu et al. 2023, ``S(Z)``),

        S = int_0^1 E || (Z_1 - Z_0) - dZ_s/ds ||^2 ds,

    estimated by Euler's method from ``z`` at ``s_max`` to ``s = 0`` with ``steps``
    uniform steps: the mean over steps and samples of ``||(z - x_end) / s_max - v_i||^2``
    (summed over features). It is 0 exactly when every path is a straight line run at
    constant speed, so that one Euler step is exact.

    Args:
      velocity: ``velocity(x, s, cond) -> dx/ds`` (e.g. ``lambda x, s, c:
        velocity_of(den, x, s, c)``).
      z: ``(B, ...)`` starting points.

    Returns:
      ``(S, x_end)``: the scalar and the end points of the Euler paths.
    """
    h = s_max / steps

    def body(x, i):
        s = s_max - i * h
        v = velocity(x, jnp.full((x.shape[0],), s, x.dtype), cond)
        return x - h * v, v

    x_end, vs = jax.lax.scan(body, z, jnp.arange(steps, dtype=z.dtype))
    chord = (z - x_end) / s_max
    d = (chord[None] - vs).reshape(steps, z.shape[0], -1)
    return jnp.mean(jnp.sum(d * d, axis=-1)), x_end
