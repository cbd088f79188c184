"""A residual MLP denoiser for vector data ``(B, d)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jdiff.models._common import dropout, xavier_uniform, zeros_init
from jdiff.models._embed import ClassEmbedding, TimeEmbedding, conditioning

__all__ = ["MLPResNetConfig", "MLPResNet"]


@dataclasses.dataclass(frozen=True)
class MLPResNetConfig:
    """Configuration of :class:`MLPResNet`.

    Attributes:
      dim: data dimension ``d`` (input and output width).
      width: residual stream width.
      num_blocks: number of residual blocks.
      mlp_ratio: hidden width of a block is ``mlp_ratio * width``.
      emb_dim: width of the time/class embedding (default ``width``).
      time_embedding: ``"sinusoidal"`` or ``"fourier"`` (see :mod:`jdiff.models._embed`).
      time_scale: multiplies ``t`` before the time features (1000 suits t in [0, 1]).
      fourier_std: std of the Fourier frequencies (``time_embedding="fourier"``).
      num_classes: 0 for an unconditional model; else labels ``0..num_classes-1`` and the
        null class ``num_classes``.
      class_dropout: an opt-in extra, 0 by default: in train mode, the probability with
        which the model itself replaces a label by the null class. Classifier-free-guidance
        label dropout belongs to the objective (``jdiff.train.LossConfig.label_dropout``);
        setting both drops a fraction ``1 - (1 - p)(1 - class_dropout)`` of labels.
      dropout: dropout rate inside the blocks (train mode only).
      dtype: compute dtype (None: float32); param_dtype: parameter dtype.
    """

    dim: int
    width: int = 256
    num_blocks: int = 4
    mlp_ratio: int = 2
    emb_dim: int | None = None
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_std: float = 16.0
    num_classes: int = 0
    class_dropout: float = 0.0
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> MLPResNetConfig:
        return dataclasses.replace(self, **kw)


class _MLPBlock(nnx.Module):
    """``x + W2 drop(SiLU(W1 SiLU(LN(x) (1 + scale) + shift)))`` with ``(scale, shift)``
    a linear function of the embedding (FiLM, Perez et al. AAAI 2018) and ``W2``
    zero-initialized, so a fresh block is the identity."""

    def __init__(self, width, hidden, emb_dim, rate, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(
            width, epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
        )
        self.mod = nnx.Linear(emb_dim, 2 * width, kernel_init=zeros_init, **kw)
        self.fc1 = nnx.Linear(width, hidden, kernel_init=xavier_uniform, **kw)
        self.fc2 = nnx.Linear(hidden, width, kernel_init=zeros_init, **kw)
        self.rate = float(rate)

    def __call__(self, x, emb, key):
        scale, shift = jnp.split(self.mod(emb), 2, axis=-1)
        h = self.norm(x).astype(scale.dtype) * (1 + scale) + shift
        h = nnx.silu(self.fc1(nnx.silu(h)))
        h = dropout(h, self.rate, key)
        return x + self.fc2(h).astype(x.dtype)


class MLPResNet(nnx.Module):
    """Residual MLP denoiser for vectors.

    ``x (B, d) -> Linear -> [LN -> FiLM(emb) -> SiLU -> Linear -> SiLU -> dropout ->
    Linear] x num_blocks (residual) -> LN -> SiLU -> Linear (zero init) -> (B, d)``,
    with ``emb = SiLU(time_mlp(t) + class_embedding(cond))``. The zero-initialized
    output layer makes a fresh model predict exactly 0 (the mean of eps or v).

    Call: ``model(x, t, cond=None, *, rngs=None)`` with ``x`` ``(B, d)``, ``t``
    ``(B,)`` (or a scalar), ``cond`` None or int labels ``(B,)`` (``num_classes`` = null
    class), ``rngs`` None for eval mode, or a PRNG key / ``nnx.Rngs`` for train mode
    (dropout; label dropout only with ``class_dropout > 0``). Returns ``(B, d)`` in ``x``'s dtype.
    """

    def __init__(self, config: MLPResNetConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        if c.dim < 1 or c.width < 1 or c.num_blocks < 0:
            raise ValueError(f"invalid MLPResNet sizes in {c}")
        if not 0.0 <= c.dropout < 1.0 or not 0.0 <= c.class_dropout <= 1.0:
            raise ValueError("dropout must be in [0, 1) and class_dropout in [0, 1]")
        emb = c.emb_dim or c.width
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.time_embed = TimeEmbedding(emb, kind=c.time_embedding, scale=c.time_scale, fourier_std=c.fourier_std, **kw)
        self.class_embed = (
            ClassEmbedding(c.num_classes, emb, param_dtype=c.param_dtype, rngs=rngs) if c.num_classes > 0 else None
        )
        self.proj_in = nnx.Linear(c.dim, c.width, kernel_init=xavier_uniform, **kw)
        self.blocks = nnx.List(
            [
                _MLPBlock(c.width, c.mlp_ratio * c.width, emb, c.dropout, c.dtype, c.param_dtype, rngs)
                for _ in range(c.num_blocks)
            ]
        )
        self.norm_out = nnx.LayerNorm(c.width, epsilon=1e-6, dtype=jnp.float32, param_dtype=c.param_dtype, rngs=rngs)
        self.proj_out = nnx.Linear(c.width, c.dim, kernel_init=zeros_init, **kw)

    def __call__(self, x, t, cond=None, *, rngs=None):
        c = self.config
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != c.dim:
            raise ValueError(f"MLPResNet expects x of shape (B, {c.dim}), got {x.shape}")
        emb, keys = conditioning(
            self.time_embed, self.class_embed, t, cond, x.shape[0], c.num_classes, c.class_dropout, rngs
        )
        emb = nnx.silu(emb)
        cdt = c.dtype or jnp.float32

        h = self.proj_in(x.astype(cdt))
        for blk in self.blocks:
            h = blk(h, emb, keys.next())
        h = nnx.silu(self.norm_out(h).astype(cdt))
        return self.proj_out(h).astype(x.dtype)
