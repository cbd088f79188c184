"""Feature networks for evaluation metrics (FID and Frechet distances in other features).

- :class:`InceptionV3`: pytorch-fid's FID InceptionV3 in Flax NNX, loaded with
  :func:`load_inception` from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (read without torch and without executing pickled code) or from an ``.npz``;
- :func:`inception_features` / :class:`InceptionExtractor`: 2048-d pool3 features of
  NHWC uint8 or ``[0, 1]`` images;
- :class:`FeatureExtractor`: the interface the evaluation code uses, ``extractor(images)
  -> (n, dim)`` with ``.dim`` and ``.name``;
- :class:`DigitsClassifier` / :func:`digits_classifier` / :func:`fd_digits`: the small
  classifier of the 8x8 digits shipped with jdiff, whose 64-d features give FD-digits (a
  Frechet distance like FID's, in other features: not FID) and whose class
  probabilities serve as a reward model;
- :func:`load_torch_state_dict`, :func:`save_npz`, :func:`load_npz_state_dict`: safe
  readers of PyTorch weights files (:class:`UnsafePickleError` for anything but tensors).
"""

from jdiff.features._torch_load import (
    UnsafePickleError,
    load_npz_state_dict,
    load_state_dict,
    load_torch_state_dict,
    save_npz,
)
from jdiff.features.digits import DigitsClassifier, digits_classifier, digits_split, digits_stats, fd_digits
from jdiff.features.inception import (
    FID_WEIGHTS_FILE,
    INCEPTION_DIM,
    INCEPTION_SIZE,
    LAYER_NAMES,
    FeatureExtractor,
    InceptionExtractor,
    InceptionV3,
    bilinear_resize_matrix,
    inception_features,
    inception_param_shapes,
    inception_state_dict,
    load_inception,
    load_inception_state_dict,
    save_inception_npz,
)

__all__ = [
    "DigitsClassifier",
    "digits_classifier",
    "digits_split",
    "digits_stats",
    "fd_digits",
    "FeatureExtractor",
    "InceptionV3",
    "InceptionExtractor",
    "inception_features",
    "inception_param_shapes",
    "inception_state_dict",
    "load_inception",
    "load_inception_state_dict",
    "save_inception_npz",
    "bilinear_resize_matrix",
    "INCEPTION_SIZE",
    "INCEPTION_DIM",
    "LAYER_NAMES",
    "FID_WEIGHTS_FILE",
    "UnsafePickleError",
    "load_torch_state_dict",
    "load_npz_state_dict",
    "load_state_dict",
    "save_npz",
]
