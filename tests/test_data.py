"""Tests for jdiff.data: sources, the multi-host Loader, image utilities."""

from __future__ import annotations

import functools
import math
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jdiff import data


def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------- image grid


def test_uint8_mapping():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(data.to_uint8(data.from_uint8(u)), u)
    assert data.from_uint8(u)[0] == -1.0 and data.from_uint8(u)[-1] == 1.0
    np.testing.assert_array_equal(data.to_uint8(np.array([-1.0, 1.0, -3.0, 2.0, np.nan, np.inf])), [0, 255, 0, 255, 0, 255])
    with pytest.raises(ValueError, match="uint8"):
        data.from_uint8(np.zeros(3, np.int32))


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_roundtrip(tmp_path, channels):
    n, h, w = 5, 6, 7
    u = _rand_u8((n, h, w, channels), seed=channels)
    images = data.from_uint8(u)
    path = tmp_path / "sub" / "grid.png"
    grid = data.save_image_grid(jnp.asarray(images), path, nrow=3, padding=2)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == ("L" if channels == 1 else "RGB")
        assert img.size == (3 * w + 4 * 2, 2 * h + 3 * 2)  # (width, height): 3 columns, 2 rows
        pix = np.asarray(img).reshape(img.size[1], img.size[0], channels)
    np.testing.assert_array_equal(pix, grid)
    for i in range(n):
        r, c = divmod(i, 3)
        top, left = 2 + r * (h + 2), 2 + c * (w + 2)
        np.testing.assert_array_equal(pix[top : top + h, left : left + w], u[i])
    # padding and the empty sixth cell are white
    assert np.all(pix[:2] == 255) and np.all(pix[:, :2] == 255)
    assert np.all(pix[2 + h + 2 :, 2 + 2 * (w + 2) :] == 255)
    assert not any(p.name.endswith(".png") and p.name != "grid.png" for p in path.parent.iterdir())  # no temp left


def test_image_grid_shapes_and_errors(tmp_path):
    g = data.make_image_grid(np.zeros((5, 4, 4)), padding=0)  # (N, H, W) is grayscale; nrow = ceil(sqrt(5))
    assert g.shape == (8, 12, 1)
    assert data.make_image_grid(np.zeros((1, 4, 4, 3)), padding=1).shape == (6, 6, 3)
    with pytest.raises(ValueError, match=r"C in \(1, 3\).*shape \(2, 4, 4, 4\)"):
        data.save_image_grid(np.zeros((2, 4, 4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        data.save_image_grid(np.zeros((4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="nrow"):
        data.make_image_grid(np.zeros((2, 4, 4, 1)), nrow=0)
