"""Log-probabilities of sampling trajectories: the policy of D3PO, SPO and DDPO.

A stochastic step of DDPM / DDIM(eta > 0) or SDE-DPM-Solver++ draws

    x_s = mean_theta(x_t, history) + std * z,     z ~ N(0, I),

a Gaussian whose mean and standard deviation are exactly the solver's own: the
solvers expose them with ``solver.transition(denoiser, state, cond) -> (state, std)``
(``state.x`` is the mean, before the noise is added), and ``solver.step`` is that mean
plus ``std * z``. So the log-density of a recorded transition is computed from the very
code that sampled it (Black et al., "Training Diffusion Models with Reinforcement
Learning", ICLR 2024, Sec. 4.2, write the DDPM step's density the same way).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdiff.solvers._base import Solver

__all__ = ["gaussian_log_prob", "transition_log_prob", "trajectory_log_probs"]


def gaussian_log_prob(x, mean, std):
    """Per-sample ``log N(x; mean, std^2 I)`` summed over all but the leading axis.

    Args:
      x, mean: ``(B, ...)`` arrays.
      std: a scalar (or an array broadcasting against ``x``), ``>= 0``.

    Returns:
      ``(B,)`` log-densities. A deterministic step (``std == 0``) has no density: it
      contributes ``0`` (an importance ratio of exactly 1), whatever ``x`` is.
    """
    x = jnp.asarray(x)
    dt = jnp.result_type(x.dtype, jnp.float32)
    x, mean = x.astype(dt), jnp.asarray(mean).astype(dt)
    std = jnp.asarray(std, dt)
    d = math.prod(x.shape[1:])
    pos = std > 0
    s = jnp.where(pos, std, 1.0)
    z2 = jnp.sum(jnp.square((x - mean) / s).reshape(x.shape[0], -1), axis=1)
    lp = -0.5 * z2 - d * jnp.log(s) - 0.5 * d * math.log(2.0 * math.pi)
    return jnp.where(pos, lp, 0.0)


def _check_solver(solver):
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    if type(solver).transition is Solver.transition:
        raise TypeError(
            f"{solver.name} does not expose its step as a Gaussian transition; use jdiff.solvers.ddpm(), "
            "ddim(eta) or sde_dpm_solver_pp(order)"
        )
    if not solver.stochastic:
        raise ValueError(
            f"{solver.name} is deterministic: its transitions have no density (use eta > 0 or an SDE solver)"
        )


def transition_log_prob(solver, denoiser, state, x_next, cond=None):
    """``log p_theta(x_next | state)`` of one solver step, per sample.

    Args:
      solver: a stochastic solver with a Gaussian step (DDPM, DDIM(eta > 0),
        SDE-DPM-Solver++(1/2M)).
      denoiser: the policy (a :class:`jdiff.Denoiser`; its ``params`` carry the gradient).
      state: the solver :class:`~jdiff.solvers.State` before the step (``state.x`` = x_t).
      x_next: ``(B, ...)`` the state after the step (x_s), e.g. ``info.xs[i + 1]``.
      cond: the conditioning of the samples.

    Returns:
      ``(log_prob (B,), state)``: ``state`` is the solver state after the step with its
      ``x`` set to ``x_next`` (teacher forcing), ready for the next transition.

    Raises:
      TypeError, ValueError: a solver without a Gaussian transition, or a deterministic one.
    """
    _check_solver(solver)
    new, std = solver.transition(denoiser, state, cond)
    lp = gaussian_log_prob(x_next, new.x, std)
    return lp, new._replace(x=jnp.asarray(x_next).astype(new.x.dtype))


def trajectory_log_probs(solver, denoiser, xs, grid, *, cond=None):
    """Log-probabilities of every step of recorded trajectories under ``denoiser``.

    The trajectory ``xs`` (``sample(..., return_info=True, trajectory=True)``'s
    ``info.xs``) is replayed with teacher forcing: step ``i`` starts from ``xs[i]`` (and,
    for multistep solvers, the history of this denoiser's outputs at ``xs[:i]``) and is
    scored at ``xs[i + 1]``. With the denoiser that sampled ``xs`` the means are those of
    the sampling run, so the scores of a policy equal to the sampler give importance
    ratios of exactly 1.

    Args:
      solver: the stochastic solver that sampled ``xs`` (see :func:`transition_log_prob`).
      denoiser: the policy to score under.
      xs: ``(N + 1, B, ...)`` states ``x_{t_0} .. x_{t_N}``.
      grid: the ``(N + 1,)`` time grid of the run (``info.grid``).
      cond: the samples' conditioning.

    Returns:
      ``(N, B)`` log-probabilities (0 on deterministic steps, e.g. a last step to the data).

    Raises:
      ValueError: ``xs`` and ``grid`` of inconsistent lengths; TypeError/ValueError as
        :func:`transition_log_prob`.
    """
    _check_solver(solver)
    xs = jnp.asarray(xs)
    grid = jnp.asarray(grid)
    if xs.ndim < 2 or grid.ndim != 1 or xs.shape[0] != grid.shape[0]:
        raise ValueError(
            f"trajectory_log_probs: xs must be (N + 1, B, ...) for a grid of N + 1 points, "
            f"got xs {xs.shape} and grid {grid.shape}"
        )
    # the key is never read: transition() returns the mean and the noise scale only
    state = solver.init(xs[0], grid, denoiser.process, key=jax.random.key(0))

    def body(st, x_next):
        lp, st = transition_log_prob(solver, denoiser, st, x_next, cond)
        return st, lp

    _, lps = jax.lax.scan(body, state, xs[1:])
    return lps
