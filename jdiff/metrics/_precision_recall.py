"""k-NN manifold precision and recall (Kynkaanniemi et al., NeurIPS 2019), with memory
bounded by a batch size."""

from __future__ import annotations

import numpy as np

from jdiff.metrics._validation import _features

__all__ = ["precision_recall"]


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
