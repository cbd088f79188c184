"""Preference losses as ``loss_fn(params, batch, keys, frozen=...)`` for :mod:`jdiff.train`."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jdiff._param import from_x0_eps
from jdiff.preference._losses import diffusion_dpo_loss, kto_loss, mapo_loss, per_sample_error
from jdiff.train._objectives import LossConfig, _as_config, loss_weight, noise_batch, prediction_fn

__all__ = ["METHODS", "make_preference_loss", "denoising_errors"]

METHODS = ("dpo", "hinge", "ipo", "mapo", "kto")
_NEEDS_REFERENCE = ("dpo", "hinge", "ipo", "kto")


def denoising_errors(predict, config: LossConfig, params, x0, keys, cond=None):
    """Per-sample weighted denoising errors ``w(t) mean_features (F - target)^2`` of the
    network ``predict`` (:func:`jdiff.train.prediction_fn`) with ``params`` on clean
    samples ``x0`` noised by :func:`jdiff.train.noise_batch` with ``keys`` (so two calls
    with the same keys, on the winners and on the losers, share ``t`` and ``eps``). The
    network runs in eval mode (no dropout), so the policy and the reference see the same
    function of their parameters. ``(B,)``."""
    x0 = jnp.asarray(x0)
    t, eps, x_t = noise_batch(config, x0, keys)
    dt = eps.dtype
    target = from_x0_eps(config.prediction, x0.astype(dt), eps, t, config.process)
    out = predict(params, x_t, t, cond, None)
    w = loss_weight(
        config.weighting, config.process, config.prediction, t, gamma=config.min_snr_gamma, sigma_data=config.sigma_data
    )
    return w.astype(dt) * per_sample_error(out, target)


def _check_batch(batch, keys_needed):
    if not isinstance(batch, dict) or any(k not in batch for k in keys_needed):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"a preference batch must be a dict with keys {list(keys_needed)}, got {got}")


def make_preference_loss(
    apply: Callable,
    config,
    method: str = "dpo",
    *,
    policy: Callable | None = None,
    reference: Callable | None = None,
    **loss_kw,
) -> Callable:
    """Build ``loss_fn(params, batch, keys, *, frozen=None) -> (loss, metrics)`` for
    :func:`jdiff.train.train_step` / :func:`jdiff.train.train` with the reference as the
    state's frozen parameters (``init_train_state(..., frozen=ref_params)``).

    Args:
      apply: the network, ``apply(params, x, t_in, cond, key=None)``.
      config: a :class:`jdiff.train.LossConfig` (process, parameterization, weighting,
        time sampling, label key) or a process.
      method: ``"dpo"``, ``"hinge"``, ``"ipo"`` (:func:`diffusion_dpo_loss` kinds),
        ``"mapo"`` (:func:`mapo_loss`, reference-free) or ``"kto"`` (:func:`kto_loss`).
      policy: ``policy(params, frozen) -> network params`` (default: ``params``); e.g.
        ``lambda lora, base: lora_merge(base, lora)`` to train adapters only.
      reference: ``reference(frozen) -> network params`` of the reference (default:
        ``frozen``); with LoRA the frozen base *is* the reference, held once.
      **loss_kw: the loss's options (``beta``, ``half``, ``lambda_d``, ...).

    The batch: pairs ``{"win": (B, ...), "lose": (B, ...), label_key: (B,)}`` (the label
    optional) for the pair methods; ``{data_key: (B, ...), "desirable": (B,), label_key:
    (B,)}`` for ``"kto"`` (see :mod:`jdiff.preference._data`).

    Raises:
      ValueError: an unknown method; at call time a batch without the needed keys, or a
        reference method called without ``frozen``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown preference method {method!r}; expected one of {METHODS}")
    cfg = _as_config(config)
    predict = prediction_fn(apply, cfg)
    policy = policy or (lambda params, frozen: params)
    reference = reference or (lambda frozen: frozen)
    kinds = {"dpo": "sigmoid", "hinge": "hinge", "ipo": "ipo"}

    def loss_fn(params, batch, keys, *, frozen=None):
        if method in _NEEDS_REFERENCE and frozen is None:
            raise ValueError(f"preference method {method!r} needs the reference as frozen parameters")
        p = policy(params, frozen)
        cond = batch.get(cfg.label_key) if isinstance(batch, dict) and cfg.label_key else None

        def err(prm, x0):
            return denoising_errors(predict, cfg, prm, x0, keys, cond)

        if method == "kto":
            _check_batch(batch, (cfg.data_key, "desirable"))
            x = batch[cfg.data_key]
            ref = reference(frozen)
            return kto_loss(err(p, x), err(ref, x), batch["desirable"], **loss_kw)
        _check_batch(batch, ("win", "lose"))
        w, l = batch["win"], batch["lose"]
        if method == "mapo":
            return mapo_loss(err(p, w), err(p, l), **loss_kw)
        ref = reference(frozen)
        return diffusion_dpo_loss(err(p, w), err(p, l), err(ref, w), err(ref, l), kind=kinds[method], **loss_kw)

    loss_fn.config = cfg
    loss_fn.method = method
    return loss_fn
