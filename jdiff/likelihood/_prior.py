"""The default prior of the likelihoods (the Gaussian that :func:`jdiff.prior_sample` draws
from) and a per-sample sum shared by the estimators."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["gaussian_prior_log_prob"]


def gaussian_prior_log_prob(process, x_T):
    """``log N(x_T; 0, (alpha_T^2 + sigma_T^2) I)`` summed per sample: the prior that
    :func:`jdiff.prior_sample` draws from (unit-variance data), at ``t_max``."""
    x = jnp.asarray(x_T)
    dt = jnp.result_type(x.dtype, jnp.float32)
    t = jnp.asarray(process.t_max, dt)
    var = process.alpha(t) ** 2 + process.sigma(t) ** 2
    xf = x.reshape(x.shape[0], -1).astype(dt)
    D = xf.shape[1]
    return -0.5 * jnp.sum(xf * xf, axis=1) / var - 0.5 * D * jnp.log(2.0 * jnp.pi * var)


def _feature_sum(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)
