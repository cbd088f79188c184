"""Gaussian diffusion and flow processes.

Every process jdiff supports has Gaussian marginals

    x_t = alpha(t) * x_0 + sigma(t) * eps,     eps ~ N(0, I),

and is therefore fully described by the two curves ``alpha(t)`` and ``sigma(t)``, or
equivalently by ``log alpha(t)`` and the half log signal-to-noise ratio
``lambda(t) = log(alpha(t) / sigma(t))``. Solvers only ever use these curves, the inverse
``t(lambda)`` and the valid time range, so every process below plugs into every solver.

Time always runs from data (small t) to noise (large t), and ``lambda`` is strictly
decreasing in t. Derivatives (the SDE drift and diffusion) come from ``jax.jvp`` of the
curves, never from hand-written formulas.

Each process is a frozen dataclass registered as a JAX pytree: scalar hyper-parameters
are static metadata and tables (the discrete ``alphas_cumprod``) are array leaves, so a
process can be closed over or passed through ``jit``.
"""

from jdiff._process._base import Process, same_process  # noqa: F401  (same_process: used across jdiff, not in __all__)
from jdiff._process._flow import RectifiedFlow, rectified_flow
from jdiff._process._ve import EDM, VE, edm, ve
from jdiff._process._vp import (
    SubVP,
    VPCosine,
    VPDiscrete,
    VPLinear,
    ddpm_betas,
    rescale_zero_terminal_snr,
    sub_vp,
    vp_cosine,
    vp_discrete,
    vp_linear,
)

__all__ = [
    "Process",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "vp_linear",
    "vp_cosine",
    "vp_discrete",
    "sub_vp",
    "ve",
    "edm",
    "rectified_flow",
    "ddpm_betas",
    "rescale_zero_terminal_snr",
]
