"""Training objectives for any jdiff process.

Every objective here is denoising score matching in one of its parameterizations:
draw data ``x0``, a time ``t`` and noise ``eps``, form ``x_t = alpha(t) x0 + sigma(t) eps``
and regress the network output on the target of its parameterization,

    L = E_{x0, t, eps} [ w(t) * mean_features (F(x_t, t) - target(x0, eps, t))^2 ],

with ``target`` from :func:`jdiff.from_x0_eps` (``eps``, ``x0``, ``v = alpha eps - sigma
x0``, ``score = -eps/sigma`` or the flow velocity ``alpha' x0 + sigma' eps``; with
``RectifiedFlow`` the last one is the flow-matching target ``eps - x0``).

The draw of ``(t, eps, x_t)`` is public, :func:`noise_batch`, with
:func:`prediction_fn` (the network at the process time): new objectives such as
preference optimization or distillation are built on these two and
:func:`jdiff.from_x0_eps`, and get the same per-sample randomness as the denoising
losses.

Weightings are written once, in x0 space, and carried to the network's own output
space through the exact Jacobian of :func:`jdiff.to_x0_eps`: the x0 prediction is
linear in the output, ``x0_hat = A(t) x + B(t) out``, so an x0-space weight ``w0(t)``
becomes ``w0(t) * B(t)^2`` on ``(out - target)^2``. For a VP process this reproduces the
closed forms of Hang et al. (``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma) /
(SNR + 1)`` for v, ``min(SNR, gamma)`` for x0) and it is correct for every other
process and parameterization too.

References:
  Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
  Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
    ICLR 2022 (the v parameterization).
  Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based
    Generative Models", NeurIPS 2022 (EDM preconditioning, weighting, log-normal sigma).
  Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023.
  Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023; Liu et al., "Flow
    Straight and Fast", ICLR 2023.
  Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
    Synthesis", ICML 2024 (logit-normal time sampling).
  Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (label dropout).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdiff._param import PREDICTIONS, TIME_INPUTS, broadcast_to_x, from_x0_eps, model_time, to_x0_eps
from jdiff._process import Process
from jdiff._random import drop_labels, is_key_batch, per_sample_keys

__all__ = [
    "WEIGHTINGS",
    "TIME_SAMPLINGS",
    "PRECONDITIONINGS",
    "LossConfig",
    "edm_objective",
    "flow_matching_objective",
    "make_loss_fn",
    "Noised",
    "noise_batch",
    "prediction_fn",
    "sample_times",
    "loss_weight",
    "min_snr_weight",
    "x0_jacobian",
    "edm_coefficients",
    "edm_precondition",
    "drop_labels",  # re-exported from jdiff._random (shared with jdiff.models)
]

WEIGHTINGS = ("none", "min_snr", "edm")
TIME_SAMPLINGS = ("uniform", "logit_normal", "log_normal", "discrete")
PRECONDITIONINGS = (None, "edm")

# Layout of the per-sample random words: one ``jax.random.bits`` call per sample (one
# threefry pass for the whole batch, which keeps compile and run time low) gives
# [model-key word 0, model-key word 1, time, label dropout, noise...].
_W_KEY, _W_TIME, _W_LABEL, _W_NOISE = 0, 2, 3, 4


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _fdtype(x):
    return jnp.result_type(x.dtype, jnp.float32)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What to train: process, parameterization, weighting, time sampling, CFG dropout.

    Attributes:
      process: the :class:`jdiff.Process` of the forward noising.
      prediction: what the network outputs, one of :data:`jdiff.PREDICTIONS`
        (``"flow"`` is flow matching). With ``precondition="edm"`` it must be ``"x0"``
        (the preconditioned wrapper is an x0 predictor).
      weighting: ``"none"`` (plain MSE on the network's own target), ``"min_snr"``
        (``min(SNR, gamma)`` in x0 space, Hang et al. 2023) or ``"edm"`` (Karras et al.
        2022: ``(rho^2 + sigma_data^2) / (rho sigma_data)^2`` in x0 space, ``rho =
        sigma / alpha``).
      min_snr_gamma: the ``gamma`` of min-SNR weighting.
      time_sampling: ``"uniform"`` in ``[t_min, t_max]``; ``"logit_normal"`` (``t =
        t_min + (t_max - t_min) sigmoid(m + s n)``, Esser et al. 2024); ``"log_normal"``
        (``ln rho ~ N(p_mean, p_std^2)``, Karras et al. 2022, mapped through
        ``t_of_rho`` and clipped to ``[t_min, t_max]``); ``"discrete"`` (integer steps
        ``n ~ U{0..N-1}`` of a :class:`jdiff.VPDiscrete`, ``t = (n + 1) / N``).
      logit_mean, logit_std: parameters of logit-normal sampling.
      p_mean, p_std: parameters of log-normal sampling (EDM defaults -1.2, 1.2).
      time_input: what the network receives as time, as in :class:`jdiff.Denoiser`:
        ``"t"``, ``"timestep"`` (``N t - 1``; exact integers with discrete sampling),
        ``"sigma"``, ``"rho"``, ``"log_rho"`` or a callable ``t -> t_in``. Ignored with
        EDM preconditioning, which feeds ``c_noise = ln(rho) / 4``.
      precondition: ``None`` or ``"edm"`` (wrap the raw network with
        :func:`edm_precondition`).
      sigma_data: data standard deviation for EDM preconditioning and weighting.
      label_dropout: probability of replacing a label by the null class
        ``num_classes`` (classifier-free guidance training).
      num_classes: number of real classes; the null class is ``num_classes``.
      data_key, label_key: the batch dictionary keys of data and labels.
      model_rng: pass a dropout key to the network (train mode). ``False`` calls it
        with ``key=None``.
    """

    process: Process
    prediction: str = "eps"
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    time_input: Any = "t"
    precondition: str | None = None
    sigma_data: float = 0.5
    label_dropout: float = 0.0
    num_classes: int | None = None
    data_key: str = "x"
    label_key: str = "label"
    model_rng: bool = True

    def __post_init__(self):
        if not isinstance(self.process, Process):
            raise TypeError(f"process must be a jdiff Process, got {type(self.process).__name__}")
        _choice("prediction", self.prediction, PREDICTIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("time sampling", self.time_sampling, TIME_SAMPLINGS)
        _choice("preconditioning", self.precondition, PRECONDITIONINGS)
        if not callable(self.time_input):
            _choice("time_input", self.time_input, TIME_INPUTS)
        if self.precondition == "edm" and self.prediction != "x0":
            raise ValueError("precondition='edm' makes the model an x0 predictor: set prediction='x0'")
        needs_table = self.time_sampling == "discrete" or self.time_input == "timestep"
        if needs_table and not self.process.discrete:
            what = "time_sampling='discrete'" if self.time_sampling == "discrete" else "time_input='timestep'"
            raise ValueError(f"{what} needs a discrete process (jdiff.vp_discrete), got {self.process!r}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be a probability in [0, 1], got {self.label_dropout}")
        if self.label_dropout > 0 and (self.num_classes is None or self.num_classes < 1):
            raise ValueError("label_dropout > 0 needs num_classes (the null class is label == num_classes)")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")


def edm_objective(
    process: Process | None = None, sigma_data: float = 0.5, *, p_mean: float = -1.2, p_std: float = 1.2, **kw
) -> LossConfig:
    """The full EDM recipe of Karras et al. (2022), Table 1: preconditioned x0
    prediction, ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` and
    ``ln sigma ~ N(p_mean, p_std^2)``. ``process`` defaults to ``jdiff.edm()``."""
    if process is None:
        from jdiff._process import edm

        process = edm(sigma_data=sigma_data)
    return LossConfig(
        process=process,
        prediction="x0",
        weighting="edm",
        time_sampling="log_normal",
        precondition="edm",
        sigma_data=sigma_data,
        p_mean=p_mean,
        p_std=p_std,
        **kw,
    )


def flow_matching_objective(
    process: Process | None = None, *, logit_normal: bool = False, logit_mean: float = 0.0, logit_std: float = 1.0, **kw
) -> LossConfig:
    """(Conditional) flow matching: regress the velocity ``alpha' x0 + sigma' eps``
    (``eps - x0`` for the default ``jdiff.rectified_flow()``), optionally with
    logit-normal ``t`` (Esser et al. 2024)."""
    if process is None:
        from jdiff._process import rectified_flow

        process = rectified_flow()
    return LossConfig(
        process=process,
        prediction="flow",
        time_sampling="logit_normal" if logit_normal else "uniform",
        logit_mean=logit_mean,
        logit_std=logit_std,
        **kw,
    )


# ------------------------------------------------------------------- time sampling


def _keys_for(key, n):
    if is_key_batch(key):
        if key.shape[0] != n:
            raise ValueError(f"got {key.shape[0]} per-sample keys for a batch of {n} samples")
        return key
    return per_sample_keys(key, n)


def _uniform(words, dtype):
    """uint32 words -> uniforms in the open interval (0, 1) with 24 random bits."""
    return ((words >> 8).astype(dtype) + 0.5) * (2.0**-24)


def _std_normal(u):
    """Standard normals from uniforms in (0, 1): ``sqrt(2) erfinv(2u - 1)``."""
    return math.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0)


def _times_from_uniform(u, process: Process, sampling: str, logit_mean, logit_std, p_mean, p_std):
    lo, hi = float(process.t_min), float(process.t_max)
    if sampling == "uniform":
        return lo + (hi - lo) * u
    if sampling == "logit_normal":
        z = logit_mean + logit_std * _std_normal(u)
        return lo + (hi - lo) * jax.nn.sigmoid(z)
    if sampling == "log_normal":
        rho = jnp.exp(p_mean + p_std * _std_normal(u))
        return jnp.clip(process.t_of_rho(rho).astype(u.dtype), lo, hi)
    if not process.discrete:
        raise ValueError(f"time sampling 'discrete' needs a discrete process (jdiff.vp_discrete), got {process!r}")
    N = int(process.num_train_steps)
    step = jnp.minimum(jnp.floor(u * N), N - 1)
    return (step + 1) / N


def sample_times(
    key,
    n: int,
    process: Process,
    sampling: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    dtype=jnp.float32,
):
    """Draw ``n`` training times (``(n,)`` array of ``dtype``).

    ``key`` is one key (sample ``i`` then uses ``fold_in(key, i)``) or ``n`` per-sample
    keys, so a sample's time never depends on the rest of its batch. See
    :class:`LossConfig` for the ``sampling`` kinds. ``"discrete"`` returns ``t = (k +
    1) / N`` for integer steps ``k`` uniform in ``{0, ..., N - 1}``.
    """
    _choice("time sampling", sampling, TIME_SAMPLINGS)
    keys = _keys_for(key, n)
    words = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(keys)
    return _times_from_uniform(_uniform(words, dtype), process, sampling, logit_mean, logit_std, p_mean, p_std)


# ----------------------------------------------------------------------- weightings


def x0_jacobian(process: Process, prediction: str, t):
    """``B(t)`` with ``x0_hat = A(t) x + B(t) out`` for a network output ``out`` of kind
    ``prediction`` (``1`` for x0, ``-sigma/alpha`` for eps, ``-sigma/(alpha^2 +
    sigma^2)`` for v, ...); computed from :func:`jdiff.to_x0_eps` itself, so it cannot
    drift from the conversion the samplers use."""
    t = jnp.asarray(t)
    t1 = jnp.atleast_1d(t)
    one = jnp.ones(t1.shape, _fdtype(t1))
    b = to_x0_eps(prediction, one, jnp.zeros_like(one), t1, process).x0
    return b.reshape(t.shape)


def min_snr_weight(process: Process, prediction: str, t, gamma: float = 5.0):
    """Min-SNR-gamma weight on ``(out - target)^2`` (Hang et al. 2023): ``min(SNR,
    gamma)`` in x0 space, ``SNR = alpha^2 / sigma^2``, times ``B(t)^2``
    (:func:`x0_jacobian`). For VP processes this is ``min(SNR, gamma) / SNR`` (eps),
    ``min(SNR, gamma)`` (x0) and ``min(SNR, gamma) / (SNR + 1)`` (v)."""
    t = jnp.asarray(t)
    snr = jnp.exp(process.log_snr(t))
    return jnp.minimum(snr, gamma) * x0_jacobian(process, prediction, t) ** 2


def loss_weight(weighting: str, process: Process, prediction: str, t, *, gamma: float = 5.0, sigma_data: float = 0.5):
    """Per-sample weight on the squared error of a network output of kind
    ``prediction`` at times ``t``; see :class:`LossConfig` for ``weighting``."""
    _choice("weighting", weighting, WEIGHTINGS)
    t = jnp.asarray(t)
    if weighting == "none":
        return jnp.ones(t.shape, _fdtype(t))
    if weighting == "min_snr":
        return min_snr_weight(process, prediction, t, gamma)
    rho = process.rho(t)
    w0 = (rho**2 + sigma_data**2) / (rho * sigma_data) ** 2
    return w0 * x0_jacobian(process, prediction, t) ** 2


# -------------------------------------------------------------- EDM preconditioning


def edm_coefficients(sigma, sigma_data: float = 0.5):
    """``(c_skip, c_out, c_in, c_noise)`` of Karras et al. (2022), Table 1:
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = ln(s) / 4``."""
    sigma = jnp.asarray(sigma)
    sd2 = sigma_data**2
    n2 = sigma**2 + sd2
    c_skip = sd2 / n2
    c_out = sigma * sigma_data * jax.lax.rsqrt(n2)
    c_in = jax.lax.rsqrt(n2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_precondition(apply: Callable, process: Process, sigma_data: float = 0.5) -> Callable:
    """Wrap a raw network ``F`` into the EDM x0 predictor (Karras et al. 2022, Eq. 7)

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).

    For a process with ``alpha != 1`` it is applied to the EDM variables ``x / alpha``
    and ``rho = sigma / alpha`` (``x / alpha = x0 + rho eps``), so it is exact for every
    jdiff process and is the paper's formula for ``jdiff.edm()``.

    Returns ``apply_x0(params, x, t, cond, key=None)`` taking the process time ``t``;
    the raw network receives ``c_noise`` as its time input.
    """

    def apply_x0(params, x, t, cond=None, key=None):
        dt = _fdtype(x)
        t = jnp.asarray(t, dt)
        rho = process.rho(t)
        a = broadcast_to_x(process.alpha(t), x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(rho, sigma_data)
        xbar = x.astype(dt) / a
        out = apply(params, (broadcast_to_x(c_in, x) * xbar).astype(x.dtype), c_noise.astype(dt), cond, key)
        return (broadcast_to_x(c_skip, x) * xbar + broadcast_to_x(c_out, x) * out.astype(dt)).astype(out.dtype)

    return apply_x0


# ---------------------------------------------------------------- the noising seam


class Noised(NamedTuple):
    """One noised batch (what :func:`noise_batch` returns).

    Attributes:
      t: ``(B,)`` process times, float (``x0``'s dtype, at least float32).
      eps: the standard normal noise, ``x0``'s shape, float (at least float32).
      x_t: ``alpha(t) x0 + sigma(t) eps``, ``x0``'s shape and dtype (what the network sees).
    """

    t: jax.Array
    eps: jax.Array
    x_t: jax.Array


class _Draw(NamedTuple):
    noised: Noised
    words: jax.Array  # (B, _W_NOISE + d) uint32: the whole per-sample draw
    keys: jax.Array  # the per-sample keys


def _as_config(config) -> LossConfig:
    if isinstance(config, LossConfig):
        return config
    if isinstance(config, Process):
        return LossConfig(config)
    raise TypeError(f"config must be a LossConfig or a jdiff Process, got {type(config).__name__}")


def _draw(config: LossConfig, x0, key) -> _Draw:
    x0 = jnp.asarray(x0)
    if x0.ndim < 1:
        raise ValueError(f"x0 needs a leading batch axis, got shape {x0.shape}")
    process = config.process
    n = x0.shape[0]
    dt = _fdtype(x0)
    keys = _keys_for(key, n)
    d = math.prod(x0.shape[1:])
    words = jax.vmap(lambda k: jax.random.bits(k, (_W_NOISE + d,), jnp.uint32))(keys)
    t = _times_from_uniform(
        _uniform(words[:, _W_TIME], dt),
        process,
        config.time_sampling,
        config.logit_mean,
        config.logit_std,
        config.p_mean,
        config.p_std,
    )
    eps = _std_normal(_uniform(words[:, _W_NOISE:], dt)).reshape(x0.shape)
    x0f = x0.astype(dt)
    a = broadcast_to_x(process.alpha(t), x0f)
    s = broadcast_to_x(process.sigma(t), x0f)
    xt = (a * x0f + s * eps).astype(x0.dtype)
    return _Draw(Noised(t, eps, xt), words, keys)


def noise_batch(config: LossConfig | Process, x0, key) -> Noised:
    """Draw each sample's time and noise from its own key and noise the batch.

    This is the seam every objective of :mod:`jdiff.train` is built on: the denoising
    losses of :func:`make_loss_fn` call it (through the same per-sample draw), and a new
    loss (preference optimization against a frozen reference, distillation from a frozen
    teacher, ...) starts from it too, then evaluates the network with
    :func:`prediction_fn` and a target from :func:`jdiff.from_x0_eps`.

    Arguments:
      config: a :class:`LossConfig` (its process and time sampling are used), or a
        :class:`jdiff.Process` (uniform time sampling).
      x0: clean data ``(B, ...)``.
      key: one key (sample ``i`` uses ``fold_in(key, i)``) or ``B`` per-sample keys.

    Returns:
      :class:`Noised` ``(t, eps, x_t)`` with ``x_t = alpha(t) x0 + sigma(t) eps``.

    Sample ``i``'s ``(t, eps)`` is a function of its own key and of the shape of one
    sample only, never of the rest of the batch or of the values of ``x0``. Two
    consequences that new losses rely on: the result for a batch is the rows of the
    results for its samples drawn alone (so accumulation and sharding stay exact), and
    calling it with the same key on two batches of the same shape (the preferred and the
    rejected images of a preference pair) gives both the same ``t`` and ``eps``. With
    the keys :func:`jdiff.train.train_step` passes to the loss, these are exactly the
    ``(t, eps, x_t)`` the denoising loss of :func:`make_loss_fn` trains on. A loss that
    needs more randomness should draw it from ``fold_in(key_i, c)`` of each sample's key
    with its own constant ``c``.

    Example: a Diffusion-DPO loss (Wallace et al., "Diffusion Model Alignment Using
    Direct Preference Optimization", CVPR 2024) on pairs ``batch["win"]``,
    ``batch["lose"]`` against a frozen reference, for ``train(..., frozen=ref_params)``::

        cfg = LossConfig(jdiff.vp_cosine(), prediction="eps")
        predict = prediction_fn(apply, cfg)

        def dpo_loss(params, batch, keys, *, frozen, beta=1000.0):
            def err(p, x0):  # per-sample squared error; same (t, eps) for both images
                t, eps, x_t = noise_batch(cfg, x0, keys)
                target = jdiff.from_x0_eps(cfg.prediction, x0, eps, t, cfg.process)
                d = predict(p, x_t, t, batch.get("label")) - target
                return jnp.mean(d.reshape(d.shape[0], -1) ** 2, axis=1)

            w, l = batch["win"], batch["lose"]
            margin = (err(params, w) - err(frozen, w)) - (err(params, l) - err(frozen, l))
            loss = -jnp.mean(jax.nn.log_sigmoid(-beta * margin))
            return loss, {"loss": loss}
    """
    return _draw(_as_config(config), x0, key).noised


def _model_time(config: LossConfig, t):
    t_in = model_time(config.process, config.time_input, t)
    if config.time_input == "timestep" and config.time_sampling == "discrete":
        return jnp.round(t_in)  # N t - 1 is an integer only up to rounding in float32
    return t_in


def prediction_fn(apply: Callable, config: LossConfig) -> Callable:
    """The network as the losses see it: ``predict(params, x_t, t, cond=None, key=None)``
    takes the process time ``t`` of :func:`noise_batch` and returns the network's output
    of kind ``config.prediction``, with ``config.time_input`` applied (or the EDM
    preconditioning when ``config.precondition == "edm"``). Compare it with
    ``jdiff.from_x0_eps(config.prediction, x0, eps, t, config.process)``."""
    config = _as_config(config)
    if config.precondition == "edm":
        return edm_precondition(apply, config.process, config.sigma_data)

    def predict(params, x_t, t, cond=None, key=None):
        return apply(params, x_t, _model_time(config, t), cond, key)

    return predict


# --------------------------------------------------------------------- the loss


def _model_key(data, keys):
    """A key (of the same kind as ``keys``) from two random uint32 words."""
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(keys)
        if jax.random.key_data(keys).shape[-1] == 2:
            return jax.random.wrap_key_data(data, impl=impl)
        return jax.random.fold_in(keys[0], 0x6D6F64)  # a key type of another width
    return data


def make_loss_fn(apply: Callable, config: LossConfig) -> Callable:
    """Build ``loss_fn(params, batch, key) -> (loss, metrics)``.

    Arguments:
      apply: the network, ``apply(params, x, t_in, cond, key=None) -> out`` with
        ``out.shape == x.shape``; ``key`` is a dropout key in training (``None`` in
        evaluation).
      config: a :class:`LossConfig`.

    The returned function takes ``batch``, a dict with ``batch[config.data_key]`` of
    shape ``(B, ...)`` and optionally integer labels ``batch[config.label_key]`` of shape
    ``(B,)``, and ``key``: one key, or ``B`` per-sample keys. Sample ``i``'s time, noise
    and label dropout come from its own key (``fold_in(key, i)`` for a single key), so
    the loss of a batch is the mean of the losses of its samples computed alone; this is
    what makes gradient accumulation and data parallelism reproduce the full-batch step
    exactly. The time and noise are those of :func:`noise_batch` for the same key. All
    of a sample's randomness comes from one ``jax.random.bits`` draw of its key: the time
    and the label-dropout coin from 24-bit uniforms, the noise through the inverse normal
    CDF. The network's dropout key (one per call) comes from the first sample's draw.

    Label dropout for classifier-free guidance happens here and only here
    (``config.label_dropout``); the jdiff models do not drop labels themselves unless
    their ``class_dropout`` is set explicitly.

    ``loss`` is the batch mean of ``w(t) * mean_features((out - target)^2)``; metrics
    are batch means (``loss`` and the unweighted ``mse``).
    """
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    process = config.process
    predict = prediction_fn(apply, config)

    def loss_fn(params, batch, key):
        if not isinstance(batch, dict) or config.data_key not in batch:
            raise ValueError(
                f"batch must be a dict with the data under {config.data_key!r}, "
                f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
            )
        x0 = jnp.asarray(batch[config.data_key])
        n = x0.shape[0]
        dt = _fdtype(x0)
        (t, eps, xt), words, keys = _draw(config, x0, key)

        cond = batch.get(config.label_key) if config.label_key else None
        if cond is not None and config.label_dropout > 0:
            drop = _uniform(words[:, _W_LABEL], dt) < config.label_dropout
            drop = drop.reshape(drop.shape + (1,) * (jnp.ndim(cond) - 1))
            cond = jnp.where(drop, jnp.asarray(config.num_classes, jnp.asarray(cond).dtype), cond)
        model_key = _model_key(words[0, _W_KEY : _W_KEY + 2], keys) if config.model_rng else None

        out = predict(params, xt, t, cond, model_key)
        if getattr(out, "shape", None) != x0.shape:
            raise ValueError(
                f"the model returned shape {getattr(out, 'shape', type(out))} for input of shape "
                f"{x0.shape}; a denoiser must return an array of the input's shape"
            )
        target = from_x0_eps(config.prediction, x0.astype(dt), eps, t, process)
        err = jnp.mean(jnp.square(out.astype(dt) - target).reshape(n, -1), axis=1)
        w = loss_weight(
            config.weighting, process, config.prediction, t, gamma=config.min_snr_gamma, sigma_data=config.sigma_data
        ).astype(dt)
        loss = jnp.mean(w * err)
        return loss, {"loss": loss, "mse": jnp.mean(err)}

    loss_fn.config = config
    return loss_fn
