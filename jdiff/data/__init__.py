"""Data for training: 2-D toy sets and image utilities."""

from jdiff.data._images import from_uint8, load_image, make_image_grid, resize_center_crop, save_image_grid, to_uint8
from jdiff.data._toy import TOY_NAMES, toy

__all__ = [
    "toy",
    "TOY_NAMES",
    "load_image",
    "resize_center_crop",
    "to_uint8",
    "from_uint8",
    "make_image_grid",
    "save_image_grid",
]
