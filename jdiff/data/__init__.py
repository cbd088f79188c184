"""Data for training: sources, a deterministic multi-host loader, image utilities.

Sources return numpy ``(x, labels)`` (``labels`` int32 or ``None``); images are NHWC in
``[-1, 1]`` (or raw ``uint8`` where asked):

- :func:`digits` (scikit-learn's 8x8 digits, optionally upsampled), :func:`toy` (2-D
  moons, swiss roll, 8 Gaussians, checkerboard), :func:`load_npz`,
  :func:`load_image_folder`, :func:`load_cifar10`.

:class:`Loader` turns arrays into global batches that depend only on ``(seed, epoch,
step)``, split across processes, with a checkpointable ``state()``.
:func:`save_image_grid` writes samples as a PNG grid.
"""

from jdiff.data._config import DataConfig
from jdiff.data._images import (
    from_uint8,
    load_image,
    make_image_grid,
    resize_center_crop,
    save_image_grid,
    save_png,
    to_uint8,
)
from jdiff.data._loader import Loader, epoch_permutation, to_global
from jdiff.data._sources import (
    CIFAR10_CLASSES,
    IMAGE_EXTENSIONS,
    digits,
    image_folder_classes,
    list_images,
    load_cifar10,
    load_image_folder,
    load_npz,
)
from jdiff.data._toy import TOY_NAMES, toy

__all__ = [
    "DataConfig",
    "digits",
    "toy",
    "TOY_NAMES",
    "load_npz",
    "load_image_folder",
    "list_images",
    "image_folder_classes",
    "IMAGE_EXTENSIONS",
    "load_cifar10",
    "CIFAR10_CLASSES",
    "Loader",
    "epoch_permutation",
    "to_global",
    "load_image",
    "resize_center_crop",
    "to_uint8",
    "from_uint8",
    "make_image_grid",
    "save_image_grid",
    "save_png",
]
