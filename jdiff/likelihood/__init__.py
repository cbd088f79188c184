"""Likelihoods of diffusion models: the probability-flow ODE log-likelihood (with bits
per dimension of quantized data) and the Ito density estimator along reverse-SDE
trajectories.

**Probability-flow ODE.** The marginals ``p_t`` of ``x_t = alpha x0 + sigma eps`` are
transported by the ODE ``dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat`` (Song
et al., "Score-Based Generative Modeling through Stochastic Differential Equations",
ICLR 2021, Eq. 13 written with the denoiser), so along a solution the instantaneous
change of variables (Chen et al., "Neural Ordinary Differential Equations", NeurIPS
2018; Grathwohl et al., "FFJORD", ICLR 2019) gives

    d log p_t(x_t) / dt = -div v(x_t, t),   log p_0(x_0) = log p_T(x_T) + Int_0^T div v dt.

:func:`log_likelihood` integrates the state and the divergence together from the data
time to ``t_max``. The divergence is exact (the trace of the Jacobian, one JVP per
dimension; for small dimensions) or Hutchinson's estimate ``v^T (dv/dx) v`` with probes
``v`` drawn once per sample and kept fixed along the path (FFJORD), Rademacher or
Gaussian; every probe is integrated as its own unbiased estimate. The ODE is solved by
diffrax with adaptive steps (Tsit5, Dopri5 or Dopri8 with a PID controller) or on a
fixed jdiff time grid (Euler, Heun or classic RK4, or any deterministic jdiff solver run
from data to noise as in :func:`jdiff.inversion.invert`, with the divergence integrated
over the grid's nodes in log-SNR). ``time="rho"`` integrates the EDM
form ``y = x / alpha`` against ``rho = sigma / alpha`` (``dy/drho = eps_hat``), which
stays smooth at the data, so the integral may start exactly at ``t_data``.

**Bits per dimension.** :func:`bits_per_dim` adds uniform dequantization
(:class:`Dequantization`) and reports ``-(log p(y) + D log Delta) / (D ln 2)``, with
``Delta`` the width of one quantization bin (derivation in :class:`Dequantization`).

**Ito density.** Along any trajectory of the reverse-time SDE, ``log p_t(x_t)`` evolves
by Ito's lemma with increments only, no divergence (Skreta et al., "The Superposition
of Diffusion Models Using the Ito Density Estimator", ICLR 2025):
:func:`ito_log_density` (derivation in its docstring). :func:`jdiff.superdiff.sample_superdiff`
builds on it.
"""

from jdiff.likelihood._bits import BitsResult, Dequantization, bits_per_dim
from jdiff.likelihood._ito import ito_increment, ito_log_density
from jdiff.likelihood._ode import (
    ADAPTIVE_METHODS,
    DIVERGENCES,
    FIXED_METHODS,
    PROBES,
    TIMES,  # noqa: F401  (public, not in __all__)
    LikelihoodResult,
    log_likelihood,
)
from jdiff.likelihood._prior import gaussian_prior_log_prob

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "LikelihoodResult",
    "BitsResult",
    "Dequantization",
    "log_likelihood",
    "bits_per_dim",
    "gaussian_prior_log_prob",
    "ito_log_density",
    "ito_increment",
]
