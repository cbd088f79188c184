"""Time and class embeddings.

Time features (no parameters), followed by an MLP in :class:`TimeEmbedding`:

- :func:`sinusoidal_embedding`: the transformer position encoding (Vaswani et al.,
  "Attention Is All You Need", NeurIPS 2017, Sec. 3.5) used as a timestep embedding by
  DDPM (Ho et al., NeurIPS 2020, App. B) and ADM (Dhariwal & Nichol, NeurIPS 2021).
- :func:`fourier_embedding`: Gaussian random Fourier features (Tancik et al., NeurIPS
  2020) as used by NCSN++ (Song et al., "Score-Based Generative Modeling through
  Stochastic Differential Equations", ICLR 2021).

Which time a network sees is chosen at the :class:`jdiff.Denoiser` boundary
(``time_input``). The sinusoidal features resolve a range of about ``2 pi`` per
period of the fastest frequency, so scale the time to the range the frequencies were
designed for: ``scale=1000`` for a continuous ``t`` in [0, 1] (the 1000-step DDPM
convention; ``Denoiser(time_input="t")``), ``scale=1`` for a discrete timestep index in
[0, 999] (``time_input="timestep"``), and ``scale=0.25`` with ``time_input="log_rho"``
(``log(sigma / alpha)``, i.e. ``log sigma`` for EDM) to feed EDM's
``c_noise = log(sigma) / 4`` (Karras et al., NeurIPS 2022, Table 1), which EDM gives
unscaled to the DDPM++ positional embedding.

Classes: :class:`ClassEmbedding` is a table of ``num_classes + 1`` rows whose last row
is the NULL CLASS: the label value ``num_classes`` means "no label" and is what
classifier-free guidance (Ho & Salimans, 2021) evaluates for the unconditional branch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdiff._checks import concrete, error_if
from jdiff._random import drop_labels
from jdiff.models._common import KeySeq, as_dropout_key, check_time, xavier_uniform

__all__ = [
    "sinusoidal_embedding",
    "fourier_embedding",
    "fourier_frequencies",
    "TimeEmbedding",
    "ClassEmbedding",
    "check_labels",
    "drop_labels",
    "conditioning",
    "TIME_EMBEDDINGS",
]

TIME_EMBEDDINGS = ("sinusoidal", "fourier")


def sinusoidal_embedding(t, dim: int, *, scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal features of a batch of times.

    For ``half = dim // 2`` frequencies ``w_k = max_period ** (-k / half)``,
    ``k = 0 .. half - 1``::

        emb(t) = [cos(scale t w_0), ..., cos(scale t w_{half-1}),
                  sin(scale t w_0), ..., sin(scale t w_{half-1})]

    (an odd ``dim`` gets one trailing zero). The highest frequency is 1 and the lowest
    about ``1 / max_period`` per unit of ``scale * t``.

    Args:
      t: ``(B,)`` times (any real values).
      dim: embedding width.
      scale: multiplies ``t`` first (1000 for ``t`` in [0, 1]; 1 for discrete steps).
      max_period: the longest period, in units of ``scale * t``.

    Returns:
      ``(B, dim)`` float32.
    """
    if dim < 2:
        raise ValueError(f"a sinusoidal embedding needs dim >= 2, got {dim}")
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_frequencies(dim: int, *, std: float = 16.0, seed: int = 0):
    """The fixed frequencies ``W ~ N(0, std^2)``, shape ``(dim // 2,)``, of
    :func:`fourier_embedding`: a deterministic function of ``(dim, std, seed)``."""
    return std * jax.random.normal(jax.random.key(seed), (dim // 2,), jnp.float32)


def fourier_embedding(t, dim: int, *, std: float = 16.0, seed: int = 0, scale: float = 1.0):
    """Gaussian random Fourier features ``[sin(2 pi W s t), cos(2 pi W s t)]`` with
    ``W = fourier_frequencies(dim, std=std, seed=seed)`` and ``s = scale``.

    NCSN++ uses ``std = 16`` with input ``log(sigma)``. The frequencies are not
    trained and not stored: they are regenerated from the static seed (and
    constant-folded under ``jit``), so a model is fully described by its config and
    its :class:`~flax.nnx.Param` s.

    Returns:
      ``(B, dim)`` float32 (an odd ``dim`` gets one trailing zero).
    """
    if dim < 2:
        raise ValueError(f"a Fourier embedding needs dim >= 2, got {dim}")
    t = jnp.asarray(t, jnp.float32)
    w = fourier_frequencies(dim, std=std, seed=seed)
    args = 2.0 * jnp.pi * (scale * t)[:, None] * w[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimeEmbedding(nnx.Module):
    """Time features followed by a two-layer MLP: ``Linear -> SiLU -> Linear``.

    Args:
      out_dim: width of the returned embedding.
      kind: ``"sinusoidal"`` (:func:`sinusoidal_embedding`) or ``"fourier"``
        (:func:`fourier_embedding`).
      freq_dim: width of the time features (default ``out_dim``).
      scale: multiplies ``t`` before the features (see the module docstring).
      max_period: for ``"sinusoidal"``.
      fourier_std, fourier_seed: for ``"fourier"``.
      init: kernel initializer of the two linear layers.
      dtype, param_dtype: compute and parameter dtypes.

    The output has no final activation; callers apply one where the architecture does.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        kind: str = "sinusoidal",
        freq_dim: int | None = None,
        scale: float = 1.0,
        max_period: float = 10000.0,
        fourier_std: float = 16.0,
        fourier_seed: int = 0,
        init=xavier_uniform,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time embedding {kind!r}; expected one of {TIME_EMBEDDINGS}")
        self.kind = kind
        self.freq_dim = int(freq_dim or out_dim)
        self.scale = float(scale)
        self.max_period = float(max_period)
        self.fourier_std = float(fourier_std)
        self.fourier_seed = int(fourier_seed)
        self.dtype = dtype
        self.fc1 = nnx.Linear(self.freq_dim, out_dim, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(out_dim, out_dim, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def features(self, t):
        """The parameter-free time features, ``(B, freq_dim)`` float32."""
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(t, self.freq_dim, scale=self.scale, max_period=self.max_period)
        return fourier_embedding(t, self.freq_dim, std=self.fourier_std, seed=self.fourier_seed, scale=self.scale)

    def __call__(self, t):
        h = self.features(t)
        if self.dtype is not None:
            h = h.astype(self.dtype)
        return self.fc2(nnx.silu(self.fc1(h)))


def check_labels(cond, batch: int, num_classes: int):
    """Validate class labels for a model with ``num_classes`` classes.

    Returns an int32 ``(batch,)`` array: ``cond`` itself, or the null class
    ``num_classes`` everywhere when ``cond`` is None. Raises ``ValueError`` for a
    wrong shape and for values outside ``[0, num_classes]`` (``num_classes`` is the null
    class), ``TypeError`` for non-integer labels. The range check holds under ``jit``
    too (:func:`jdiff._checks.error_if`): concrete labels raise at once, traced ones make
    the compiled program fail with the same message instead of returning NaN.
    """
    if num_classes <= 0:
        if cond is not None:
            raise ValueError("this model is unconditional (num_classes=0) but class labels were given; pass cond=None")
        return None
    if cond is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    cond = jnp.asarray(cond)
    if not jnp.issubdtype(cond.dtype, jnp.integer):
        raise TypeError(f"class labels must be integers (int32), got dtype {cond.dtype}")
    if cond.shape != (batch,):
        raise ValueError(f"class labels must have shape ({batch},) (one per sample), got {cond.shape}")
    msg = f"class labels must lie in [0, {num_classes - 1}], or equal {num_classes} for the null (unconditional) class"
    c = concrete(cond)
    if c is not None:
        if c.size and (c.min() < 0 or c.max() > num_classes):
            bad = c[(c < 0) | (c > num_classes)]
            raise ValueError(f"{msg}; got {bad[:8].tolist()}")
        return cond.astype(jnp.int32)
    # The check is attached to one replicated flag, not to the labels: under a sharded
    # jit the runtime check then moves a scalar to one device, not the batch of labels.
    bad = jnp.any((cond < 0) | (cond > num_classes))
    bad = error_if(bad, bad, msg)
    return jnp.where(bad, num_classes, cond).astype(jnp.int32)  # keeps the check in the program


def conditioning(time_embed, class_embed, t, cond, batch: int, num_classes: int, class_dropout: float, rngs):
    """The model-call preamble shared by every jdiff model: validate the times (``(B,)``
    or a scalar) and the labels (:func:`check_labels`), turn ``rngs`` into a
    :class:`~jdiff.models._common.KeySeq`, and build the conditioning vector
    ``time_embed(t) + class_embed(labels)`` (no final activation).

    Classifier-free-guidance label dropout belongs to the training objective
    (``jdiff.train.LossConfig.label_dropout``); the model drops labels only when asked
    explicitly, with ``class_dropout > 0`` in train mode (through
    :func:`jdiff._random.drop_labels` with the sequence's first key). Returns
    ``(embedding, keys)``; the model draws its dropout keys from ``keys``."""
    t = check_time(t, batch)
    labels = check_labels(cond, batch, num_classes)
    keys = KeySeq(as_dropout_key(rngs))
    emb = time_embed(t)
    if class_embed is not None:
        if keys.train:
            # the label-dropout key is taken even when class_dropout is 0, so the dropout
            # sites keep their keys (and trained runs their numbers) whatever it is
            labels = drop_labels(keys.next(), labels, num_classes, class_dropout)
        emb = emb + class_embed(labels).astype(emb.dtype)
    return emb, keys


class ClassEmbedding(nnx.Module):
    """A learned embedding of ``num_classes`` labels plus the null class.

    The table has ``num_classes + 1`` rows; row ``num_classes`` is the null
    ("unconditional") class. ``__call__(labels)`` expects labels already checked by
    :func:`check_labels`; out-of-range traced labels give NaN rows so the mistake is
    visible instead of silently wrapping to another class.
    """

    def __init__(
        self, num_classes: int, dim: int, *, init_std: float = 1.0, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
    ):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        init = nnx.initializers.normal(init_std)
        self.table = nnx.Param(init(rngs.params(), (num_classes + 1, dim), param_dtype))

    def __call__(self, labels):
        table = self.table[...]
        valid = (labels >= 0) & (labels <= self.num_classes)
        emb = jnp.take(table, jnp.clip(labels, 0, self.num_classes), axis=0)
        return jnp.where(valid[:, None], emb, jnp.asarray(jnp.nan, emb.dtype))
