"""Data for training: image utilities."""

from jdiff.data._images import from_uint8, load_image, make_image_grid, resize_center_crop, save_image_grid, to_uint8

__all__ = ["load_image", "resize_center_crop", "to_uint8", "from_uint8", "make_image_grid", "save_image_grid"]
