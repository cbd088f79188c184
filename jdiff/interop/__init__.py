"""Models researchers already have: diffusers-format folders (``config.json``,
``scheduler_config.json``, weights in ``.safetensors`` or a PyTorch ``.bin``) loaded as
jdiff denoisers, without torch and without running pickled code.

Architectures are jdiff NNX modules built from the folder's own config keys
(``UNet2DModel``, ``DiTTransformer2DModel``, ``AutoencoderKL``); the scheduler config
becomes a jdiff process, parameterization and default grid.
"""

from jdiff.interop._convert import UnsupportedModelError, WeightError, Weights
from jdiff.interop._scheduler import SCHEDULERS, Scheduler, Thresholding, scheduler_from_config

__all__ = [
    "UnsupportedModelError",
    "WeightError",
    "Weights",
    "SCHEDULERS",
    "Scheduler",
    "Thresholding",
    "scheduler_from_config",
]
