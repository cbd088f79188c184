"""The Ito density estimator: ``log p_t`` along reverse-SDE trajectories from increments
alone (Skreta et al., ICLR 2025)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._sample import validate_grid
from jdiff.likelihood._prior import _feature_sum, gaussian_prior_log_prob

__all__ = ["ito_increment", "ito_log_density"]


def ito_increment(process, x, x_next, eps, t, t_next):
    """One step of the Ito density estimator: ``log p_{t_next}(x_next) - log p_t(x)``
    (``(B,)``) from the increment ``x_next - x`` of a reverse-SDE step ``t -> t_next < t``
    and the model's ``eps`` prediction at ``(x, t)``. See :func:`ito_log_density`."""
    dt = jnp.result_type(x.dtype, jnp.float32)
    t = jnp.asarray(t, dt)
    t_next = jnp.asarray(t_next, dt)
    la, la_n = process.log_alpha(t), process.log_alpha(t_next)
    lam, lam_n = process.lambda_(t), process.lambda_(t_next)
    sig = process.sigma(t)
    D = int(np.prod(x.shape[1:]))
    dla = la_n - la  # = -Int f dtau over the step
    h = lam_n - lam  # = Int g^2 / (2 sigma^2) dtau
    eps = eps.astype(dt)
    x = x.astype(dt)
    dx = x_next.astype(dt) - x
    return -D * dla + dla * _feature_sum(x * eps) / sig - h * _feature_sum(eps * eps) - _feature_sum(eps * dx) / sig


def ito_log_density(process, xs, epss, grid, *, log_prob_T=None):
    """The Ito density estimator: ``log p_t(x_t)`` of the model's marginals at every
    point of a reverse-time SDE trajectory, from its increments and the model's
    predictions alone (Skreta et al., "The Superposition of Diffusion Models Using the
    Ito Density Estimator", ICLR 2025, Thm. 1).

    Derivation. With the forward SDE ``dx = f x dt + g dW`` (``f = d log alpha/dt``,
    ``g^2 = -2 sigma^2 d lambda/dt``), Fokker-Planck gives ``d/dt log p = -f D -
    f x.s + g^2/2 (Lap log p + |s|^2)`` with ``s = grad log p = -eps/sigma``. In reverse
    time ``tau`` a trajectory ``dx = (anything) dtau + g dB`` has quadratic variation
    ``g^2 dtau``, so by Ito's lemma

        d log p(x) = [f D + f x.s - g^2/2 |s|^2] dtau + s . dx

    (the Laplacians cancel: no divergence). Frozen at the start of each step, the time
    integrals are exact: ``Int f dtau = -(log alpha_next - log alpha)`` and
    ``Int g^2/sigma^2 dtau = 2 (lambda_next - lambda)``, so with ``x, eps`` at the
    start of the step and ``dx = x_next - x``:

        dlogp = -D dlog_alpha + dlog_alpha (x.eps)/sigma - dlambda |eps|^2 - eps.dx/sigma.

    The estimate is exact in the limit of small steps; on a grid its error is that of
    the Euler scheme for the log-density: per step a zero-mean part
    ``1/2 (dx^T H dx - c^2 tr H)`` (``H`` the Hessian of ``log p_t``, ``c^2`` the step's
    noise variance) with variance ``c^4 |H|_F^2 / 2``, and a drift part of order
    ``dtau^2``; so the error is ``O(sqrt(max dtau))`` per trajectory and ``O(max dtau)``
    on average. It is valid only for trajectories whose noise per step has the reverse
    SDE's variance (``ddpm``, ``euler_maruyama``, ``sde_dpm_solver_pp``); an ODE
    trajectory (no noise) gives a wrong answer, because the Laplacian then no longer
    cancels.

    Args:
      process: the model's :class:`~jdiff.Process`.
      xs: ``(N + 1, B, ...)`` states at the grid points (``SampleInfo.xs`` of
        ``jdiff.sample(..., return_info=True, trajectory=True)``).
      epss: ``(N, B, ...)`` the eps predictions at ``xs[n]`` (``SampleInfo.epss``).
      grid: ``(N + 1,)`` the decreasing time grid, ending where ``sigma > 0``.
      log_prob_T: ``(B,)`` ``log p`` at ``xs[0]`` (default: the Gaussian prior,
        :func:`gaussian_prior_log_prob`; only differences matter for SuperDiff).

    Returns:
      ``(N + 1, B)`` the estimated ``log p_{t_n}(xs[n])``.

    Raises:
      ValueError: shapes that do not fit together, a grid that is not valid for the
        process or that ends at ``sigma = 0``.
    """
    xs = jnp.asarray(xs)
    epss = jnp.asarray(epss)
    grid = jnp.asarray(grid)
    if xs.ndim < 3:
        raise ValueError(f"xs must be (N + 1, B, ...) states of a trajectory, got shape {xs.shape}")
    if grid.ndim != 1 or grid.shape[0] != xs.shape[0]:
        raise ValueError(f"grid of shape {grid.shape} does not fit xs of shape {xs.shape} (need ({xs.shape[0]},))")
    if epss.shape != (xs.shape[0] - 1,) + xs.shape[1:]:
        raise ValueError(
            f"epss has shape {epss.shape}; xs of shape {xs.shape} needs {(xs.shape[0] - 1,) + xs.shape[1:]}"
        )
    grid = validate_grid(process, grid)
    g = concrete(grid)
    if g is not None and process.t_data is not None and float(g[-1]) == process.t_data:
        raise ValueError("the Ito density needs sigma > 0 at every grid point: end the grid at t_min, not t_data")
    dt = jnp.result_type(xs.dtype, jnp.float32)
    xs = xs.astype(dt)
    grid = grid.astype(dt)
    l0 = gaussian_prior_log_prob(process, xs[0]) if log_prob_T is None else jnp.asarray(log_prob_T, dt)
    if l0.shape != (xs.shape[1],):
        raise ValueError(f"log_prob_T must have shape ({xs.shape[1]},), got {l0.shape}")
    inc = jax.vmap(lambda x, xn, e, t, tn: ito_increment(process, x, xn, e, t, tn))(
        xs[:-1], xs[1:], epss, grid[:-1], grid[1:]
    )
    return jnp.concatenate([l0[None], l0[None] + jnp.cumsum(inc, axis=0)], axis=0)
