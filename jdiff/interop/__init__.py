"""Models researchers already have: diffusers-format folders (``config.json``,
``scheduler_config.json``, weights in ``.safetensors`` or a PyTorch ``.bin``) loaded as
jdiff denoisers, without torch and without running pickled code.

Architectures are jdiff NNX modules built from the folder's own config keys
(``UNet2DModel``, ``DiTTransformer2DModel``, ``AutoencoderKL``); the scheduler config
becomes a jdiff process, parameterization and default grid.

- :func:`load_diffusers`: a folder (or a model id, with ``huggingface_hub``) -> a
  :class:`DiffusersModel`: the denoiser, its default grid, classes and VAE;
- :func:`sample_model`: sample it with any jdiff solver, decode, save (``jdiff sample
  --model``);
- :func:`scheduler_from_config`: a ``scheduler_config.json`` -> a :class:`Scheduler`;
- the architectures as NNX modules in NHWC, each with ``from_diffusers(config, weights)``:
  :class:`UNet2DModel` (:mod:`jdiff.interop.unet2d`), :class:`DiTTransformer2D`
  (:mod:`jdiff.interop.dit`), :class:`AutoencoderKL` (:mod:`jdiff.interop.vae`).

Example::

    model = jdiff.interop.load_diffusers("ddpm-cifar10-32")       # a downloaded folder
    solver = jdiff.solvers.get("dpm++2m")
    x = jdiff.sample(solver, model.sampling_denoiser(), x_T, model.grid(10, solver))
"""

from jdiff.interop import dit, unet2d, vae
from jdiff.interop._convert import UnsupportedModelError, WeightError, Weights
from jdiff.interop._folder import (
    ARCHITECTURES,
    ROLES,
    DiffusersModel,
    ModelFolderError,
    load_diffusers,
    load_vae,
    register_architecture,
)
from jdiff.interop._sample import ModelSamples, sample_model
from jdiff.interop._scheduler import SCHEDULERS, Scheduler, Thresholding, scheduler_from_config
from jdiff.interop.dit import DiTTransformer2D
from jdiff.interop.unet2d import UNet2DModel
from jdiff.interop.vae import AutoencoderKL

__all__ = [
    "UNet2DModel",
    "DiTTransformer2D",
    "AutoencoderKL",
    "dit",
    "unet2d",
    "vae",
    "UnsupportedModelError",
    "WeightError",
    "Weights",
    "SCHEDULERS",
    "Scheduler",
    "Thresholding",
    "scheduler_from_config",
    "ARCHITECTURES",
    "ROLES",
    "DiffusersModel",
    "ModelFolderError",
    "load_diffusers",
    "load_vae",
    "register_architecture",
    "ModelSamples",
    "sample_model",
]
