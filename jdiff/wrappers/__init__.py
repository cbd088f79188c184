"""Denoiser wrappers: values that take a denoiser and return one, acting on the
``(x0, eps)`` prediction at the boundary. This package is their one home: the base
class (:class:`InnerWrapper`), thresholding, the wrappers that move the network's time,
and the guidance family. :func:`chain` composes them, as ``optax.chain`` composes
gradient transformations: ``chain(a, b)(den) == b(a(den))``.

- :func:`static_threshold`: clip x0 to the data range (Ho et al., "Denoising Diffusion
  Probabilistic Models", 2020, sampling code; Saharia et al. 2022, Sec. 2.3).
- :func:`dynamic_threshold`: per sample, ``s = max(1, quantile(|x0|, p))`` and
  ``x0 <- clip(x0, -s, s) / s`` (Saharia et al., "Photorealistic Text-to-Image
  Diffusion Models with Deep Language Understanding" (Imagen), NeurIPS 2022, Sec. 2.3).
- :func:`time_shift`: the time-shift sampler's variance-matched model time (Li et al.,
  "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
  Steps", ICLR 2024): the network is evaluated at the time, within a window around the
  step's time, whose marginal variance best matches the current sample's.
- :func:`network_time`: decoupled network times (Tong et al., "Learning to Discretize
  Denoising Diffusion ODEs", ICLR 2025, the released code's second set of learned
  times): at the solver's grid time ``t_i`` the network is evaluated at ``s_i``.
- :func:`guidance`: classifier-free guidance ``p_u + w (p_c - p_u)`` (Ho & Salimans,
  "Classifier-Free Diffusion Guidance", 2021), with both passes in one batched call, and
  its variants (CFG rescale, guidance interval, :class:`APG`), :func:`autoguidance`,
  :func:`classifier_guidance` and time-varying scales (:func:`schedule`); the methods
  and their papers are described in ``jdiff/wrappers/_guidance.py``.

After thresholding, eps is recomputed from x0 so that ``x = alpha x0 + sigma eps``
still holds; guidance combines x0 and eps alike, which keeps it too.

Wrappers are values: frozen dataclasses registered as pytrees whose static settings
(thresholds, quantiles) are metadata and whose arrays (the wrapped denoiser's
parameters, the guidance scale, the null conditioning) are leaves. Two wrappers built
with equal settings around equal denoisers are equal and hash alike (the hash covers
only the static part), and share one compiled sampler. Float settings that may be
traced (a guidance scale or schedule, network times) are checked at run time under
``jit`` as they are eagerly (:func:`jdiff._checks.error_if`).
"""

from __future__ import annotations

from jdiff.wrappers._base import Chain, Guided, InnerWrapper, chain
from jdiff.wrappers._classifier import classifier_guidance
from jdiff.wrappers._guidance import APG, autoguidance, guidance
from jdiff.wrappers._scale import Schedule, schedule
from jdiff.wrappers._threshold import dynamic_threshold, static_threshold
from jdiff.wrappers._time import network_time, time_shift

__all__ = [
    "InnerWrapper",
    "Guided",
    "Chain",
    "chain",
    "time_shift",
    "network_time",
    "static_threshold",
    "dynamic_threshold",
    "guidance",
    "autoguidance",
    "classifier_guidance",
    "schedule",
    "Schedule",
    "APG",
]
