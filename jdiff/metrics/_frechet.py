"""The Frechet distance between Gaussians (FID in Inception features), the sample count it
needs, and statistics files (``.npz`` with ``mu`` and ``sigma``, as pytorch-fid and
clean-fid)."""

from __future__ import annotations

import os

import numpy as np

from jdiff.metrics._validation import _check_stats, _real_float64

__all__ = ["frechet_distance", "check_fid_sample_count", "save_stats", "load_stats"]


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
