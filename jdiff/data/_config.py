"""What to train on, as a dataclass: :class:`DataConfig` and its :meth:`~DataConfig.load`."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jdiff.data._sources import digits, load_cifar10, load_image_folder, load_npz
from jdiff.data._toy import toy

__all__ = ["DataConfig"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A data set. Images are NHWC in [-1, 1]; 2-D toy points are (N, 2).

    Attributes:
      source: ``"digits"`` (scikit-learn's 8x8 digits), ``"toy"`` (2-D sets),
        ``"npz"``, ``"image_folder"`` or ``"cifar10"``.
      resolution: image side; digits: 8 or an upsampled multiple of 8.
      channels: image channels (1 or 3); files must match.
      upsample: digits upsampling method when ``resolution > 8``.
      toy_name, toy_size, toy_seed: the 2-D toy set.
      path: file or folder for npz / image_folder / cifar10.
      class_conditional: use the data's labels (if any).
      shuffle_seed: seed of the loader's per-epoch shuffling.
    """

    source: Literal["digits", "toy", "npz", "image_folder", "cifar10"] = "digits"
    resolution: int = 8
    channels: int = 1
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    toy_name: Literal["moons", "checkerboard", "8gaussians", "swissroll"] = "moons"
    toy_size: int = 20000
    toy_seed: int = 0
    path: str = ""
    class_conditional: bool = True
    shuffle_seed: int = 0

    def __post_init__(self):
        if self.toy_size < 1:
            raise ValueError(f"toy_size must be >= 1, got {self.toy_size}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.shuffle_seed < 0 or self.toy_seed < 0:
            raise ValueError("seeds must be >= 0")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example, known without loading the data."""
        if self.source == "toy":
            return (2,)
        return (self.resolution, self.resolution, self.channels)

    def validate(self) -> None:
        """Cross-field checks (raise ``ValueError``)."""
        if self.source == "toy":
            return
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.source == "digits":
            if self.channels != 1:
                raise ValueError(f"the digits are grayscale: channels must be 1, got {self.channels}")
            if self.resolution % 8:
                raise ValueError(f"digits: resolution must be a multiple of 8, got {self.resolution}")
        if self.source in ("npz", "image_folder") and not self.path:
            raise ValueError(f"source={self.source} needs a path")
        if self.source == "cifar10" and (self.channels != 3 or self.resolution != 32):
            raise ValueError("cifar10 is 32x32 RGB: channels=3, resolution=32")

    def load(self):
        """``(x, labels, num_classes)`` as numpy arrays (``labels`` None and
        ``num_classes`` 0 for unlabelled data or ``class_conditional=False``). Raises
        ``ValueError`` for data that do not match the configuration."""
        self.validate()
        if self.source == "digits":
            x, y = digits(self.resolution, method=self.upsample)
        elif self.source == "toy":
            x, y = toy(self.toy_name, self.toy_size, self.toy_seed)
        elif self.source == "npz":
            x, y = load_npz(self.path, channels=self.channels, resolution=self.resolution)
        elif self.source == "image_folder":
            x, y = load_image_folder(self.path, self.resolution, self.channels, labels=self.class_conditional)
        else:
            x, y = load_cifar10(self.path)
        x = np.asarray(x)
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected examples of shape {self.shape} (resolution={self.resolution}, "
                f"channels={self.channels}), got {tuple(x.shape[1:])}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("the data contain non-finite values")
        num_classes = 0
        if y is not None and self.class_conditional:
            y = np.asarray(y, np.int32)
            if y.size and y.min() < 0:
                raise ValueError(f"labels must be non-negative, got min {y.min()}")
            num_classes = int(y.max()) + 1 if y.size else 0
        else:
            y = None
        return x, y, num_classes

    def num_examples_hint(self) -> int | None:
        """The number of examples when known without loading (toy sets, digits)."""
        if self.source == "toy":
            return self.toy_size
        if self.source == "digits":
            return 1797
        return None
