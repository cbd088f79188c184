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

from jdiff.metrics._frechet import check_fid_sample_count, frechet_distance, load_stats, save_stats
from jdiff.metrics._kid import kid
from jdiff.metrics._precision_recall import precision_recall
from jdiff.metrics._stats import StreamingStats, gaussian_stats

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
