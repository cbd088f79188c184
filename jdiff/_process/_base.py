"""The base class of every process (:class:`Process`: the curves, their derivatives, the
SDE view, the prior, time checks) and the helpers the process families share."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._random import normal_per_sample

__all__ = ["Process", "same_process"]


def _register(cls, data_fields=()):
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in data_fields]
    return jax.tree_util.register_dataclass(cls, data_fields=list(data_fields), meta_fields=meta)


def _fdtype(t):
    """Floating dtype to compute in for time values ``t`` (at least float32)."""
    dt = jnp.result_type(t)
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits < 32:
        return jnp.float32
    return dt


def _as_float(t):
    return jnp.asarray(t, dtype=_fdtype(t))


class Process:
    """Base class of a Gaussian process ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Subclasses implement :meth:`log_alpha`, :meth:`log_sigma` and :meth:`t_of_lambda`
    and set the class attributes below. Everything else (alpha, sigma, lambda,
    derivatives, SDE coefficients, prior) is derived here.

    Attributes:
      t_min: smallest time at which a model may be evaluated.
      t_max: largest time (the prior).
      t_data: the time at which ``sigma = 0`` (the data), or ``None`` if the process
        never reaches noise-free data (VE). A time grid may end exactly at ``t_data``.
    """

    t_min: float
    t_max: float
    t_data: float | None = 0.0
    name: str = "process"

    # Capabilities (class attributes, not dataclass fields): a new process states them in
    # its own class and needs no edit anywhere else.
    #: the grid kind that ``kind="default"`` means for this process
    default_grid: ClassVar[str] = "logsnr"
    #: whether the process is a table of discrete training steps; such a process has
    #: ``num_train_steps`` and :meth:`timestep`, and supports ``"discrete"`` time sampling
    discrete: ClassVar[bool] = False
    #: the model time a network trained on this process usually takes (see
    #: :func:`jdiff.model_time`)
    default_time_input: ClassVar[str] = "t"

    # ----------------------------------------------------------- curves (subclasses)
    def log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def t_of_lambda(self, lam):
        """Inverse of :meth:`lambda_`: the time at which ``log(alpha/sigma) == lam``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- derived curves
    def alpha(self, t):
        return jnp.exp(self.log_alpha(_as_float(t)))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(_as_float(t)))

    def lambda_(self, t):
        """Half log signal-to-noise ratio ``log(alpha(t) / sigma(t))``."""
        t = _as_float(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def log_snr(self, t):
        """``log(alpha^2 / sigma^2) = 2 * lambda(t)``."""
        return 2.0 * self.lambda_(t)

    def rho(self, t):
        """The EDM-equivalent noise level ``sigma(t) / alpha(t) = exp(-lambda(t))``."""
        return jnp.exp(-self.lambda_(t))

    def t_of_rho(self, rho):
        rho = _as_float(rho)
        return self.t_of_lambda(-jnp.log(rho))

    def d_alpha(self, t):
        """``d alpha / dt`` by forward-mode autodiff (elementwise)."""
        t = _as_float(t)
        return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

    def d_sigma(self, t):
        """``d sigma / dt`` by forward-mode autodiff (elementwise)."""
        t = _as_float(t)
        return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

    def d_lambda(self, t):
        t = _as_float(t)
        return jax.jvp(self.lambda_, (t,), (jnp.ones_like(t),))[1]

    # ------------------------------------------------------------------ SDE view
    def drift_coef(self, t):
        """``f(t) = d log alpha / dt`` of the forward SDE ``dx = f x dt + g dW``."""
        t = _as_float(t)
        return jax.jvp(self.log_alpha, (t,), (jnp.ones_like(t),))[1]

    def diffusion2(self, t):
        """``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2 = 2 sigma^2 (d log sigma/dt - f)``
        ``= -2 sigma^2 d lambda/dt``."""
        t = _as_float(t)
        return -2.0 * self.sigma(t) ** 2 * self.d_lambda(t)

    # ------------------------------------------------------------------- prior
    def prior_std(self):
        """Standard deviation of the prior at ``t_max`` for unit-variance data:
        ``sqrt(alpha^2 + sigma^2)`` (1 for VP and flows, ~sigma_max for VE/EDM)."""
        t = jnp.asarray(self.t_max, jnp.float32)
        return jnp.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def prior_sample(self, key, shape, dtype=jnp.float32):
        """Draw ``x_T`` of ``shape`` (leading axis = batch) from the prior.

        Each sample gets its own key ``fold_in(key, index)`` so that sample ``i`` is the
        same whether it is drawn alone or in a batch (see :func:`jdiff.per_sample_keys`).
        ``key`` may also be an array of per-sample keys of length ``shape[0]``.
        """
        return (normal_per_sample(key, shape, dtype) * self.prior_std()).astype(dtype)

    # --------------------------------------------------------------- validation
    def check_times(self, t, *, allow_data: bool = True, what: str = "time"):
        """Check that times lie in ``[t_min, t_max]`` (or equal ``t_data`` when
        ``allow_data``) and are finite; return ``t``.

        A concrete ``t`` raises ``ValueError`` at once, listing the bad values. A traced
        ``t`` comes back carrying a runtime check (:func:`jdiff._checks.error_if`): the
        compiled program fails with a message containing the same words ("outside the
        valid range"). Use the returned value downstream.
        """
        lo, hi = self.t_min, self.t_max
        tol = 1e-6 * max(1.0, abs(hi))
        extra = f" or exactly t_data={self.t_data}" if (allow_data and self.t_data is not None) else ""
        arr = concrete(t)
        if arr is not None:
            arr = arr.astype(np.float64)
            bad = (arr < lo - tol) | (arr > hi + tol) | ~np.isfinite(arr)
            if allow_data and self.t_data is not None:
                bad &= ~(arr == self.t_data)
            if np.any(bad):
                vals = arr[bad][:4]
                raise ValueError(f"{what} {vals.tolist()} outside the valid range [{lo}, {hi}]{extra} of {self!r}")
            return t
        tt = jnp.asarray(t)
        bad = (tt < lo - tol) | (tt > hi + tol) | ~jnp.isfinite(tt)
        if allow_data and self.t_data is not None:
            bad &= tt != self.t_data
        return error_if(tt, jnp.any(bad), f"{what} outside the valid range [{lo}, {hi}]{extra} of {self!r}")

    def __repr__(self):
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not isinstance(getattr(self, f.name), (np.ndarray, jax.Array))
        )
        return f"{type(self).__name__}({fields})"


def same_process(a, b) -> bool:
    """Whether two processes are the same: the same type and equal parameters (their
    pytree leaves compared as arrays)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    # traced leaves (a process passed through jit) cannot be compared: only the structure is
    return all(
        isinstance(u, jax.core.Tracer) or isinstance(v, jax.core.Tracer) or np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(la, lb)
    )
