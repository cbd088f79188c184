"""Model stitching: a small denoiser for the noisy start of the trajectory, the large one
after (T-Stitch: Pan et al., "T-Stitch: Accelerating Sampling in Pre-trained Diffusion
Models with Trajectory Stitching", 2024).

Denoisers of different sizes trained on the same data agree at high noise, where the
prediction is close to the data mean and the low frequencies; they differ at low noise,
where detail is decided. T-Stitch therefore runs the first fraction ``r`` of the steps
with a small model and the rest with the large one (the paper's Sec. 3, Eq. 5: the
denoiser at step ``i`` is ``D_small`` for ``i < r N`` and ``D_large`` after).

Here the switch is a time: an evaluation at ``t > threshold`` uses the small model, any
other the large one, decided by ``lax.cond`` on the scalar time so that only one network
runs per evaluation. :func:`stitch_threshold` turns a fraction of a grid's steps into that
time (the grid point where the large model takes over), so the stitched denoiser is a
plain denoiser for every solver of the registry, multi-evaluation solvers included (an
intermediate evaluation above the threshold is the small model's).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import Prediction, TreeValue, broadcast_to_x
from jdiff._sample import sample
from jdiff.solvers._base import network_calls

__all__ = ["Stitched", "stitch", "stitch_threshold", "StitchCalls", "stitch_calls"]


def _check_denoiser(den, what):
    if getattr(den, "process", None) is None or not callable(den):
        raise TypeError(f"{what} must be a jdiff denoiser (see jdiff.denoiser), got {type(den).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class Stitched(TreeValue):
    """The stitched denoiser (build it with :func:`stitch`).

    Attributes:
      small: the denoiser used at times ``t > threshold`` (the noisy start).
      large: the denoiser used at every other time.
      threshold: the switching time (a static float; ``inf``: never the small model,
        ``-inf``: always).
      count: which calls :meth:`calls` counts: ``"all"`` (both models' network calls),
        ``"small"`` or ``"large"`` (only that model's; :func:`stitch_calls` uses these).
    """

    small: Any
    large: Any
    threshold: float = math.inf
    count: str = "all"

    @property
    def process(self):
        return self.large.process

    @property
    def fixed_calls(self):
        """Network calls per evaluation when they do not depend on t (threshold
        ``inf``/``-inf`` and a fixed-call model), else None."""
        if self.threshold == math.inf:
            return getattr(self.large, "fixed_calls", 1)
        if self.threshold == -math.inf:
            return getattr(self.small, "fixed_calls", 1)
        return None

    def uses_small(self, t):
        """Whether an evaluation at ``t`` (scalar or ``(B,)``) uses the small model."""
        t = jnp.asarray(t)
        return t.astype(jnp.result_type(t.dtype, jnp.float32)) > self.threshold

    def calls(self, t):
        """Network calls of one evaluation at ``t`` (int32): those of the model used (a
        guidance wrapper around it makes 2), so :attr:`jdiff.SampleInfo.nfe` counts
        calls of either model alike; with per-sample times, those of every model some
        sample uses. ``count="small"``/``"large"`` counts one model's calls only."""
        if self.threshold == math.inf:
            return network_calls(self.large, t) if self.count != "small" else jnp.int32(0)
        if self.threshold == -math.inf:
            return network_calls(self.small, t) if self.count != "large" else jnp.int32(0)
        s = self.uses_small(t)
        n_small = jnp.where(jnp.any(s), network_calls(self.small, t), 0)
        n_large = jnp.where(jnp.any(~s), network_calls(self.large, t), 0)
        return {"all": n_small + n_large, "small": n_small, "large": n_large}[self.count]

    def __call__(self, x, t, cond=None) -> Prediction:
        if self.threshold == math.inf:  # fraction 0: the large model, nothing else traced
            return self.large(x, t, cond)
        if self.threshold == -math.inf:
            return self.small(x, t, cond)
        t = jnp.asarray(t)
        dt = jnp.result_type(x.dtype, jnp.float32)

        def run(den):
            p = den(x, t, cond)
            return Prediction(p.x0.astype(dt), p.eps.astype(dt))

        if t.ndim == 0:
            return jax.lax.cond(self.uses_small(t), lambda: run(self.small), lambda: run(self.large))
        # per-sample times (e.g. a stream batch): both models run, each sample takes its own
        ps, pl = run(self.small), run(self.large)
        m = broadcast_to_x(self.uses_small(t), ps.x0)
        return Prediction(jnp.where(m, ps.x0, pl.x0), jnp.where(m, ps.eps, pl.eps))


jax.tree_util.register_dataclass(Stitched, data_fields=["small", "large"], meta_fields=["threshold", "count"])


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (numbers.Real, np.floating, np.integer)):
        try:
            threshold = float(np.asarray(threshold))  # a concrete 0-d array
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
            raise TypeError(f"the stitch threshold must be a concrete number (a time), got {threshold!r}") from None
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("the stitch threshold is NaN; give a time, inf (never small) or -inf (always small)")
    return threshold


def stitch(small, large, threshold=math.inf) -> Stitched:
    """Trajectory stitching (T-Stitch, Pan et al. 2024, Eq. 5): ``small`` at the noisy
    times ``t > threshold``, ``large`` at the others, one network per evaluation.

    Args:
      small: the small (cheap) denoiser, for the same process as ``large``; it may be a
        guidance wrapper (:func:`jdiff.wrappers.guidance`) around the small model.
      large: the large denoiser (or a guidance wrapper around it).
      threshold: the switching time, a concrete number (static: a new value compiles a
        new program); build it from a fraction of a grid's steps with
        :func:`stitch_threshold`. ``inf`` (the default, fraction 0) is the large
        denoiser alone, bit for bit; ``-inf`` is the small one alone.

    Returns:
      A :class:`Stitched` denoiser (a pytree value, like the wrappers of
      :mod:`jdiff.wrappers`) with ``calls(t)``. On a scalar time the choice is a
      ``lax.cond``, so only the chosen network runs; with per-sample times (``(B,)``,
      or under ``vmap`` with batched times) both run and each sample takes its own.

    Raises:
      TypeError: a denoiser that is not one, or a threshold that is not a number.
      ValueError: a NaN threshold, or denoisers of different processes.
    """
    _check_denoiser(small, "small")
    _check_denoiser(large, "large")
    pa, pb = small.process, large.process
    if pa is not pb and (type(pa) is not type(pb) or jax.tree.structure(pa) != jax.tree.structure(pb)):
        raise ValueError(f"stitch needs two denoisers of one process, got {type(pa).__name__} and {type(pb).__name__}")
    return Stitched(small, large, _check_threshold(threshold))


def stitch_threshold(grid, fraction: float) -> float:
    """The switching time that gives the first ``fraction`` of ``grid``'s steps to the
    small model (T-Stitch's ratio ``r``).

    With ``N`` steps and ``k = round(fraction N)``, the threshold is ``grid[k]``: steps
    ``0 .. k-1`` start above it (small model) and step ``k`` on start at or below it
    (large model). Intermediate evaluations of a multi-evaluation solver (Heun, singlestep
    DPM-Solver) inside steps ``0 .. k-1`` are above it too, except an evaluation at
    ``grid[k]`` itself (Heun's corrector of step ``k - 1``), which is the large model's.

    Args:
      grid: the concrete decreasing time grid the sampler will use, ``(N + 1,)``.
      fraction: in ``[0, 1]``; 0 gives ``inf`` (the large model alone), 1 gives ``-inf``.

    Returns:
      The threshold for :func:`stitch` (a Python float).

    Raises:
      ValueError: a fraction outside ``[0, 1]``, or a grid that is not 1-D, decreasing
        and at least 2 points long. TypeError: a traced grid.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"the stitch fraction must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"the stitch fraction must be in [0, 1], got {fraction}")
    try:
        g = np.asarray(grid, np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError):
        raise TypeError("stitch_threshold needs a concrete grid (it sets a static switching time)") from None
    if g.ndim != 1 or g.shape[0] < 2 or not np.all(np.diff(g) < 0):
        raise ValueError(f"stitch_threshold needs a strictly decreasing 1-D grid of >= 2 points, got {g.tolist()[:8]}")
    N = g.shape[0] - 1
    k = int(round(float(fraction) * N))
    if k == 0:
        return math.inf
    if k == N:
        return -math.inf
    return float(np.float32(g[k]))


class StitchCalls(NamedTuple):
    """Network calls of a stitched sampling run, per model (int).

    Attributes:
      small: calls of the small model (a guidance wrapper's pair counts 2).
      large: calls of the large model.
    """

    small: int
    large: int

    def large_equivalent(self, small_cost: float) -> float:
        """The cost in large-model calls when one small call costs ``small_cost`` large
        calls (e.g. the ratio of the two models' FLOPs): ``large + small_cost * small``."""
        return self.large + float(small_cost) * self.small


@dataclasses.dataclass(frozen=True, eq=False)
class _Probe(TreeValue):
    """A stand-in for a denoiser that counts its calls without running it: the
    prediction is zero (the times a deterministic solver evaluates at do not depend on
    the model's output)."""

    inner: Any

    @property
    def process(self):
        return self.inner.process

    def calls(self, t):
        return network_calls(self.inner, t)

    def __call__(self, x, t, cond=None) -> Prediction:
        z = jnp.zeros_like(x)
        return Prediction(z, z)


jax.tree_util.register_dataclass(_Probe, data_fields=["inner"], meta_fields=[])


def stitch_calls(solver, stitched: Stitched, grid=None, *, nfe=None, shape=(1, 1)) -> StitchCalls:
    """How many network calls each model of ``stitched`` makes when ``solver`` samples on
    ``grid`` (or the grid built from ``nfe``).

    The counts are exact for every deterministic solver: the sampler is run with zero
    stand-ins for both models (no network runs; the evaluation times do not depend on
    the predictions), once counting each model. :attr:`jdiff.SampleInfo.nfe` of the real
    run is their sum.

    Args:
      solver: the solver, as passed to :func:`jdiff.sample`.
      stitched: a :class:`Stitched` denoiser.
      grid, nfe: as in :func:`jdiff.sample`.
      shape: the sample shape of the stand-in run (the counts do not depend on it).

    Returns:
      A :class:`StitchCalls`; ``.large_equivalent(small_cost)`` is the cost in calls of
      the large model.

    Raises:
      TypeError: ``stitched`` is not a :class:`Stitched`.
      ValueError: a stochastic solver, or what :func:`jdiff.sample` refuses.
    """
    if not isinstance(stitched, Stitched):
        raise TypeError(
            f"stitch_calls needs a Stitched denoiser (jdiff.accelerate.stitch), got {type(stitched).__name__}"
        )
    if solver.stochastic:
        raise ValueError(f"stitch_calls counts the calls of a deterministic solver; {solver.name} is stochastic")
    probe = Stitched(_Probe(stitched.small), _Probe(stitched.large), stitched.threshold)
    x = jnp.zeros(shape, jnp.float32)
    counts = []
    for which in ("small", "large"):
        den = dataclasses.replace(probe, count=which)
        _, info = sample(solver, den, x, grid, nfe=nfe, return_info=True)
        counts.append(int(info.nfe))
    return StitchCalls(*counts)
