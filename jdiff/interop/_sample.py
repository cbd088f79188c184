"""Sampling a diffusers-format model, as ``jdiff sample --model`` does:
:func:`sample_model` (load, sample with any jdiff solver at a chosen NFE, guidance and
class labels, decode through the VAE, save the images)."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from jdiff import plotting
from jdiff._generate import SamplingConfig, generate
from jdiff.interop._folder import DiffusersModel, load_diffusers

__all__ = ["ModelSamples", "sample_model"]


@dataclasses.dataclass(frozen=True)
class ModelSamples:
    """What :func:`sample_model` made.

    Attributes:
      images: ``(num, H, W, C)`` float32, nominally in [-1, 1] (decoded by the VAE for
        latent diffusion).
      latents: ``(num, h, w, c)`` the denoiser's samples before decoding (None for
        pixel-space models).
      labels: the class label of each sample (None for unconditional models).
      solver: the solver's name; nfe: network calls per sample (2 per evaluation with
        guidance); guidance: the scale used; seconds: time of the sampling and decoding.
      image_path, npz_path: the files written (None when ``out`` was not given).
    """

    images: np.ndarray
    latents: np.ndarray | None
    labels: np.ndarray | None
    solver: str
    nfe: int
    guidance: float
    seconds: float
    image_path: str | None = None
    npz_path: str | None = None


def _labels(model: DiffusersModel, num: int, class_label: int | None, guidance: float):
    if not model.num_classes:
        if class_label is not None or guidance != 1.0:
            raise ValueError(f"{model.path}: the model is unconditional; class labels and guidance do not apply")
        return None
    if class_label is not None and not 0 <= class_label < model.num_classes:
        raise ValueError(f"the class label must be in [0, {model.num_classes}), got {class_label}")
    if class_label is not None:
        return np.full(num, class_label, np.int32)
    return (np.arange(num) % model.num_classes).astype(np.int32)


def sample_model(
    model: DiffusersModel | str,
    *,
    solver: str | None = None,
    order: int = 0,
    nfe: int | None = None,
    num: int = 16,
    seed: int = 0,
    guidance: float = 1.0,
    class_label: int | None = None,
    batch_size: int = 0,
    grid_kind: str = "default",
    out: str | None = None,
) -> ModelSamples:
    """Sample a diffusers-format model with a jdiff solver on the scheduler's default grid.

    Arguments:
      model: a :class:`DiffusersModel` or a path for :func:`load_diffusers`.
      solver, order: a name of :func:`jdiff.solvers.names` (or a factory name with
        ``order``); default the one closest to the scheduler (``model.default_solver``).
      nfe: model evaluations per sample (default the pipeline's number of steps).
      num, seed: number of samples; the seed of their noise (sample ``i`` depends only
        on ``(seed, i)``, see :func:`jdiff.generate`).
      guidance: classifier-free guidance scale (1: none; needs a model with a null class).
      class_label: the class of every sample (default: cycle through the classes).
      batch_size: samples per device program (0: all at once); the VAE decodes in the
        same chunks.
      grid_kind: ``"default"`` (the scheduler's timesteps) or a jdiff grid kind
        (:data:`jdiff.GRID_KINDS`) on the same process (:meth:`DiffusersModel.grid`).
      out: an image file (``.png``/``.jpg``) for the grid of samples; an ``.npz`` with
        images, latents, labels and the settings is written beside it.

    Returns:
      a :class:`ModelSamples`.
    """
    if not isinstance(model, DiffusersModel):
        model = load_diffusers(model)
    settings = SamplingConfig(
        solver=solver or model.default_solver,
        order=order,
        nfe=model.default_steps if nfe is None else nfe,
        num=num,
        guidance=guidance,
        seed=seed,
        grid_kind=grid_kind,
    )
    sol = settings.make_solver()
    labels = _labels(model, settings.num, class_label, settings.guidance)
    den = model.sampling_denoiser(settings.guidance)
    grid = model.grid(settings.nfe, sol, settings.grid_kind)
    t0 = time.perf_counter()
    x, spent = generate(
        sol,
        den,
        settings.num,
        model.shape,
        nfe=settings.nfe if sol.init_uses_nfe else None,  # the grid fixes it for the others
        grid=grid,
        seed=settings.seed,
        cond=labels,
        batch_size=batch_size,
        return_nfe=True,
    )
    latents = None
    if model.vae is not None:
        latents = x
        step = batch_size or settings.num
        x = np.concatenate([np.asarray(model.decode(latents[i : i + step])) for i in range(0, settings.num, step)])
    x = np.asarray(x, np.float32)
    seconds = time.perf_counter() - t0
    img = npz = None
    if out is not None:
        root, ext = os.path.splitext(out)
        img, npz = (out if ext else out + ".png"), (root if ext else out) + ".npz"
        plotting.image_format(img)  # before anything is written
        title = f"{os.path.basename(os.path.normpath(model.path))}: {sol.name}, nfe {spent}"
        plotting.save_samples(x, img, title=title)
        os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
        np.savez(
            npz,
            images=x,
            latents=latents if latents is not None else np.zeros((0,), np.float32),
            labels=labels if labels is not None else np.zeros((0,), np.int32),
            solver=sol.name,
            nfe=spent,
            guidance=settings.guidance,
            seed=settings.seed,
            model=model.path,
        )
    return ModelSamples(x, latents, labels, sol.name, int(spent), settings.guidance, seconds, img, npz)
