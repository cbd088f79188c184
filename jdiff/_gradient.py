"""Gradient strategies for :func:`jdiff.sample`: how the reverse pass goes through sampling.

Chosen by value, as diffrax chooses its ``adjoint=``: ``sample(..., gradient=...)`` takes

- :class:`Backprop` -- plain reverse-mode autodiff through the ``lax.scan`` over steps
  (exact; the backward pass stores every step's activations, memory O(N x activations));
- :class:`Remat` -- the same with each step under ``jax.checkpoint`` (exact; stores one
  solver state per step and recomputes the model call, memory O(N |x|));
- :class:`~jdiff.Adjoint` -- the adjoint of the probability-flow ODE integrated backward
  in time (memory independent of N; defined with its loop in ``jdiff/_adjoint.py``);
- :class:`Truncated` -- gradient through the last ``k`` steps only, the earlier ones
  under ``stop_gradient`` (DRaFT-K, Clark et al., "Directly Fine-Tuning Diffusion Models
  on Differentiable Rewards", ICLR 2024; AlignProp, Prabhudesai et al., 2023).

Each strategy is a frozen dataclass: equal settings compare equal and hash alike, so a
strategy is a static argument of the compiled sampler and rebuilding it does not
recompile. Each carries its own checks and loop (:class:`GradientStrategy`'s ``check``
and ``run``), so :func:`jdiff.sample` does not branch on the strategy. Backprop, Remat
and Truncated differentiate with respect to ``x_T``, the
conditioning pytree, the denoiser's parameters and the grid times.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["GradientStrategy", "Backprop", "Remat", "Truncated", "Run", "check_gradient", "scan_steps"]


class Run(NamedTuple):
    """What a strategy's :meth:`GradientStrategy.run` returns to :func:`jdiff.sample`.

    Attributes:
      x: the state after the last step, in the compute dtype.
      nfe: network calls made (int32 scalar).
      grid: the grid the solver ran on.
      traj: with ``trajectory=True``, ``(xs, x0s, epss)`` stacked over the ``N`` steps
        (``xs`` the states after each step), else None.
      state: the solver's final state, from which :func:`jdiff.sample` takes its result
        (``solver.finish``); None from a strategy that keeps only ``x`` (Adjoint, which
        supports only solvers whose result is ``x``).
    """

    x: jax.Array
    nfe: jax.Array
    grid: jax.Array
    traj: Any = None
    state: Any = None


def scan_steps(solver, state, num_steps: int, denoiser, cond, *, remat: bool = False, trajectory: bool = False):
    """``num_steps`` calls of ``solver.step`` under ``lax.scan`` (each under
    ``jax.checkpoint`` with ``remat``); returns ``(state, traj)`` with ``traj`` the
    per-step ``(x, x0, eps)`` when ``trajectory`` else None."""

    def body(st, _):
        new = solver.step(denoiser, st, cond)
        out = (new.x, new.pred.x0, new.pred.eps) if trajectory else None
        return new, out

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, None, length=num_steps)


def _stop(tree):
    """``stop_gradient`` on the array leaves of ``tree`` (other leaves pass unchanged)."""
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a) if isinstance(a, jax.Array) else a, tree)


class GradientStrategy:
    """Base class of the gradient strategies of :func:`jdiff.sample`.

    A strategy owns its behaviour, as diffrax's adjoints do: :meth:`check` refuses what
    it does not support before anything runs, and :meth:`run` is the sampling loop with
    the reverse pass the strategy stands for. :func:`jdiff.sample` validates its inputs,
    calls both and finishes (``denoise_to_zero``, dtypes, :class:`~jdiff.SampleInfo`);
    it never asks which strategy it holds. A new strategy subclasses this and overrides
    both (:meth:`run` at least).
    """

    def check(self, solver, denoiser, num_steps: int, *, trajectory: bool = False, denoise_to_zero: bool = False):
        """Raise ``ValueError`` now for a solver, denoiser, number of grid intervals or
        option this strategy does not support. Default: everything is supported."""

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory: bool = False) -> Run:
        """Sample from ``x`` (compute dtype) over the validated ``grid`` with ``solver``.

        Args:
          solver: the :class:`~jdiff.solvers.Solver`.
          denoiser: the denoiser (already casting to the caller's dtype).
          x: ``(B, ...)`` the starting noise in the compute dtype.
          grid: ``(N + 1,)`` the validated grid.
          cond: the conditioning pytree.
          key: the PRNG key of a stochastic solver, else None.
          nfe: the NFE target handed to ``solver.init`` (or None).
          trajectory: record ``(x, x0, eps)`` after every step.

        Returns:
          A :class:`Run`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")


def _full(solver, denoiser, x, grid, cond, key, *, nfe, trajectory, remat) -> Run:
    """Every step differentiated (``remat``: each under ``jax.checkpoint``)."""
    state = solver.init(x, grid, denoiser.process, key=key, nfe=nfe)
    state, traj = scan_steps(solver, state, grid.shape[0] - 1, denoiser, cond, remat=remat, trajectory=trajectory)
    return Run(state.x, state.nfe, state.grid, traj, state)


@dataclasses.dataclass(frozen=True)
class Backprop(GradientStrategy):
    """Plain reverse-mode autodiff through the scan over steps.

    Exact. The backward pass keeps every step's intermediate values (the denoiser's
    activations included), so memory grows as O(N x activations) with the N steps.
    """

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory=False) -> Run:
        return _full(solver, denoiser, x, grid, cond, key, nfe=nfe, trajectory=trajectory, remat=False)


@dataclasses.dataclass(frozen=True)
class Remat(GradientStrategy):
    """Reverse-mode autodiff with each solver step rematerialized (``jax.checkpoint``).

    Exact (the same numbers as :class:`Backprop`). The backward pass keeps only the solver
    state entering each step and recomputes the step, so memory is O(N |state|) at the
    price of about one more forward pass.
    """

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory=False) -> Run:
        return _full(solver, denoiser, x, grid, cond, key, nfe=nfe, trajectory=trajectory, remat=True)


@dataclasses.dataclass(frozen=True)
class Truncated(GradientStrategy):
    """Gradient through the last ``k`` steps only (DRaFT-K, Clark et al., ICLR 2024;
    AlignProp, Prabhudesai et al., 2023).

    The first ``N - k`` steps run under ``jax.lax.stop_gradient``: the solver state
    (sample, history of model outputs, last prediction) they hand on is a constant for
    differentiation. So the gradient with respect to ``x_T`` is zero for ``k < N``, and
    the gradient with respect to the parameters, the conditioning and the grid times is
    that of the map from the state after ``N - k`` steps to the result. ``k = N`` is
    :class:`Backprop` (or :class:`Remat`).

    Attributes:
      k: number of final steps that carry gradient, an int in ``1..N`` (N = grid
        intervals; checked by :func:`jdiff.sample`).
      remat: checkpoint each of those k steps (as :class:`Remat`).

    Raises:
      ValueError: ``k`` not an integer ``>= 1`` (at construction), or larger than the
        number of grid intervals (in :func:`jdiff.sample`, before anything runs).
      TypeError: ``remat`` not a bool.
    """

    k: int
    remat: bool = False

    def __post_init__(self):
        k = self.k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(
                f"Truncated(k) needs an integer k >= 1 (the number of final steps carrying gradient), got k={k!r}"
            )
        if not isinstance(self.remat, bool):
            raise TypeError(f"Truncated(remat=...) must be a bool, got {type(self.remat).__name__}")
        object.__setattr__(self, "k", int(k))

    def check(self, solver, denoiser, num_steps, *, trajectory=False, denoise_to_zero=False):
        """Raise ``ValueError`` unless ``1 <= k <= num_steps``."""
        if not 1 <= self.k <= num_steps:
            raise ValueError(
                f"Truncated(k={self.k}) needs 1 <= k <= N, the number of grid intervals; this grid has N = {num_steps}"
            )

    def run(self, solver, denoiser, x, grid, cond, key, *, nfe=None, trajectory=False) -> Run:
        N = grid.shape[0] - 1
        if self.k == N:
            return _full(solver, denoiser, x, grid, cond, key, nfe=nfe, trajectory=trajectory, remat=self.remat)
        state = solver.init(x, grid, denoiser.process, key=key, nfe=nfe)
        # DRaFT-K: the first N - k steps see constants only (so no reverse pass is built
        # for them), and the state they hand on is a constant too; the coefficient tables
        # and the grid keep their dependence on the grid times for the last k steps
        first, traj1 = scan_steps(solver, _stop(state), N - self.k, _stop(denoiser), _stop(cond), trajectory=trajectory)
        first = _stop(first)._replace(aux=state.aux, grid=state.grid)
        state, traj2 = scan_steps(solver, first, self.k, denoiser, cond, remat=self.remat, trajectory=trajectory)
        traj = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), traj1, traj2)
        return Run(state.x, state.nfe, state.grid, traj, state)


def check_gradient(gradient) -> GradientStrategy:
    """Return ``gradient`` after checking it is a gradient strategy.

    Raises:
      TypeError: ``gradient`` is not a :class:`GradientStrategy` (e.g. the old flag
        ``remat=True`` or a string).
    """
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(
            "gradient must be a gradient strategy: jdiff.Backprop(), jdiff.Remat(), jdiff.Adjoint() or "
            f"jdiff.Truncated(k), got {gradient!r} of type {type(gradient).__name__}"
        )
    return gradient
