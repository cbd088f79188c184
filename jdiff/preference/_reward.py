"""Reward backpropagation through the sampler: DRaFT-K / AlignProp, DRaFT-LV, Adjoint.

The fine-tuned model maximizes a differentiable reward of its own samples,
``loss = -mean r(sample(theta, x_T))``, with the gradient taken through the sampling
chain by one of jdiff's strategies (``sample(..., gradient=...)``):

- ``Truncated(k)``: only the last ``k`` steps carry gradient -- DRaFT-K (Clark et al.,
  "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024) and, with
  ``k`` drawn at random per update, AlignProp (Prabhudesai et al., "Aligning
  Text-to-Image Diffusion Models with Reward Backpropagation", 2023);
- ``Adjoint()``: the full gradient with memory independent of the number of steps
  (the adjoint ODE; deterministic solvers);
- ``Backprop()`` / ``Remat()``: the full gradient by plain autodiff.

DRaFT-LV (Clark et al., Sec. 4.2) lowers the variance of DRaFT-1: the sample is drawn
without gradient, then re-noised ``n`` times to the time of the last step and each copy
denoised by that one step with gradient; the reward gradient is averaged over the copies.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff._gradient import Truncated
from jdiff._sample import sample
from jdiff.solvers.ddim import ddim

__all__ = ["reward_loss", "draft_lv_loss"]

_DRAFT1 = Truncated(1)  # the default strategy (an immutable value)


def reward_loss(reward_fn: Callable, solver, denoiser, x_T, grid, *, cond=None, key=None, gradient=_DRAFT1):
    """``-mean reward_fn(x0, cond)`` of the samples of ``solver`` from ``x_T``, the
    gradient through sampling by ``gradient`` (DRaFT-K / AlignProp with
    :class:`jdiff.Truncated`, the full adjoint with :class:`jdiff.Adjoint`, ...).

    Differentiate with respect to the denoiser's parameters, e.g.::

        def loss(params):
            den = base_denoiser.replace(params=params)
            return reward_loss(reward, solver, den, x_T, grid, cond=labels, gradient=jdiff.Truncated(2))

    Returns:
      ``(loss, metrics)`` with ``loss`` and ``reward`` (the mean reward).

    Raises:
      ValueError / TypeError: as :func:`jdiff.sample` (a bad grid, ``k`` outside
        ``1..N``, ``Adjoint`` with a stochastic solver, ...).
    """
    x0 = sample(solver, denoiser, x_T, grid, cond=cond, key=key, gradient=gradient)
    r = jnp.mean(reward_fn(x0, cond))
    return -r, {"loss": -r, "reward": r}


def draft_lv_loss(reward_fn: Callable, solver, denoiser, x_T, grid, key, *, cond=None, n: int = 2):
    """DRaFT-LV: ``-mean`` reward of ``n`` re-noised, one-step-denoised copies of each sample.

    The samples ``x0`` of ``solver`` over ``grid`` are constants; copy ``j`` is
    ``x = alpha(t1) x0 + sigma(t1) z_j`` at ``t1 = grid[-2]`` (the start of the last
    step), mapped back to ``grid[-1]`` by one deterministic DDIM step of the denoiser
    with gradient.

    Args:
      reward_fn: ``reward_fn(x0, cond) -> (B,)``; solver, denoiser, x_T, grid, cond: the
        sampling run; key: PRNG key of the re-noising (and of a stochastic solver);
        n: copies per sample (>= 1).

    Returns:
      ``(loss, metrics)`` with ``loss`` and ``reward`` (mean over the copies).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"DRaFT-LV needs n >= 1 re-noised copies, got {n!r}")
    grid = jnp.asarray(grid)
    ks, kn = jax.random.split(key)
    x0 = jax.lax.stop_gradient(sample(solver, denoiser, x_T, grid, cond=cond, key=ks if solver.stochastic else None))
    process = denoiser.process
    t1 = grid[-2]
    a, s = process.alpha(t1), process.sigma(t1)
    last = grid[-2:]

    def one(j):
        z = jax.random.normal(jax.random.fold_in(kn, j), x0.shape, x0.dtype)
        x1 = a * x0 + s * z
        y = sample(ddim(), denoiser, x1, last, cond=cond)
        return jnp.mean(reward_fn(y, cond))

    r = jnp.mean(jnp.stack([one(j) for j in range(n)]))
    return -r, {"loss": -r, "reward": r}
