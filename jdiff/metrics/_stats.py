"""Sample-quality metrics on feature vectors: Frechet distance, KID, precision and recall.

- :class:`StreamingStats`: mean and covariance accumulated in float64 over batches, across
  devices and hosts; :func:`gaussian_stats` is the one-shot version.
- :func:`frechet_distance`: the Frechet distance between two Gaussians, which is FID
  (Heusel et al., NeurIPS 2017) when the statistics are those of Inception features.
- :func:`save_stats` / :func:`load_stats`: statistics as ``.npz`` files with keys ``mu`` and
  ``sigma``, the format of pytorch-fid and clean-fid, so published reference statistics load
  directly.
- :func:`check_fid_sample_count`: FID needs more samples than feature dimensions.
- :func:`kid`: the kernel inception distance (Binkowski et al., ICLR 2018), unbiased, in
  subsets.
- :func:`precision_recall`: k-NN manifold precision and recall (Kynkaanniemi et al.,
  NeurIPS 2019), with memory bounded by a batch size.

Precision: everything is computed in float64 on the host with NumPy, whatever the input dtype
and whether or not ``jax_enable_x64`` is set. Covariances come from centered samples merged
pairwise (no ``E[x^2] - E[x]^2`` cancellation), the Frechet distance's matrix square root
from a factorization and a singular value decomposition. A metric is computed once per
evaluation, so the host copy is not a cost that matters; features are accumulated batch by
batch as they are produced.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = [
    "StreamingStats",
    "gaussian_stats",
    "frechet_distance",
    "check_fid_sample_count",
    "save_stats",
    "load_stats",
    "kid",
    "precision_recall",
]

# A covariance read from a file or passed in may have been stored in float32: its two
# triangles then agree to float32 rounding (~1.2e-7 relative). Anything farther apart than
# this (relative to the largest entry) is not a covariance matrix.
_SYMMETRY_RTOL = 1e-5


# ----------------------------------------------------------------------- validation


def _real_float64(x, what: str) -> np.ndarray:
    """``x`` as a float64 NumPy array; a TypeError for non-numeric or complex data."""
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{what} has {bad} non-finite value(s) (NaN or inf) out of {a.size}")


def _check_stats(mu, sigma, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 ``(mu (d,), sigma (d, d))`` of a Gaussian."""
    mu = _real_float64(mu, f"{what}: mu")
    sigma = _real_float64(sigma, f"{what}: sigma")
    if mu.ndim == 0:  # one dimension given as scalars
        mu = mu.reshape(1)
    if sigma.ndim == 0:
        sigma = sigma.reshape(1, 1)
    if mu.ndim != 1:
        raise ValueError(f"{what}: mu must be a vector of shape (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"{what}: sigma must have shape (d, d) = {(d, d)} to match mu of shape {mu.shape}, got {sigma.shape}"
        )
    _check_finite(mu, f"{what}: mu")
    _check_finite(sigma, f"{what}: sigma")
    scale = float(np.max(np.abs(sigma))) if d else 0.0
    asym = float(np.max(np.abs(sigma - sigma.T))) if d else 0.0
    if asym > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{what}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}, "
            f"max |sigma| = {scale:.3g}): not a covariance matrix"
        )
    if d and float(np.min(np.diag(sigma))) < 0:
        raise ValueError(
            f"{what}: sigma has a negative diagonal entry ({float(np.min(np.diag(sigma))):.3g}): "
            "not a covariance matrix"
        )
    return mu, sigma


def _features(x, what: str, min_rows: int = 1) -> np.ndarray:
    """Validated float64 ``(n, d)`` features (per-sample arrays are flattened)."""
    a = _real_float64(x, what)
    if a.ndim < 2:
        raise ValueError(f"{what} must have shape (n, d), got shape {a.shape}")
    a = a.reshape(a.shape[0], math.prod(a.shape[1:]))
    if a.shape[0] < min_rows:
        raise ValueError(f"{what} needs at least {min_rows} samples, got {a.shape[0]} (shape {a.shape})")
    _check_finite(a, what)
    return a


# ----------------------------------------------------------------------- statistics


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
        import jax

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
        import jax

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
        from jax.experimental import multihost_utils

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


# ----------------------------------------------------------------------- Frechet distance


def _psd_factor(c: np.ndarray) -> np.ndarray:
    """A matrix ``L`` with ``L L^T = c`` (to roundoff) for a symmetric PSD ``c``: the Cholesky
    factor when ``c`` is numerically positive definite, else ``V diag(sqrt(max(w, 0)))`` from
    the eigendecomposition ``c = V diag(w) V^T`` (negative roundoff eigenvalues clipped).
    Both are backward stable: ``L L^T`` differs from ``c`` by ``O(d eps |c|)``."""
    c = 0.5 * (c + c.T)
    try:
        return np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(c)
        return v * np.sqrt(np.clip(w, 0.0, None))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

        FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})

    (Dowson & Landau 1982); on Inception features this is FID (Heusel et al., "GANs trained by
    a two time-scale update rule converge to a local Nash equilibrium", NeurIPS 2017).

    The trace term is computed stably in float64. For any factors ``c_i = L_i L_i^T``, the
    symmetric PSD matrix ``sigma1^{1/2} sigma2 sigma1^{1/2}`` has the same eigenvalues as
    ``(L1^T L2)(L1^T L2)^T``, so ``tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})`` is the sum of
    the singular values of ``L1^T L2`` (its nuclear norm). The factors are Cholesky factors,
    or for singular covariances ``V diag(sqrt(max(w, 0)))`` from a symmetric
    eigendecomposition. Taking singular values directly, rather than square roots of the
    eigenvalues of the product (whose small eigenvalues are lost below ``eps ||.||^2`` and come
    back as ``sqrt(eps)``-sized errors), makes identical statistics give 0 to float64 roundoff
    even when the covariances are singular; rank-deficient and near-singular covariances
    (fewer samples than dimensions) give a finite real number, never NaN or an imaginary part
    (as ``scipy.linalg.sqrtm`` of the non-symmetric ``sigma1 sigma2``, used by pytorch-fid,
    can). At a singular covariance the distance itself is only Holder-continuous in the
    inputs: a roundoff-sized change ``delta`` of a zero eigenvalue moves it by up to
    ``~sqrt(delta |sigma|)``, whatever the algorithm. The result is clipped at 0 (roundoff can
    make an exact 0 slightly negative). Cost: two Cholesky factorizations and one ``d x d``
    SVD, a few seconds for ``d = 2048``.

    Args:
      mu1, mu2: means of shape ``(d,)`` (a scalar for ``d = 1``).
      sigma1, sigma2: covariances of shape ``(d, d)``, symmetric.

    Returns:
      The distance, a Python float ``>= 0``.

    Raises:
      ValueError: mismatched shapes, non-finite values, or a sigma that is not symmetric or
        has a negative diagonal.
    """
    mu1, s1 = _check_stats(mu1, sigma1, "frechet_distance: first statistics")
    mu2, s2 = _check_stats(mu2, sigma2, "frechet_distance: second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"frechet_distance: shapes do not match: means {mu1.shape} and {mu2.shape}, "
            f"covariances {s1.shape} and {s2.shape}"
        )
    l1, l2 = _psd_factor(s1), _psd_factor(s2)
    tr_sqrt = float(np.sum(np.linalg.svd(l1.T @ l2, compute_uv=False)))
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


def check_fid_sample_count(n: int, d: int) -> None:
    """Refuse a sample count too small for a full-rank covariance of ``d``-dim features.

    ``n`` samples give a covariance of rank at most ``n - 1``, so FID on ``d``-dimensional
    features needs ``n > d`` (and in practice many more: the estimate is biased upward by
    ``O(1/n)``; 50,000 samples are the usual choice for 2,048-d Inception features, Heusel et
    al. 2017 recommend at least 10,000). Call this before generating anything.

    Args:
      n: number of samples to be generated.
      d: feature dimension.

    Raises:
      TypeError: ``n`` or ``d`` not an int.
      ValueError: ``d < 1`` or ``n <= d``.
    """
    for name, v in (("n", n), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise TypeError(f"check_fid_sample_count: {name} must be an int, got {v!r}")
    if d < 1:
        raise ValueError(f"check_fid_sample_count: the feature dimension must be positive, got {d}")
    if n <= d:
        raise ValueError(
            f"a Frechet distance on {d}-dimensional features needs more samples than dimensions, got {n}: "
            f"{n} samples give a covariance of rank at most {max(n - 1, 0)} < {d}. Use at least {d + 1} "
            "samples (in practice many more; e.g. 10,000 to 50,000 for 2048-d Inception features)"
        )


# ----------------------------------------------------------------------- statistics files


def save_stats(path, mu, sigma) -> str:
    """Write Gaussian statistics as ``.npz`` with keys ``mu`` and ``sigma`` (float64).

    This is the format of pytorch-fid (``--save-stats``) and clean-fid, so the file can be
    used by them and published reference statistics can be read by :func:`load_stats`. The
    file is written to a temporary name and renamed, so a killed job never leaves half a file.

    Args:
      path: destination; ``.npz`` is appended if missing (as ``numpy.savez`` does).
      mu: mean ``(d,)``; sigma: covariance ``(d, d)``.

    Returns:
      The path written.

    Raises:
      ValueError: invalid statistics (see :func:`load_stats`).
    """
    mu, sigma = _check_stats(mu, sigma, "save_stats")
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_stats(path, *, check_symmetric: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read Gaussian statistics from an ``.npz`` file with keys ``mu`` and ``sigma``.

    Reads the files of pytorch-fid and clean-fid (and :func:`save_stats`). Pickled objects
    are never loaded (``allow_pickle=False``). Other keys in the archive are ignored.

    Args:
      path: the ``.npz`` file.
      check_symmetric: refuse a sigma whose two triangles differ by more than float32
        rounding (relative ``1e-5`` of its largest entry).

    Returns:
      ``(mu, sigma)`` as NumPy float64, shapes ``(d,)`` and ``(d, d)``.

    Raises:
      ValueError: the file is missing or not an ``.npz`` archive of plain arrays, ``mu`` or
        ``sigma`` is missing, ``mu`` is not 1-D, ``sigma`` is not ``(d, d)`` for ``d =
        len(mu)``, a value is not finite, or sigma is not symmetric or has a negative
        diagonal.
    """
    path = os.fspath(path)
    what = f"statistics file {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{what} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated zip, not a NumPy file, a pickle, ...
        raise ValueError(f"{what} is not a readable .npz archive: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} holds a single array, not an .npz archive with keys 'mu' and 'sigma'")
    with archive:
        keys = sorted(archive.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise ValueError(f"{what} lacks key(s) {missing}: it has keys {keys}; expected 'mu' and 'sigma'")
        try:
            mu, sigma = archive["mu"], archive["sigma"]
        except Exception as e:  # object arrays need pickle, refused
            raise ValueError(f"{what}: 'mu' or 'sigma' is not a plain numeric array: {e}") from e
    try:
        mu = _real_float64(mu, f"{what}: mu")
        sigma = _real_float64(sigma, f"{what}: sigma")
    except TypeError as e:
        raise ValueError(str(e)) from e
    if mu.ndim != 1:
        raise ValueError(f"{what}: mu must be 1-D of shape (d,), got shape {mu.shape}")
    if not check_symmetric:
        sigma = 0.5 * (sigma + sigma.T) if sigma.ndim == 2 and sigma.shape[0] == sigma.shape[1] else sigma
    return _check_stats(mu, sigma, what)


# ----------------------------------------------------------------------- KID


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    try:
        import jax

        if isinstance(seed, jax.Array):
            data = jax.random.key_data(seed) if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) else seed
            return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"seed must be an int, a numpy Generator or a JAX PRNG key, got {seed!r}")


def _poly_kernel_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Sums of the cubic polynomial kernel: off-diagonal of K_xx and K_yy, all of K_xy."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        float(kxx.sum() - np.trace(kxx)),
        float(kyy.sum() - np.trace(kyy)),
        float(kxy.sum()),
    )


def kid(feats1, feats2, *, subsets: int = 100, subset_size: int = 1000, seed=0) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2 with a cubic polynomial kernel, in subsets.

    Binkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018. With the
    kernel ``k(x, y) = (x . y / d + 1)^3`` and ``m`` samples drawn without replacement from
    each set, the unbiased estimate is

        MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / m^2,

    averaged over ``subsets`` random subsets (as torch-fidelity and clean-fid do). Unbiased,
    it can be slightly negative when the two distributions are equal. Float64 throughout.

    Args:
      feats1, feats2: features ``(n1, d)`` and ``(n2, d)``, NumPy or JAX.
      subsets: number of random subsets (>= 1).
      subset_size: ``m``, capped at ``min(n1, n2)``; at least 2 after capping.
      seed: an int, a ``numpy.random.Generator`` or a JAX PRNG key: the subsets drawn.

    Returns:
      ``(mean, std)`` of the subset estimates (``std`` with ``ddof=0``, as torch-fidelity).

    Raises:
      ValueError: shapes that are not ``(n, d)`` with the same ``d``, fewer than 2 samples,
        non-finite values, ``subsets < 1`` or ``subset_size < 2``.
    """
    x = _features(feats1, "kid: feats1", 2)
    y = _features(feats2, "kid: feats2", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature dimensions differ: feats1 {x.shape}, feats2 {y.shape}")
    if isinstance(subsets, bool) or not isinstance(subsets, int | np.integer) or subsets < 1:
        raise ValueError(f"kid: subsets must be a positive int, got {subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int | np.integer) or subset_size < 2:
        raise ValueError(f"kid: subset_size must be an int >= 2, got {subset_size!r}")
    rng = _rng(seed)
    m = int(min(subset_size, x.shape[0], y.shape[0]))
    est = np.empty(int(subsets))
    for s in range(int(subsets)):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        sxx, syy, sxy = _poly_kernel_sums(xs, ys)
        est[s] = (sxx + syy) / (m * (m - 1)) - 2.0 * sxy / (m * m)
    return float(est.mean()), float(est.std())


# ----------------------------------------------------------------------- precision / recall


def _sq_dists(a: np.ndarray, a2: np.ndarray, b: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(len(a), len(b))``, clipped at 0."""
    return np.maximum(a2[:, None] + b2[None, :] - 2.0 * (a @ b.T), 0.0)


def _kth_nn_sq_radii(x: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance of each row of ``x`` to its k-th nearest other row, by blocks.

    The point itself is among the ``k + 1`` nearest (distance 0), so the radius is the
    ``(k + 1)``-th smallest distance including it, as in Kynkaanniemi et al. Memory is
    ``O(batch * (batch + k))``: a running list of the ``k + 1`` smallest per row.
    """
    n = x.shape[0]
    x2 = np.einsum("ij,ij->i", x, x)
    out = np.empty(n)
    for i in range(0, n, batch):
        rows = slice(i, min(i + batch, n))
        best = np.full((rows.stop - rows.start, 0), np.inf)
        for j in range(0, n, batch):
            cols = slice(j, min(j + batch, n))
            dd = _sq_dists(x[rows], x2[rows], x[cols], x2[cols])
            if max(rows.start, cols.start) < min(rows.stop, cols.stop):  # diagonal entries: self is 0 exactly
                r = np.arange(rows.start, rows.stop)
                inside = (r >= cols.start) & (r < cols.stop)
                dd[np.nonzero(inside)[0], r[inside] - cols.start] = 0.0
            cand = np.concatenate([best, dd], axis=1)
            keep = min(k + 1, cand.shape[1])
            best = np.partition(cand, keep - 1, axis=1)[:, :keep]
        out[rows] = np.max(best, axis=1)  # the (k+1)-th smallest
    return out


def _inside_manifold(q: np.ndarray, ref: np.ndarray, ref_r2: np.ndarray, batch: int) -> np.ndarray:
    """For each row of ``q``: is it within the k-NN ball of some row of ``ref``?"""
    q2, ref2 = np.einsum("ij,ij->i", q, q), np.einsum("ij,ij->i", ref, ref)
    hit = np.zeros(q.shape[0], bool)
    for i in range(0, q.shape[0], batch):
        rows = slice(i, min(i + batch, q.shape[0]))
        for j in range(0, ref.shape[0], batch):
            cols = slice(j, min(j + batch, ref.shape[0]))
            dd = _sq_dists(q[rows], q2[rows], ref[cols], ref2[cols])
            hit[rows] |= np.any(dd <= ref_r2[None, cols], axis=1)
    return hit


def precision_recall(real, fake, *, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen & Aila,
    "Improved precision and recall metric for assessing generative models", NeurIPS 2019).

    Each set's manifold is the union of balls around its points, each ball's radius the
    distance to that point's k-th nearest neighbour within the set. Precision is the fraction
    of fake samples inside the real manifold; recall the fraction of real samples inside the
    fake manifold. A point exactly on a ball's boundary counts as inside (``<=``).

    Distances are computed in float64 by blocks of ``batch_size x batch_size``, so memory is
    ``O(batch_size^2 + batch_size * d)`` whatever the sample counts.

    Args:
      real, fake: features ``(n_real, d)`` and ``(n_fake, d)``, NumPy or JAX.
      k: the neighbour defining the radii (the paper uses 3), ``1 <= k < n`` for each set.
      batch_size: rows and columns per block of distances.

    Returns:
      ``(precision, recall)``, floats in ``[0, 1]``.

    Raises:
      ValueError: bad shapes, different ``d``, non-finite values, ``k`` not in
        ``[1, min(n_real, n_fake) - 1]``, or ``batch_size < 1``.
    """
    r = _features(real, "precision_recall: real", 2)
    f = _features(fake, "precision_recall: fake", 2)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall: feature dimensions differ: real {r.shape}, fake {f.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k < min(r.shape[0], f.shape[0]):
        raise ValueError(
            f"precision_recall: k must be an int in [1, {min(r.shape[0], f.shape[0]) - 1}] "
            f"(fewer than the samples of each set: real {r.shape[0]}, fake {f.shape[0]}), got {k!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"precision_recall: batch_size must be a positive int, got {batch_size!r}")
    batch = int(batch_size)
    r_r2 = _kth_nn_sq_radii(r, int(k), batch)
    f_r2 = _kth_nn_sq_radii(f, int(k), batch)
    precision = float(np.mean(_inside_manifold(f, r, r_r2, batch)))
    recall = float(np.mean(_inside_manifold(r, f, f_r2, batch)))
    return precision, recall
