"""jdiff: a JAX toolkit for diffusion and flow models.

Processes (:mod:`jdiff._process`), parameterizations and the denoiser boundary
(:mod:`jdiff._param`), time grids, exponential-integrator solvers
(:mod:`jdiff.solvers`), :func:`sample`, and the exact Gaussian-mixture testbed
(:mod:`jdiff.testbed`).
"""

from jdiff import metrics, solvers, wrappers
from jdiff._adjoint import Adjoint
from jdiff._checks import CheckFailed, check_message
from jdiff._core import phi
from jdiff._generate import SamplingConfig, generate
from jdiff._gradient import Backprop, GradientStrategy, Remat, Truncated
from jdiff._grid import GRID_KINDS, default_grid_kind, time_grid
from jdiff._padded import sample_padded
from jdiff._param import (
    PREDICTIONS,
    TIME_INPUTS,
    Denoiser,
    Prediction,
    convert,
    denoiser,
    from_x0_eps,
    model_time,
    to_x0_eps,
)
from jdiff._process import (
    EDM,
    VE,
    Process,
    RectifiedFlow,
    SubVP,
    VPCosine,
    VPDiscrete,
    VPLinear,
    ddpm_betas,
    edm,
    rectified_flow,
    rescale_zero_terminal_snr,
    sub_vp,
    ve,
    vp_cosine,
    vp_discrete,
    vp_linear,
)
from jdiff._random import per_sample_keys
from jdiff._sample import SampleInfo, sample, validate_grid


def prior_sample(process, key, shape, dtype=None):
    """Draw ``x_T`` from ``process``'s prior; sample ``i`` uses ``fold_in(key, i)``
    (or ``key[i]`` for an array of keys), independent of the batch."""
    import jax.numpy as jnp

    return process.prior_sample(key, tuple(shape), jnp.float32 if dtype is None else dtype)


__version__ = "0.1.0"

_LAZY = (
    "models",
    "train",
    "data",
    "testbed",
    "features",
    "inversion",
    "inverse_problems",
    "inverse",
    "likelihood",
    "superdiff",
    "tune",
    "runs",  # the run layer (configuration, run directories, presets, shipped models)
)


def __getattr__(name):
    # Subpackages with heavy imports (flax, orbax, Pillow, scikit-learn, diffrax) load on
    # first use: ``jdiff.train`` works without ``import jdiff.train``.
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"jdiff.{name}")
    raise AttributeError(f"module 'jdiff' has no attribute {name!r}")


__all__ = [
    "metrics",
    "sample_padded",
    "solvers",
    "generate",
    "SamplingConfig",
    "wrappers",
    "phi",
    "GRID_KINDS",
    "default_grid_kind",
    "time_grid",
    "PREDICTIONS",
    "TIME_INPUTS",
    "model_time",
    "Denoiser",
    "Prediction",
    "convert",
    "denoiser",
    "from_x0_eps",
    "to_x0_eps",
    "Process",
    "EDM",
    "VE",
    "RectifiedFlow",
    "SubVP",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "ddpm_betas",
    "edm",
    "rectified_flow",
    "rescale_zero_terminal_snr",
    "sub_vp",
    "ve",
    "vp_cosine",
    "vp_discrete",
    "vp_linear",
    "per_sample_keys",
    "prior_sample",
    "SampleInfo",
    "sample",
    "GradientStrategy",
    "Backprop",
    "Remat",
    "Adjoint",
    "Truncated",
    "validate_grid",
    "check_message",
    "CheckFailed",
]
