"""Gaussian statistics of features: :func:`gaussian_stats` (one shot) and
:class:`StreamingStats` (float64 over batches, devices and hosts)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from jdiff.metrics._validation import _check_finite, _real_float64

__all__ = ["StreamingStats", "gaussian_stats"]


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of samples, in float64 (one shot; see :class:`StreamingStats`).

    Args:
      x: samples of shape ``(n, ...)`` (NumPy or JAX, any real dtype), flattened per sample.

    Returns:
      ``(mu, sigma)``: NumPy float64 mean ``(d,)`` and unbiased (``n - 1``) covariance
      ``(d, d)``, as ``numpy.cov`` and pytorch-fid compute them.

    Raises:
      ValueError: fewer than 2 samples, or non-finite values.
    """
    x = _real_float64(x, "gaussian_stats: x")
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples along the first axis, got shape {x.shape}")
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    _check_finite(x, "gaussian_stats: x")
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


class StreamingStats:
    """Count, mean and covariance of feature vectors accumulated over batches, in float64.

    The state is ``(n, mean, M2)`` with ``M2 = sum_i (x_i - mean)(x_i - mean)^T``. Each batch
    is centered on its own mean (two passes over the batch) and merged with the pairwise
    formula of Chan, Golub & LeVeque (1979, "Updating formulae and a pairwise algorithm for
    computing sample variances"):

        n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta n_b / n,
        M2 = M2_a + M2_b + delta delta^T n_a n_b / n,

    so no large raw sums are formed and features with a large common offset lose nothing
    to cancellation. The result equals one-shot :func:`gaussian_stats` to float64 rounding
    whatever the batch sizes.

    Devices and hosts: :meth:`update` takes a JAX array sharded over devices shard by shard
    (``addressable_shards``; one copy of each replicated shard), so the whole array is never
    gathered onto one device. Each host accumulates the shards it holds; :meth:`allgather`
    then merges the per-host states of all processes (a collective: every process calls it).
    :meth:`merge` combines any two accumulators, in any grouping (the merge is associative up
    to rounding).

    Example::

        stats = StreamingStats()
        for batch in batches:
            stats.update(features(batch))  # (b, d) NumPy or JAX, sharded or not
        stats = stats.allgather()          # multi-host: every process holds the total
        mu, sigma = stats.mean, stats.cov
    """

    def __init__(self, dim: int | None = None):
        """Args:
        dim: the feature dimension, or ``None`` to take it from the first batch. Needed
          only when a process may have no batch before :meth:`allgather`.
        """
        if dim is not None and (not isinstance(dim, int | np.integer) or dim < 1):
            raise ValueError(f"StreamingStats: dim must be a positive int or None, got {dim!r}")
        self._n = 0
        self._dim = None if dim is None else int(dim)
        self._mean = None if dim is None else np.zeros(int(dim))
        self._m2 = None if dim is None else np.zeros((int(dim), int(dim)))

    # -- state

    @property
    def count(self) -> int:
        """Number of samples accumulated."""
        return self._n

    @property
    def dim(self) -> int | None:
        """Feature dimension ``d`` (``None`` before the first batch unless given)."""
        return self._dim

    @property
    def mean(self) -> np.ndarray:
        """Float64 mean ``(d,)``. Raises ValueError when empty."""
        if self._n < 1:
            raise ValueError("StreamingStats.mean: no samples accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Float64 unbiased (``n - 1``) covariance ``(d, d)``, as ``numpy.cov``/pytorch-fid.
        Raises ValueError with fewer than 2 samples."""
        if self._n < 2:
            raise ValueError(f"StreamingStats.cov needs at least 2 samples, got {self._n}")
        m2 = self._m2
        return 0.5 * (m2 + m2.T) / (self._n - 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, cov)``, the arguments :func:`frechet_distance` and :func:`save_stats` take."""
        return self.mean, self.cov

    def copy(self) -> StreamingStats:
        out = StreamingStats()
        out._n, out._dim = self._n, self._dim
        out._mean = None if self._mean is None else self._mean.copy()
        out._m2 = None if self._m2 is None else self._m2.copy()
        return out

    def __repr__(self) -> str:
        return f"StreamingStats(count={self._n}, dim={self._dim})"

    # -- accumulation

    def _merge_state(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        d = mean_b.shape[0]
        if self._dim is None:
            self._dim, self._mean, self._m2 = d, np.zeros(d), np.zeros((d, d))
        elif d != self._dim:
            raise ValueError(f"StreamingStats: feature dimension {d} does not match the accumulated {self._dim}")
        if n_b == 0:
            return
        n_a = self._n
        if n_a == 0:
            self._n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._n = n

    def _update_host(self, x) -> None:
        x = _real_float64(x, "StreamingStats.update: batch")
        if x.ndim < 2:
            raise ValueError(f"StreamingStats.update: a batch must have shape (n, d), got shape {x.shape}")
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        _check_finite(x, "StreamingStats.update: batch")
        if x.shape[0] == 0:
            self._merge_state(0, np.zeros(x.shape[1]), None)
            return
        mean_b = x.mean(0)
        xc = x - mean_b
        self._merge_state(x.shape[0], mean_b, xc.T @ xc)

    def update(self, x) -> StreamingStats:
        """Add a batch of features.

        Args:
          x: shape ``(n, d)`` (or ``(n, ...)``, flattened per sample), NumPy or JAX, any
            real dtype; ``n = 0`` is allowed. A JAX array sharded over several devices along
            its first axis is read shard by shard, this host's shards only (see
            :meth:`update_shards`).

        Returns:
          ``self`` (updated in place).

        Raises:
          ValueError: wrong rank, a feature dimension different from earlier batches, or
            non-finite values.
        """
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return self.update_shards(x)
        self._update_host(x)
        return self

    def update_shards(self, x) -> StreamingStats:
        """Add the rows of a JAX array sharded over devices, shard by shard.

        Only this process's addressable shards are read, one copy of each (shards whose
        ``replica_id`` is 0), so on several hosts each host adds its own rows and
        :meth:`allgather` combines them; nothing is gathered onto one device.

        Args:
          x: a ``jax.Array`` of shape ``(n, d)`` (or ``(n, ...)``) sharded along its first axis
            only.

        Returns:
          ``self``.

        Raises:
          ValueError: the array is split along a feature axis (each shard must hold whole
            rows; such an array is read whole when it is fully addressable).
        """
        if not isinstance(x, jax.Array):
            raise TypeError(f"StreamingStats.update_shards takes a jax.Array, got {type(x).__name__}")
        shards = [s for s in x.addressable_shards if s.replica_id == 0]
        if any(tuple(s.data.shape[1:]) != tuple(x.shape[1:]) for s in shards):
            if x.is_fully_addressable:
                self._update_host(np.asarray(x))
                return self
            raise ValueError(
                f"StreamingStats.update_shards: the array of shape {x.shape} is split along a feature axis "
                f"(shard shapes {sorted({tuple(s.data.shape) for s in shards})}); shard it along the first "
                "(sample) axis only"
            )
        for s in sorted(shards, key=lambda s: (s.index[0].start or 0) if s.index else 0):
            self._update_host(np.asarray(s.data))
        return self

    def merge(self, other: StreamingStats) -> StreamingStats:
        """Add another accumulator's samples (Chan et al. pairwise merge).

        Args:
          other: a :class:`StreamingStats` of the same feature dimension (unchanged).

        Returns:
          ``self`` (updated in place).

        Raises:
          TypeError / ValueError: not a StreamingStats, or a different feature dimension.
        """
        if not isinstance(other, StreamingStats):
            raise TypeError(f"StreamingStats.merge takes a StreamingStats, got {type(other).__name__}")
        if other._dim is None:
            return self
        self._merge_state(other._n, other._mean, other._m2)
        return self

    def allgather(self) -> StreamingStats:
        """Merge the accumulators of all JAX processes (multi-host); a collective call.

        Each process's ``(n, mean, M2)`` travels through
        ``jax.experimental.multihost_utils.process_allgather`` bit for bit (float64 and int64
        viewed as uint32 words, so nothing is rounded to float32 when ``jax_enable_x64`` is
        off) and is merged in process order, so every process gets the same total. With one
        process the result equals a copy of this accumulator.

        Returns:
          A new :class:`StreamingStats` holding all processes' samples.

        Raises:
          ValueError: the feature dimension is unknown on this process (no batch and no
            ``dim`` given).
        """
        if self._dim is None:
            raise ValueError(
                "StreamingStats.allgather: the feature dimension is unknown on this process (no batch yet); "
                "construct it with StreamingStats(dim=d)"
            )
        words = lambda a: np.ascontiguousarray(a).view(np.uint32)
        local = {
            "n": words(np.array([self._n], np.int64)),
            "mean": words(np.asarray(self._mean, np.float64)),
            "m2": words(np.asarray(self._m2, np.float64)),
        }
        got = multihost_utils.process_allgather(local)  # each leaf stacked: (processes, ...)
        out = StreamingStats(self._dim)
        for p in range(got["n"].shape[0]):
            n = int(np.ascontiguousarray(got["n"][p], np.uint32).view(np.int64)[0])
            mean = np.ascontiguousarray(got["mean"][p], np.uint32).view(np.float64)
            m2 = np.ascontiguousarray(got["m2"][p], np.uint32).view(np.float64).reshape(self._dim, self._dim)
            out._merge_state(n, mean, m2)
        return out
