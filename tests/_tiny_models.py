"""Tiny random-weight networks shared by the acceleration tests."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jdiff import models as M


def randomized(model, seed: int = 1):
    """Perturb every parameter of ``model`` in place and return it: the zero-initialized
    output, adaLN and residual layers would make a fresh model the zero function (every
    block an identity), hiding any mix-up of features. NumPy draws the perturbation, so
    no eager JAX op is compiled per parameter shape."""
    leaves, tdef = jax.tree.flatten(nnx.state(model))
    rng = np.random.default_rng(seed)
    new = [(np.asarray(a) + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype) for a in leaves]
    nnx.update(model, jax.tree.unflatten(tdef, new))
    return model


def tiny_unet(num_classes: int = 3):
    """An 8x8x1 class-conditional U-Net of two levels (8 and 16 channels, one residual
    block per level, attention at 4x4): four cuts, randomized."""
    cfg = M.UNetConfig(
        image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), head_channels=8, num_groups=2, num_classes=num_classes, scale_shift=True,
    )  # fmt: skip
    return randomized(M.UNet(cfg, rngs=nnx.Rngs(0)))
