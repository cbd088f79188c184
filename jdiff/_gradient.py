"""Gradient strategies for :func:`jdiff.sample`: how the reverse pass goes through sampling.

Chosen by value, as diffrax chooses its ``adjoint=``: ``sample(..., gradient=...)`` takes

- :class:`Backprop` -- plain reverse-mode autodiff through the ``lax.scan`` over steps
  (exact; the backward pass stores every step's activations, memory O(N x activations));
- :class:`Remat` -- the same with each step under ``jax.checkpoint`` (exact; stores one
  solver state per step and recomputes the model call, memory O(N |x|));
- :class:`Adjoint` -- the adjoint of the probability-flow ODE integrated backward in
  time (memory independent of N; see ``jdiff/_adjoint.py``);
- :class:`Truncated` -- gradient through the last ``k`` steps only, the earlier ones
  under ``stop_gradient`` (DRaFT-K, Clark et al., "Directly Fine-Tuning Diffusion Models
  on Differentiable Rewards", ICLR 2024; AlignProp, Prabhudesai et al., 2023).

Each strategy is a frozen dataclass: equal settings compare equal and hash alike, so a
strategy is a static argument of the compiled sampler and rebuilding it does not
recompile. Backprop, Remat and Truncated differentiate with respect to ``x_T``, the
conditioning pytree, the denoiser's parameters and the grid times.
"""

from __future__ import annotations

import dataclasses
import numbers

__all__ = ["GradientStrategy", "Backprop", "Remat", "Adjoint", "Truncated", "check_gradient"]


class GradientStrategy:
    """Base class of the gradient strategies of :func:`jdiff.sample`."""


@dataclasses.dataclass(frozen=True)
class Backprop(GradientStrategy):
    """Plain reverse-mode autodiff through the scan over steps.

    Exact. The backward pass keeps every step's intermediate values (the denoiser's
    activations included), so memory grows as O(N x activations) with the N steps.
    """


@dataclasses.dataclass(frozen=True)
class Remat(GradientStrategy):
    """Reverse-mode autodiff with each solver step rematerialized (``jax.checkpoint``).

    Exact (the same numbers as :class:`Backprop`). The backward pass keeps only the solver
    state entering each step and recomputes the step, so memory is O(N |state|) at the
    price of about one more forward pass.
    """


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

    Supports the deterministic solvers: DDIM (``eta = 0``), Euler and Heun, DPM-Solver
    and DPM-Solver++ (singlestep and multistep), DEIS, UniPC and iPNDM. Stochastic
    solvers and ``trajectory=True`` raise ``ValueError`` (:func:`check_adjoint`).

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


def check_gradient(gradient, num_steps: int | None = None) -> GradientStrategy:
    """Return ``gradient`` after checking it is a strategy that fits ``num_steps`` grid
    intervals (not checked when None).

    Raises:
      TypeError: ``gradient`` is not one of :class:`Backprop`, :class:`Remat`,
        :class:`Adjoint`, :class:`Truncated` (e.g. the old flag ``remat=True`` or a string).
      ValueError: :class:`Truncated` with ``k`` larger than ``num_steps``.
    """
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(
            "gradient must be a gradient strategy: jdiff.Backprop(), jdiff.Remat(), jdiff.Adjoint() or "
            f"jdiff.Truncated(k), got {gradient!r} of type {type(gradient).__name__}"
        )
    if num_steps is not None and isinstance(gradient, Truncated) and not 1 <= gradient.k <= num_steps:
        raise ValueError(
            f"Truncated(k={gradient.k}) needs 1 <= k <= N, the number of grid intervals; this grid has N = {num_steps}"
        )
    return gradient
