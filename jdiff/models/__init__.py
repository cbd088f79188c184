"""Denoiser networks as Flax NNX modules.

Every model is called as ``model(x, t, cond=None, *, rngs=None)``:

- ``x``: ``(B, d)`` vectors (:class:`MLPResNet`) or ``(B, H, W, C)`` NHWC images
  (:class:`UNet`, :class:`DiT`);
- ``t``: ``(B,)`` float times (what the network sees as time; see ``time_scale`` in
  the configs and ``time_input`` of :class:`jdiff.Denoiser`);
- ``cond``: None, or int32 class labels ``(B,)``; the label ``num_classes`` is the null
  class used by classifier-free guidance;
- ``rngs``: None for eval mode (deterministic), or a JAX PRNG key / ``nnx.Rngs`` for
  train mode (dropout; the model drops labels only with an explicit ``class_dropout``:
  classifier-free-guidance label dropout is ``jdiff.train.LossConfig.label_dropout``).

The output has ``x``'s shape and dtype. For samplers and training use the pure view
:func:`functional` (``apply(params, x, t, cond=None, key=None)``) and
:func:`to_denoiser`; for a model's intermediate features as values (the parts a cache
reuses), :func:`internals`.

:func:`conv_general_dilated` is ``lax.conv_general_dilated`` with gradients that stay on
XLA's fast CPU kernels inside ``lax.scan`` (the U-Net's convolutions use it; pass it as
``conv_general_dilated=`` to ``nnx.Conv`` in a model of your own).
"""

from jdiff.models._common import SelfAttention, attention
from jdiff.models._conv import conv_general_dilated
from jdiff.models._dit import (
    DiT,
    DiTConfig,
    DiTContext,
    dit_b2,
    dit_l2,
    dit_s2,
    dit_tiny,
    dit_xl2,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)
from jdiff.models._embed import (
    ClassEmbedding,
    TimeEmbedding,
    check_labels,
    drop_labels,
    fourier_embedding,
    fourier_frequencies,
    sinusoidal_embedding,
)
from jdiff.models._functional import Apply, abstract_model, count_params, functional, to_denoiser
from jdiff.models._internals import Internals, internals
from jdiff.models._mlp import MLPResNet, MLPResNetConfig
from jdiff.models._unet import UNet, UNetConfig, UNetContext, ddpmpp_cifar10, ddpmpp_cifar10_song, unet_digits

__all__ = [
    "MLPResNet",
    "MLPResNetConfig",
    "UNet",
    "UNetConfig",
    "ddpmpp_cifar10",
    "ddpmpp_cifar10_song",
    "unet_digits",
    "DiT",
    "DiTConfig",
    "dit_s2",
    "dit_b2",
    "dit_l2",
    "dit_xl2",
    "dit_tiny",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
    "TimeEmbedding",
    "ClassEmbedding",
    "sinusoidal_embedding",
    "fourier_embedding",
    "fourier_frequencies",
    "check_labels",
    "drop_labels",
    "SelfAttention",
    "attention",
    "conv_general_dilated",
    "Apply",
    "functional",
    "to_denoiser",
    "count_params",
    "abstract_model",
    "Internals",
    "internals",
    "UNetContext",
    "DiTContext",
]
