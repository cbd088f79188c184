"""The exact Gaussian-mixture testbed.

For data ``p(x0) = sum_k pi_k N(mu_k, diag(s_k^2))`` every marginal of every process is
again a mixture, ``p_t(x) = sum_k pi_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``,
so the ideal denoiser is known in closed form:

    E[x0 | x_t] = sum_k w_k(x) (mu_k + alpha s_k^2 / v_k (x - alpha mu_k)),
    E[eps | x_t] = sum_k w_k(x) sigma (x - alpha mu_k) / v_k,      v_k = alpha^2 s_k^2 + sigma^2,

with ``w_k`` the posterior component weights. Both are computed directly (no division by
alpha or sigma), so they are finite from ``sigma = 0`` to ``alpha = 0``. The exact
marginal log-density, samples of the true data, its mean and covariance, and a
reference probability-flow ODE solution (diffrax, float64, tight tolerances) let
solvers be checked against the truth rather than against another implementation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import PREDICTIONS, Denoiser, Prediction, from_x0_eps
from jdiff._process import Process
from jdiff.metrics import frechet_distance, gaussian_stats  # re-exported: the old home

__all__ = ["GaussianMixture", "ExactDenoiser", "random_mixture", "frechet_distance", "gaussian_stats"]


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture of diagonal Gaussians in ``d`` dimensions.

    Attributes:
      weights: ``(K,)`` mixture weights (normalized on construction).
      means: ``(K, d)``.
      stds: ``(K, d)`` per-dimension standard deviations (> 0).
    """

    weights: Any
    means: Any
    stds: Any

    def __post_init__(self):
        w = np.asarray(self.weights, np.float64)
        mu = np.asarray(self.means, np.float64)
        sd = np.asarray(self.stds, np.float64)
        if mu.ndim != 2 or sd.shape != mu.shape or w.shape != (mu.shape[0],):
            raise ValueError(
                f"shapes: weights {w.shape}, means {mu.shape}, stds {sd.shape}; expected (K,), (K, d), (K, d)"
            )
        if np.any(w < 0) or w.sum() <= 0 or np.any(sd <= 0):
            raise ValueError("weights must be non-negative with positive sum and stds positive")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "stds", sd)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ----------------------------------------------------------------- data
    def sample(self, key, n: int, dtype=jnp.float32):
        """``n`` samples of the true data distribution."""
        kc, kn = jax.random.split(key)
        comp = jax.random.choice(kc, self.weights.shape[0], (n,), p=jnp.asarray(self.weights, dtype))
        z = jax.random.normal(kn, (n, self.dim), dtype)
        return jnp.asarray(self.means, dtype)[comp] + jnp.asarray(self.stds, dtype)[comp] * z

    def mean(self):
        return self.weights @ self.means

    def cov(self):
        """Covariance ``sum_k pi_k (diag(s_k^2) + mu_k mu_k^T) - mu mu^T`` (numpy float64)."""
        m = self.mean()
        second = np.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second += np.diag(self.weights @ self.stds**2)
        return second - np.outer(m, m)

    # ------------------------------------------------------------ marginals
    def _terms(self, x, t, process):
        dt = jnp.result_type(x.dtype, jnp.float32)
        x = x.astype(dt)
        B = x.shape[0]
        xf = x.reshape(B, -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"data has {xf.shape[1]} features per sample, the mixture has {self.dim}")
        t = jnp.asarray(t, dt)
        a = jnp.broadcast_to(process.alpha(t), (B,))[:, None, None]
        s = jnp.broadcast_to(process.sigma(t), (B,))[:, None, None]
        mu = jnp.asarray(self.means, dt)[None]  # (1, K, d)
        sd2 = jnp.asarray(self.stds, dt)[None] ** 2
        v = a * a * sd2 + s * s  # (B, K, d)
        diff = xf[:, None, :] - a * mu  # (B, K, d)
        logw = jnp.log(jnp.asarray(self.weights, dt))[None] - 0.5 * jnp.sum(
            diff * diff / v + jnp.log(2 * jnp.pi * v), -1
        )
        return xf, a, s, mu, sd2, v, diff, logw

    def log_prob(self, x, t, process: Process):
        """Exact ``log p_t(x)`` of the marginal at time ``t`` (``(B,)``)."""
        *_, logw = self._terms(x, t, process)
        return jax.nn.logsumexp(logw, axis=-1)

    def data_log_prob(self, x):
        """``log p_0(x)`` of the data distribution itself."""
        x = jnp.asarray(x)
        mu = jnp.asarray(self.means, x.dtype)[None]
        sd2 = jnp.asarray(self.stds, x.dtype)[None] ** 2
        diff = x.reshape(x.shape[0], -1)[:, None, :] - mu
        logw = jnp.log(jnp.asarray(self.weights, x.dtype))[None] - 0.5 * jnp.sum(
            diff**2 / sd2 + jnp.log(2 * jnp.pi * sd2), -1
        )
        return jax.nn.logsumexp(logw, axis=-1)

    def posterior(self, x, t, process: Process) -> Prediction:
        """Exact ``(E[x0 | x_t], E[eps | x_t])``, finite for every ``t`` in ``[t_data, t_max]``."""
        xf, a, s, mu, sd2, v, diff, logw = self._terms(x, t, process)
        w = jax.nn.softmax(logw, axis=-1)[..., None]  # (B, K, 1)
        x0 = jnp.sum(w * (mu + a * sd2 / v * diff), axis=1)
        eps = jnp.sum(w * (s * diff / v), axis=1)
        return Prediction(x0.reshape(x.shape), eps.reshape(x.shape))

    def score(self, x, t, process: Process):
        """Exact ``grad_x log p_t(x) = -E[eps | x_t] / sigma``."""
        p = self.posterior(x, t, process)
        return -p.eps / jnp.reshape(process.sigma(jnp.asarray(t, p.eps.dtype)), (-1,) + (1,) * (x.ndim - 1))

    def denoiser(self, process: Process, prediction: str | None = None) -> ExactDenoiser | Denoiser:
        """The exact denoiser for ``process``.

        With ``prediction=None`` the returned object hands the solvers the exact pair
        ``(x0, eps)``. With a parameterization name it is an ordinary
        :class:`~jdiff.Denoiser` whose network outputs that parameterization (to
        exercise the conversions).
        """
        if prediction is None:
            return ExactDenoiser(self, process)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown parameterization {prediction!r}; expected one of {PREDICTIONS}")
        mix = self

        def apply(x, t, cond):
            p = mix.posterior(x, t, process)
            return from_x0_eps(prediction, p.x0, p.eps, t, process).astype(x.dtype)

        return Denoiser(apply_fn=apply, params=None, process=process, prediction=prediction)

    # ------------------------------------------------------ reference ODE
    def _compiled_solve(self, process, variable, rtol, atol, max_steps):
        """A jitted diffrax solve, cached per (process, variable, tolerances)."""
        # deferred: diffrax is heavy (about 1.5-2 s to import) and only the reference ODE needs it
        import diffrax

        cache = self.__dict__.setdefault("_ode_cache", {})
        key = (id(process), variable, rtol, atol, max_steps)
        if key in cache:
            return cache[key][1]
        mix = self

        def f_t(t, y, args):
            p = mix.posterior(y, t, process)
            return process.d_alpha(t) * p.x0 + process.d_sigma(t) * p.eps

        def f_rho(r, ybar, args):
            t = process.t_of_rho(r)
            a = process.alpha(t)
            return mix.posterior(a * ybar, t, process).eps

        f = f_t if variable == "t" else f_rho

        @jax.jit
        def solve(y, a, b):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(f),
                diffrax.Dopri8(),
                a,
                b,
                None,
                y,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                max_steps=max_steps,
                saveat=diffrax.SaveAt(t1=True),
            )
            return sol.ys[0]

        cache[key] = (process, solve)  # keep the process alive so its id stays unique
        return solve

    def reference_ode(
        self,
        process: Process,
        x_T,
        t_start=None,
        t_end=None,
        *,
        rtol: float = 1e-10,
        atol: float = 1e-10,
        max_steps: int = 100_000,
    ):
        """Solve the probability-flow ODE exactly (to ``rtol``) from ``x_T`` at ``t_start``
        (default ``t_max``) to ``t_end`` (default ``t_min``; ``t_data`` allowed) with
        diffrax's 8th-order Dormand-Prince method.

        The solve runs in t while ``rho = sigma/alpha > 1`` and in the EDM variables
        ``(x / alpha, rho)`` below, where ``d(x/alpha)/d rho = eps`` stays smooth down to
        ``rho = 0``; so a start at zero terminal SNR and an end at the data are both
        exact. Call with ``jax_enable_x64`` on for a float64 reference.
        """
        t0 = float(process.t_max if t_start is None else t_start)
        t1 = float(process.t_min if t_end is None else t_end)
        x = jnp.asarray(x_T)
        dt = x.dtype
        f_t = self._compiled_solve(process, "t", rtol, atol, max_steps)
        f_rho = self._compiled_solve(process, "rho", rtol, atol, max_steps)

        def solve(fn, a, b, y):
            return fn(y, jnp.asarray(a, dt), jnp.asarray(b, dt))

        rho0 = float(process.rho(jnp.asarray(t0, dt)))
        rho1 = (
            float(process.rho(jnp.asarray(t1, dt)))
            if not (process.t_data is not None and t1 == process.t_data)
            else 0.0
        )
        if rho1 >= 1.0:
            return solve(f_t, t0, t1, x)
        if rho0 > 1.0:
            t_mid = float(process.t_of_lambda(jnp.asarray(0.0, dt)))
            x = solve(f_t, t0, t_mid, x)
            rho0, t0 = 1.0, t_mid
        a0 = process.alpha(jnp.asarray(t0, dt))
        ybar = solve(f_rho, rho0, rho1, x / a0)
        t_fin = process.t_of_rho(jnp.asarray(rho1, dt))
        return process.alpha(t_fin) * ybar


@dataclasses.dataclass(frozen=True, eq=False)
class ExactDenoiser:
    """The exact ``(x0, eps)`` of a :class:`GaussianMixture` under ``process``; usable
    wherever a :class:`~jdiff.Denoiser` is."""

    mixture: GaussianMixture
    process: Process

    def __call__(self, x, t, cond=None) -> Prediction:
        p = self.mixture.posterior(x, t, self.process)
        return Prediction(p.x0.astype(x.dtype), p.eps.astype(x.dtype))


jax.tree_util.register_dataclass(ExactDenoiser, data_fields=["process"], meta_fields=["mixture"])


def random_mixture(
    key, dim: int, n_components: int = 4, *, spread: float = 1.0, std_range=(0.1, 0.5)
) -> GaussianMixture:
    """A random mixture: means ``N(0, spread^2)``, stds uniform in ``std_range``,
    Dirichlet(1) weights. Deterministic in ``key``."""
    k1, k2, k3 = jax.random.split(key, 3)
    means = np.asarray(jax.random.normal(k1, (n_components, dim))) * spread
    stds = np.asarray(jax.random.uniform(k2, (n_components, dim), minval=std_range[0], maxval=std_range[1]))
    w = np.asarray(jax.random.dirichlet(k3, np.ones(n_components)))
    return GaussianMixture(w, means, stds)
