"""Building blocks shared by the denoiser networks.

Conventions used by every model in :mod:`jdiff.models`:

- Parameters are stored in ``param_dtype`` (float32 by default); ``dtype`` is the
  compute dtype of the matrix multiplies and convolutions (e.g. ``jnp.bfloat16`` on
  GPU/TPU). Normalizations, softmax and the time embedding are computed in float32.
- Randomness (dropout, and label dropout only when a config's ``class_dropout`` asks
  for it: classifier-free-guidance label dropout is the training objective's job)
  comes from one JAX key per call. Each dropout site derives its own key with ``fold_in(key, site_index)``, so
  a call is a pure function of ``(params, x, t, cond, key)``. No key means eval mode.
- All learnable state is :class:`flax.nnx.Param`; the models hold no other variables
  (fixed tensors such as Fourier bases or sin-cos position tables are recomputed from
  static configuration inside the forward pass, where XLA constant-folds them).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "KeySeq",
    "as_dropout_key",
    "dropout",
    "xavier_uniform",
    "zeros_init",
    "attention",
    "SelfAttention",
    "check_time",
    "check_nhwc",
]

xavier_uniform = nnx.initializers.xavier_uniform()
zeros_init = nnx.initializers.zeros_init()


def _is_key(k) -> bool:
    k = jnp.asarray(k) if not isinstance(k, jax.Array) else k
    if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key):
        return k.ndim == 0
    return k.dtype == jnp.uint32 and k.shape == (2,)


def as_dropout_key(rngs) -> jax.Array | None:
    """Turn the ``rngs`` argument of a model call into one PRNG key (or ``None``).

    ``rngs`` may be ``None`` (eval mode: no dropout), a JAX PRNG key (typed
    ``jax.random.key`` or raw ``uint32[2]`` from ``jax.random.PRNGKey``), or an
    :class:`flax.nnx.Rngs`, from which one key is drawn from its ``dropout`` stream
    (or its ``default`` stream if it has no ``dropout`` stream).
    """
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout() if "dropout" in rngs else rngs()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if not _is_key(rngs):
        raise TypeError(
            "rngs must be None (eval mode), a single JAX PRNG key or an nnx.Rngs; "
            f"got {type(rngs).__name__} {getattr(rngs, 'shape', '')}"
        )
    return rngs


class KeySeq:
    """Deterministic per-site keys: ``next()`` returns ``fold_in(key, i)`` for
    ``i = 0, 1, ...`` in call order (trace time), or ``None`` without a key."""

    def __init__(self, key):
        self.key = key
        self.i = 0

    def next(self):
        if self.key is None:
            return None
        k = jax.random.fold_in(self.key, self.i)
        self.i += 1
        return k

    @property
    def train(self) -> bool:
        return self.key is not None


def dropout(x, rate: float, key):
    """Inverted dropout; the identity if ``key`` is ``None`` or ``rate == 0``."""
    if key is None or rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def attention(q, k, v):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017).

    ``q, k, v``: ``(B, N, H, Dh)``. Logits and softmax are computed in float32
    whatever the compute dtype; the result has ``v``'s dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


class SelfAttention(nnx.Module):
    """Multi-head self-attention over tokens ``(B, N, dim)``: a fused qkv projection,
    :func:`attention`, and an output projection (zero-initialized when ``zero_out``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        zero_out: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(
            dim, 3 * dim, use_bias=qkv_bias, kernel_init=xavier_uniform, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.proj = nnx.Linear(
            dim,
            dim,
            kernel_init=zeros_init if zero_out else xavier_uniform,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        b, n, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(b, n, d))


def check_time(t, batch: int, what: str = "t"):
    """Validate and broadcast the time argument to a float array of shape ``(batch,)``."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"{what} must have shape ({batch},) (one time per sample) or be a scalar; got {t.shape}")
    return t


def check_nhwc(x, size: int, channels: int, name: str):
    """``x`` as an array, or a ``ValueError`` unless it is ``(B, size, size, channels)``."""
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (size, size, channels):
        raise ValueError(f"{name} expects NHWC images of shape (B, {size}, {size}, {channels}), got {x.shape}")
    return x
