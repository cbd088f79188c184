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


# -------------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name", data.TOY_NAMES)
def test_toy_deterministic_and_scaled(name):
    a, la = data.toy(name, 4000, seed=3)
    b, lb = data.toy(name, 4000, seed=3)
    c, _ = data.toy(name, 4000, seed=4)
    assert a.shape == (4000, 2) and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    if la is not None:
        np.testing.assert_array_equal(la, lb)
    # a prefix of a larger set is the smaller set
    np.testing.assert_array_equal(data.toy(name, 100, seed=3)[0], a[:100])
    # roughly unit scale
    assert np.all(np.abs(a.mean(0)) < 0.5)
    assert np.all((a.std(0) > 0.5) & (a.std(0) < 1.5))


def test_toy_regression_and_names():
    # pins the generator: a numpy change that alters the stream would show up here
    np.testing.assert_allclose(
        data.toy("moons", 3, 0)[0], [[-0.2217719, -0.7234702], [1.2870408, -1.031734], [-0.7103867, 0.3154609]], atol=1e-6
    )
    np.testing.assert_array_equal(data.toy("two_moons", 50, 1)[0], data.toy("moons", 50, 1)[0])
    np.testing.assert_array_equal(data.toy("Eight-Gaussians", 50, 1)[0], data.toy("8gaussians", 50, 1)[0])
    np.testing.assert_array_equal(data.toy("swiss_roll", 50, 1)[0], data.toy("swissroll", 50, 1)[0])
    with pytest.raises(ValueError, match="unknown toy data set 'spiral'.*moons.*checkerboard"):
        data.toy("spiral", 10, 0)
    with pytest.raises(ValueError, match="n must be"):
        data.toy("moons", -1, 0)
    with pytest.raises(ValueError, match="noise"):
        data.toy("moons", 10, 0, noise=-0.1)
    assert data.toy("moons", 0, 0)[0].shape == (0, 2)


def test_toy_8gaussians_modes():
    x, k = data.toy("8gaussians", 16000, seed=0)
    assert set(np.unique(k).tolist()) == set(range(8))
    r = math.sqrt(2.0)
    for j in range(8):
        pts = x[k == j]
        assert abs(len(pts) - 2000) < 200  # equal weights
        center = r * np.array([np.cos(j * np.pi / 4), np.sin(j * np.pi / 4)])
        np.testing.assert_allclose(pts.mean(0), center, atol=0.02)
        np.testing.assert_allclose(pts.std(0), [r / 8, r / 8], rtol=0.08)
    # the 8 modes all sit on the circle of radius sqrt(2)
    assert abs(np.linalg.norm(x, axis=1).mean() - r) < 0.02


def test_toy_checkerboard_black_squares():
    x, labels = data.toy("checkerboard", 8000, seed=1)
    assert labels is None
    assert np.all((x >= -2) & (x <= 2))
    ix, iy = np.floor(x[:, 0]).astype(int), np.floor(x[:, 1]).astype(int)
    black = (ix + iy) % 2 == 0
    # float32 rounding may put a point exactly on an edge of its square
    on_edge = np.any(np.abs(x - np.round(x)) < 1e-6, axis=1)
    assert np.all(black | on_edge)
    # uniform over the 8 black squares
    counts = np.unique(np.stack([ix, iy], 1)[black], axis=0, return_counts=True)[1]
    assert len(counts) == 8 and np.all(np.abs(counts - 1000) < 150)


def test_toy_moons_on_arcs():
    s = math.sqrt(2.0)
    x, c = data.toy("moons", 4000, seed=2, noise=0.0)
    assert set(np.unique(c).tolist()) == {0, 1}
    # class 0: upper half of the unit circle around (0, 0); class 1: lower half around
    # (1, 1/2); both in units before the shift (1/2, 1/4) and scale sqrt(2)
    raw = x / s + np.array([0.5, 0.25])
    up, low = raw[c == 0], raw[c == 1] - np.array([1.0, 0.5])
    np.testing.assert_allclose(np.linalg.norm(up, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    assert np.all(up[:, 1] >= -1e-6) and np.all(low[:, 1] <= 1e-6)
    # with the default noise the points stay close to their arcs
    xn, cn = data.toy("moons", 4000, seed=2)
    rawn = xn / s + np.array([0.5, 0.25])
    dist = np.where(cn == 0, np.linalg.norm(rawn, axis=1), np.linalg.norm(rawn - [1.0, 0.5], axis=1))
    assert np.abs(dist - 1).mean() < 0.1


def test_toy_swissroll_on_spiral():
    x, labels = data.toy("swissroll", 2000, seed=0, noise=0.0)
    assert labels is None
    t = np.linalg.norm(x.astype(np.float64), axis=1) * 7.0  # radius = angle
    assert t.min() > 1.5 * np.pi - 1e-3 and t.max() < 4.5 * np.pi + 1e-3
    np.testing.assert_allclose(x, (t[:, None] * np.stack([np.cos(t), np.sin(t)], 1)) / 7.0, atol=1e-5)


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
