"""Per-sample randomness: a sample's noise depends on its own key, never on its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["per_sample_keys", "is_key_batch", "normal_per_sample", "drop_labels"]


def _is_typed(key) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def is_key_batch(key) -> bool:
    """True if ``key`` holds one key per sample (typed keys of shape ``(B,)`` or raw
    ``uint32`` keys of shape ``(B, 2)``), False for a single key."""
    key = jnp.asarray(key) if not _is_typed(key) else key
    return key.ndim == (1 if _is_typed(key) else 2)


def per_sample_keys(key, n: int, offset=0):
    """Keys ``fold_in(key, offset + i)`` for ``i < n``.

    Sample ``i`` of a batch drawn with ``key`` is the same as the sample drawn alone
    with ``per_sample_keys(key, 1, offset=i)``: this is how jdiff makes sampling
    independent of batch size and composition.
    """
    idx = jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(offset, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def _batch_keys(key, batch: int):
    if is_key_batch(key):
        n = key.shape[0]
        if n != batch:
            raise ValueError(f"got {n} per-sample keys for a batch of {batch} samples")
        return key
    return per_sample_keys(key, batch)


def normal_per_sample(key, shape, dtype=jnp.float32, step=None):
    """Standard normal noise of ``shape`` whose row ``i`` depends only on sample ``i``'s
    key (and on ``step``, if given, through ``fold_in``)."""
    if len(shape) < 1:
        raise ValueError("shape must have a leading batch axis")
    keys = _batch_keys(key, shape[0])
    if step is not None:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def drop_labels(key, labels, num_classes: int, p: float):
    """Replace each label by the null class ``num_classes`` with probability ``p``
    (classifier-free guidance training, Ho & Salimans, "Classifier-Free Diffusion
    Guidance", 2021). ``key`` is one key (sample ``i`` uses ``fold_in(key, i)``) or one
    key per sample, so a sample's coin does not depend on its batch."""
    labels = jnp.asarray(labels)
    if p <= 0.0:
        return labels
    keys = _batch_keys(key, labels.shape[0])
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)
    drop = drop.reshape(drop.shape + (1,) * (labels.ndim - 1))
    return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)
