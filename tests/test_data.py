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
from conftest import EPS32, NSIGMA
from PIL import Image

from jdiff import data


def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- digits


@functools.cache
def _digits(resolution, method="bilinear"):
    return data.digits(resolution, method=method)


def test_digits_native():
    x, y = _digits(8)
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0  # both ends reached, nothing beyond
    assert y.shape == (1797,) and y.dtype == np.int32
    assert set(np.unique(y).tolist()) == set(range(10))
    # 17 grey levels 0..16 -> multiples of 1/8 in [-1, 1]
    assert np.allclose(x * 8, np.round(x * 8))


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_upsampled(resolution):
    x8, y8 = _digits(8)
    x, y = _digits(resolution)
    assert x.shape == (1797, resolution, resolution, 1)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(y, y8)
    # bilinear upsampling by an integer factor preserves every image's mean: float32 pixels
    # (a few roundings each, values <= 1) summed pairwise over P pixels, log2(P) roundings
    P = resolution * resolution
    tol = 4 * (4 + np.log2(P)) * EPS32  # ~7e-6 at 32 x 32
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), x8.mean(axis=(1, 2, 3)), rtol=0, atol=tol)
    # and is the same as jax.image.resize's "linear" method, which contracts each axis with
    # an 8 x resolution weight matrix: two reductions of length 8 over values <= 1
    ref = jax.image.resize(jnp.asarray(x8[:16]), (16, resolution, resolution, 1), "linear")
    np.testing.assert_allclose(x[:16], np.asarray(ref), rtol=0, atol=4 * (2 * 8) * EPS32)
    # a 2x2 block average of the upsampled image is close to the original (smoothness)
    f = resolution // 8
    down = x.reshape(1797, 8, f, 8, f, 1).mean(axis=(2, 4))
    assert np.abs(down - x8).mean() < 0.15


def test_digits_nearest_and_errors():
    x8, _ = _digits(8)
    x, _ = _digits(16, "nearest")
    np.testing.assert_array_equal(x, x8.repeat(2, axis=1).repeat(2, axis=2))
    with pytest.raises(ValueError, match="multiple of 8"):
        data.digits(12)
    with pytest.raises(ValueError, match="method"):
        data.digits(16, method="bicubic")


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
    # roughly unit scale (bounds on the scale itself, > 30 standard errors for n = 4000)
    assert np.all(np.abs(a.mean(0)) < 0.5)
    assert np.all((a.std(0) > 0.5) & (a.std(0) < 1.5))


def test_toy_regression_and_names():
    # pins the generator: a numpy change that alters the stream would show up here. Computed
    # in float64 (numpy's SIMD sin/cos may differ by an ulp between CPUs) and rounded to
    # float32: 1 float32 ulp, plus the 7 printed digits; 4 ulps of the largest value (1.29)
    np.testing.assert_allclose(
        data.toy("moons", 3, 0)[0],
        [[-0.2217719, -0.7234702], [1.2870408, -1.031734], [-0.7103867, 0.3154609]],
        rtol=0,
        atol=4 * EPS32 * 1.29,
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
    n = 16000
    x, k = data.toy("8gaussians", n, seed=0)
    assert set(np.unique(k).tolist()) == set(range(8))
    r, sd = math.sqrt(2.0), math.sqrt(2.0) / 8
    for j in range(8):
        pts = x[k == j]
        m = len(pts)
        # equal weights: a binomial count, standard error sqrt(n p (1 - p))
        assert abs(m - n / 8) < NSIGMA * math.sqrt(n / 8 * 7 / 8)
        center = r * np.array([np.cos(j * np.pi / 4), np.sin(j * np.pi / 4)])
        # means and stds of m normal points: standard errors sd / sqrt(m) and sd / sqrt(2 m)
        np.testing.assert_allclose(pts.mean(0), center, rtol=0, atol=NSIGMA * sd / math.sqrt(m))
        np.testing.assert_allclose(pts.std(0), [sd, sd], rtol=NSIGMA / math.sqrt(2 * m))
    # the 8 modes all sit on the circle of radius sqrt(2): the distance from the origin of a
    # point N(c, sd^2 I) with |c| = r is Rice distributed (mean r + sd^2 / (2 r) + ...)
    from scipy.stats import rice

    dist = rice(r / sd, scale=sd)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert abs(norms.mean() - dist.mean()) < NSIGMA * dist.std() / math.sqrt(n)


def test_toy_checkerboard_black_squares():
    x, labels = data.toy("checkerboard", 8000, seed=1)
    assert labels is None
    assert np.all((x >= -2) & (x <= 2))
    ix, iy = np.floor(x[:, 0]).astype(int), np.floor(x[:, 1]).astype(int)
    black = (ix + iy) % 2 == 0
    # float32 rounding (half an ulp of |x| <= 2) may put a point exactly on an edge of its square
    on_edge = np.any(np.abs(x - np.round(x)) <= 2 * EPS32 * 2.0, axis=1)
    assert np.all(black | on_edge)
    # uniform over the 8 black squares: binomial counts, standard error sqrt(n p (1 - p))
    counts = np.unique(np.stack([ix, iy], 1)[black], axis=0, return_counts=True)[1]
    assert len(counts) == 8 and np.all(np.abs(counts - 1000) < NSIGMA * math.sqrt(8000 / 8 * 7 / 8))


def test_toy_moons_on_arcs():
    s = math.sqrt(2.0)
    x, c = data.toy("moons", 4000, seed=2, noise=0.0)
    assert set(np.unique(c).tolist()) == {0, 1}
    # class 0: upper half of the unit circle around (0, 0); class 1: lower half around
    # (1, 1/2); both in units before the shift (1/2, 1/4) and scale sqrt(2)
    raw = x / s + np.array([0.5, 0.25])
    up, low = raw[c == 0], raw[c == 1] - np.array([1.0, 0.5])
    # x is a float64 point rounded to float32 (half an ulp of |x| <= 2 sqrt 2) and mapped
    # back in float64: ~2 EPS32 absolute in raw units; 8x margin
    tol = 8 * EPS32 * np.abs(x).max() / s
    np.testing.assert_allclose(np.linalg.norm(up, axis=1), 1.0, rtol=0, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, rtol=0, atol=tol)
    assert np.all(up[:, 1] >= -tol) and np.all(low[:, 1] <= tol)
    # with the default noise (0.1 in output units, 0.1 / sqrt 2 in raw units) the distance of
    # a point to its arc's center is 1 plus radial noise: its std within 5 standard errors
    # (plus the sd^3 / 2 of the tangential noise's curvature term)
    xn, cn = data.toy("moons", 4000, seed=2)
    rawn = xn.astype(np.float64) / s + np.array([0.5, 0.25])
    dist = np.where(cn == 0, np.linalg.norm(rawn, axis=1), np.linalg.norm(rawn - [1.0, 0.5], axis=1))
    sd = 0.1 / s
    assert abs(np.std(dist - 1) - sd) < NSIGMA * sd / np.sqrt(2 * dist.size) + sd**3 / 2


def test_toy_swissroll_on_spiral():
    x, labels = data.toy("swissroll", 2000, seed=0, noise=0.0)
    assert labels is None
    t = np.linalg.norm(x.astype(np.float64), axis=1) * 7.0  # radius = angle
    # x rounded to float32: t off by ~EPS32 t; 4x margin
    t_max = 4.5 * np.pi
    assert t.min() > 1.5 * np.pi * (1 - 4 * EPS32) and t.max() < t_max * (1 + 4 * EPS32)
    # the formula at that t: x's own rounding (EPS32 |x|) plus t's error times
    # |d/dt t e^{it} / 7| = sqrt(1 + t^2) / 7; 4x margin, ~1.5e-5
    tol = 4 * EPS32 * (t_max * (1 + t_max) / 7 + np.abs(x).max())
    np.testing.assert_allclose(x, (t[:, None] * np.stack([np.cos(t), np.sin(t)], 1)) / 7.0, rtol=0, atol=tol)


# -------------------------------------------------------------------------------- npz


def test_npz_roundtrip(tmp_path):
    imgs, labels = _rand_u8((6, 5, 5, 3)), np.arange(6) % 3
    p = tmp_path / "rgb.npz"
    np.savez(p, images=imgs, labels=labels)
    x, y = data.load_npz(p, channels=3, resolution=5)
    assert x.dtype == np.float32 and x.shape == (6, 5, 5, 3)
    np.testing.assert_array_equal(x, data.from_uint8(imgs))
    np.testing.assert_array_equal(data.to_uint8(x), imgs)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int32
    raw, _ = data.load_npz(p, dtype=np.uint8)
    np.testing.assert_array_equal(raw, imgs)

    # unnamed array, grayscale (N, H, W), no labels
    p = tmp_path / "gray.npz"
    np.savez(p, imgs[..., 0])
    x, y = data.load_npz(p, channels=1)
    assert x.shape == (6, 5, 5, 1) and y is None

    # float vectors with custom keys
    v = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32) * 3
    p = tmp_path / "vec.npz"
    np.savez(p, pts=v, cls=np.arange(7))
    x, y = data.load_npz(p, key="pts", label_key="cls")
    np.testing.assert_array_equal(x, v)
    np.testing.assert_array_equal(y, np.arange(7))
    np.savez(p, x=v)
    assert data.load_npz(p)[1] is None

    # float images already in [-1, 1] are kept as they are
    f = data.from_uint8(imgs)
    np.savez(tmp_path / "f.npz", x=f)
    np.testing.assert_array_equal(data.load_npz(tmp_path / "f.npz")[0], f)


def test_npz_errors(tmp_path):
    def save(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    u8 = _rand_u8((4, 8, 8, 3))
    with pytest.raises(ValueError, match="cannot read file"):
        data.load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match="cannot read file"):
        data.load_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", u8)
    with pytest.raises(ValueError, match="not an .npz"):
        data.load_npz(tmp_path / "single.npy")
    with pytest.raises(ValueError, match=r"no data array.*found \['foo'\]"):
        data.load_npz(save("nokey.npz", foo=u8))
    with pytest.raises(ValueError, match="no array named 'bar'"):
        data.load_npz(save("k.npz", x=u8), key="bar")
    with pytest.raises(ValueError, match="no label array named 'lab'"):
        data.load_npz(save("k.npz", x=u8), label_key="lab")
    with pytest.raises(ValueError, match="has shape"):
        data.load_npz(save("rank1.npz", x=np.zeros(5, np.float32)))
    with pytest.raises(ValueError, match="has shape"):
        data.load_npz(save("rank5.npz", x=np.zeros((2, 3, 4, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"has shape \(4, 2\).*\(N, H, W\)"):
        data.load_npz(save("vec.npz", x=np.zeros((4, 2), np.float32)), channels=3)
    with pytest.raises(ValueError, match="4 channels.*NHWC"):
        data.load_npz(save("rgba.npz", x=_rand_u8((4, 8, 8, 4))))
    with pytest.raises(ValueError, match="looks like NCHW"):
        data.load_npz(save("nchw.npz", x=_rand_u8((4, 3, 8, 8))))
    with pytest.raises(ValueError, match="3 channel.*1 requested"):
        data.load_npz(save("rgb.npz", x=u8), channels=1)
    with pytest.raises(ValueError, match="8x8, 32x32 requested"):
        data.load_npz(save("rgb.npz", x=u8), resolution=32)
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        data.load_npz(save("f255.npz", x=u8.astype(np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        data.load_npz(save("nan.npz", x=np.full((2, 3), np.nan, np.float32)))
    with pytest.raises(ValueError, match="dtype int64"):
        data.load_npz(save("i64.npz", x=u8.astype(np.int64)))
    with pytest.raises(ValueError, match="vectors must be float"):
        data.load_npz(save("u8vec.npz", x=np.zeros((4, 2), np.uint8)))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        data.load_npz(save("lab.npz", x=u8, labels=np.arange(3)))
    with pytest.raises(ValueError, match="labels must be integers"):
        data.load_npz(save("lab.npz", x=u8, labels=np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="cannot read arrays"):  # object array needs pickle
        data.load_npz(save("obj.npz", x=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(ValueError, match="dtype=uint8 requested"):
        data.load_npz(save("f.npz", x=np.zeros((2, 4, 4, 1), np.float32)), dtype=np.uint8)
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_npz(save("rgb.npz", x=u8), channels=4)


# ----------------------------------------------------------------------- image folder


def _smooth_rgb(h, w, seed):
    """A smooth image (JPEG keeps it to within a few levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(40, 215, size=3)
    return np.clip(base + 30 * np.stack([np.sin(3 * xx), np.cos(2 * yy), np.sin(2 * xx + yy)], -1), 0, 255).astype(
        np.uint8
    )


@pytest.fixture
def folder(tmp_path):
    """cat/: a PNG (RGB) and a JPEG (RGB, nested); dog/: a grayscale PNG; plus junk to ignore."""
    root = tmp_path / "imgs"
    (root / "cat" / "inner").mkdir(parents=True)
    (root / "dog").mkdir()
    a = _rand_u8((8, 8, 3), 1)
    b = _smooth_rgb(8, 8, 2)
    g = _rand_u8((8, 8), 3)
    Image.fromarray(a).save(root / "cat" / "a.png")
    Image.fromarray(b).save(root / "cat" / "inner" / "b.JPG", quality=95)
    Image.fromarray(g, "L").save(root / "dog" / "g.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "._g.png").write_bytes(b"macOS resource fork, must be skipped")
    return root, {"a": a, "b": b, "g": g}


def test_image_folder_roundtrip(folder):
    root, src = folder
    want = [os.path.join("cat", "a.png"), os.path.join("cat", "inner", "b.JPG"), os.path.join("dog", "g.png")]
    assert data.list_images(root) == sorted(want)
    assert data.image_folder_classes(root) == ["cat", "dog"]
    x, y = data.load_image_folder(root, 8, 3, labels=True, dtype=np.uint8)
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [0, 0, 1])
    np.testing.assert_array_equal(x[0], src["a"])  # PNG is lossless
    assert np.abs(x[1].astype(int) - src["b"]).mean() < 3  # JPEG is close
    np.testing.assert_array_equal(x[2], np.repeat(src["g"][..., None], 3, -1))  # gray -> RGB
    # grayscale output: Pillow's "L" conversion, gray stays exact
    xg, yg = data.load_image_folder(root, 8, 1)
    assert xg.shape == (3, 8, 8, 1) and xg.dtype == np.float32 and yg is None
    np.testing.assert_array_equal(data.to_uint8(xg[2, ..., 0]), src["g"])
    np.testing.assert_array_equal(data.to_uint8(xg[0, ..., 0]), np.asarray(Image.fromarray(src["a"]).convert("L")))
    assert xg.min() >= -1 and xg.max() <= 1
    np.testing.assert_array_equal(data.to_uint8(data.load_image(root / "cat" / "a.png")), src["a"])
    # 16-bit grayscale PNG: scaled to 8 bits, not clipped
    g16 = np.random.default_rng(4).integers(0, 65536, (5, 5)).astype(np.uint16)
    Image.fromarray(g16).save(root / "g16.png")
    want = np.rint(g16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(data.load_image(root / "g16.png", channels=1, dtype=np.uint8)[..., 0], want)


def test_image_folder_resize_and_crop(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    # 12 wide, 6 high, three vertical bands: the shorter side is already 6, so only
    # the central 6 columns (3..8) survive
    wide = np.zeros((6, 12, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    wide[:, 4:8] = (0, 255, 0)
    wide[:, 8:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "wide.png")
    # a constant 10 x 30 (w x h) image: shrunk and cropped it stays constant
    Image.fromarray(np.full((30, 10, 3), (10, 200, 90), np.uint8)).save(root / "tall.png")
    x, _ = data.load_image_folder(root, 6, dtype=np.uint8)
    np.testing.assert_array_equal(x[1], wide[:, 3:9])
    np.testing.assert_array_equal(x[0], np.full((6, 6, 3), (10, 200, 90), np.uint8))
    x4, _ = data.load_image_folder(root, 4, dtype=np.uint8)
    assert x4.shape == (2, 4, 4, 3)
    # band order survives shrinking: left is reddish, the middle green, right bluish
    assert x4[1, :, 0, 0].min() > 100 and x4[1, :, 1:3, 1].min() > 100 and x4[1, :, 3, 2].min() > 100


def test_image_folder_errors(tmp_path, folder):
    root, _ = folder
    with pytest.raises(ValueError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        data.load_image_folder(empty, 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(_rand_u8((4, 4, 3))).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        data.load_image_folder(bad, 4)
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load_image_folder(bad, 4, labels=True)
    Image.fromarray(_rand_u8((4, 4, 3))).save(root / "loose.png")
    with pytest.raises(ValueError, match="1 image.* lie directly in .*loose.png"):
        data.load_image_folder(root, 8, labels=True)
    os.remove(root / "loose.png")
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"no images under .*\['empty_class'\]"):
        data.load_image_folder(root, 8, labels=True)
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_image_folder(root, 8, channels=4)
    with pytest.raises(ValueError, match="resolution"):
        data.load_image_folder(root, 0)
    with pytest.raises(ValueError, match="cannot read image"):
        data.load_image(bad / "broken.png")


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder, sizes=(3, 2, 4, 1, 2), test_size=3):
    """Fake batches in the real format: a protocol-2 pickle (as Python 2 wrote them) of a
    dict with bytes keys."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, list(sizes) + [test_size]):
        d = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[name] = d
    return out


def test_cifar10(tmp_path):
    batches_dir = tmp_path / "cifar-10-batches-py"
    src = _write_cifar(batches_dir)
    x, y = data.load_cifar10(batches_dir, "train", dtype=np.uint8)
    assert x.shape == (12, 32, 32, 3) and y.shape == (12,) and y.dtype == np.int32
    flat = np.concatenate([src[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = np.concatenate([src[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    np.testing.assert_array_equal(y, labels)
    # pixel (h, w) of channel c is at c * 1024 + h * 32 + w
    for i, h, w, c in [(0, 0, 0, 0), (5, 31, 0, 1), (11, 7, 19, 2), (3, 31, 31, 2)]:
        assert x[i, h, w, c] == flat[i, c * 1024 + h * 32 + w]
    xf, _ = data.load_cifar10(tmp_path, "train")  # the parent folder works too
    np.testing.assert_array_equal(xf, data.from_uint8(x))
    xt, yt = data.load_cifar10(batches_dir, "test", dtype=np.uint8)
    assert xt.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(yt, src["test_batch"][b"labels"])
    # straight from the .tar.gz archive
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    xa, ya = data.load_cifar10(archive, "train", dtype=np.uint8)
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(ya, y)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_errors(tmp_path):
    d = tmp_path / "c"
    _write_cifar(d)
    with pytest.raises(ValueError, match="split must be"):
        data.load_cifar10(d, "val")
    os.remove(d / "data_batch_4")
    with pytest.raises(ValueError, match=r"missing \['data_batch_4'\]"):
        data.load_cifar10(d, "train")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*uint8 \(n, 3072\)"):
        data.load_cifar10(d, "test")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f, protocol=2)
    with pytest.raises(ValueError, match="0..9"):
        data.load_cifar10(d, "test")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        data.load_cifar10(d, "test")
    (d / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.load_cifar10(d, "test")
    (tmp_path / "fake.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="cannot read archive"):
        data.load_cifar10(tmp_path / "fake.tar.gz")


# ----------------------------------------------------------------------------- Loader


def _loaders(arrays, B, seed, P, **kw):
    return [data.Loader(arrays, B, seed, process_index=p, process_count=P, **kw) for p in range(P)]


def test_loader_each_example_once_per_epoch():
    n, B = 103, 10
    x = np.arange(n)
    (ld,) = _loaders(x, B, 0, 1)
    assert ld.steps_per_epoch == len(ld) == 10
    for epoch in range(3):
        seen = np.concatenate([next(ld) for _ in range(ld.steps_per_epoch)])
        assert len(seen) == 100 and len(np.unique(seen)) == 100  # the N % B rest is dropped
        assert ld.state()["epoch"] == epoch + 1 and ld.state()["step"] == 0
    # drop_last=False: every example exactly once among the real (masked) rows
    (ld,) = _loaders(x, B, 0, 1, drop_last=False, epochs=2)
    assert ld.steps_per_epoch == 11
    batches = list(ld)
    assert len(batches) == 22 and all(b.shape == (B,) for b in batches)
    real = np.concatenate([b[ld.mask(g)] for g, b in enumerate(batches[:11])])
    np.testing.assert_array_equal(np.sort(real), x)
    assert ld.mask(10).sum() == 3 and ld.mask(9).all()
    np.testing.assert_array_equal(batches[10][3:], batches[0][:7])  # padding = start of the epoch


def test_loader_seed_determinism():
    x = np.arange(64)

    def order(seed, steps=8):
        ld = data.Loader(x, 8, seed, process_index=0, process_count=1)
        return np.concatenate([next(ld) for _ in range(steps)])

    np.testing.assert_array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))
    assert not np.array_equal(order(5, 16)[:64], order(5, 16)[64:])  # epochs differ
    np.testing.assert_array_equal(order(5, 16)[64:], data.epoch_permutation(5, 1, 64))
    # pinned: the order must not change with numpy versions (checkpoints resume exactly)
    assert data.epoch_permutation(0, 0, 10).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert data.epoch_permutation(7, 3, 10).tolist() == [2, 4, 7, 3, 5, 1, 8, 9, 0, 6]
    # shuffle=False: storage order
    np.testing.assert_array_equal(
        next(data.Loader(x, 8, 0, process_index=0, process_count=1, shuffle=False)), np.arange(8)
    )


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_processes_split_global_batch(drop_last):
    n, B = 45, 8
    arrays = {"x": np.arange(n) * 10, "y": np.arange(n) % 7, "none": None}
    (ref,) = _loaders(arrays, B, 3, 1, drop_last=drop_last)
    for P in (1, 2, 4):
        procs = _loaders(arrays, B, 3, P, drop_last=drop_last)
        for g in range(2 * ref.steps_per_epoch + 1):  # crosses epoch boundaries
            want = next(ref) if P == 4 else ref.batch(g)
            got = [next(ld) for ld in procs]
            assert all(b["x"].shape == (B // P,) and b["none"] is None for b in got)
            for k in ("x", "y"):
                np.testing.assert_array_equal(np.concatenate([b[k] for b in got]), want[k])
            np.testing.assert_array_equal(np.concatenate([ld.mask(g) for ld in procs]), ref.mask(g))


class _Recording:
    """An array that records which rows are read."""

    def __init__(self, a):
        self.a, self.shape, self.read = a, a.shape, []

    def __getitem__(self, idx):
        self.read.extend(np.asarray(idx).tolist())
        return self.a[idx]


def test_loader_reads_only_own_rows():
    n, B, P = 40, 8, 4
    ref = data.Loader(np.arange(n), B, 1, process_index=0, process_count=1)
    for p in range(P):
        rec = _Recording(np.arange(n))
        ld = data.Loader((rec, None), B, 1, process_index=p, process_count=P)
        for _ in range(3):
            next(ld)
        want = np.concatenate([ref.batch(g)[p * 2 : (p + 1) * 2] for g in range(3)])
        assert rec.read == want.tolist()


def test_loader_resume():
    x = np.arange(50)
    full = data.Loader(x, 6, 9, process_index=0, process_count=1)
    uninterrupted = [next(full) for _ in range(25)]  # 8 steps per epoch: crosses 3 epochs
    first = data.Loader(x, 6, 9, process_index=0, process_count=1)
    for _ in range(13):
        next(first)
    saved = {k: np.asarray(v, np.int64) for k, v in first.state().items()}  # as a checkpoint returns it
    assert int(saved["epoch"]) == 1 and int(saved["step"]) == 5
    resumed = data.Loader(x, 6, 9, process_index=0, process_count=1)
    resumed.restore(saved)
    for g in range(13, 25):
        np.testing.assert_array_equal(next(resumed), uninterrupted[g])
    # the get_state/set_state protocol jdiff.train.train checkpoints
    again = data.Loader(x, 6, 9, process_index=0, process_count=1)
    again.set_state(first.get_state())
    np.testing.assert_array_equal(next(again), uninterrupted[13])
    # resume on 2 processes: the halves of the same batches
    halves = _loaders(x, 6, 9, 2)
    for ld in halves:
        ld.restore({"epoch": 1, "step": 5})
    for g in range(13, 25):
        np.testing.assert_array_equal(np.concatenate([next(ld) for ld in halves]), uninterrupted[g])
    # seek / batch: random access by global step
    other = data.Loader(x, 6, 9, process_index=0, process_count=1)
    other.seek(20)
    assert (other.epoch, other.step, other.global_step) == (2, 4, 20)
    np.testing.assert_array_equal(next(other), uninterrupted[20])
    np.testing.assert_array_equal(other.batch(7), uninterrupted[7])


def test_loader_errors_and_defaults():
    x = np.arange(40)
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        data.Loader(x, 10, 0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.Loader(x, 8, 0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"disagree on the number of examples: \[39, 40\]"):
        data.Loader((x, x[:39]), 8, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.Loader(x, 64, 0)
    with pytest.raises(ValueError, match="holds no arrays"):
        data.Loader((None,), 8, 0)
    with pytest.raises(ValueError, match="seed"):
        data.Loader(x, 8, -1)
    ld = data.Loader(x, 8, 0)  # defaults from jax: this is process 0 of 1
    assert (ld.process_index, ld.process_count, ld.local_batch_size) == (0, 1, 8)
    with pytest.raises(ValueError, match="saved with seed=1"):
        ld.restore({"epoch": 0, "step": 1, "seed": 1})
    with pytest.raises(ValueError, match="global_batch_size=4"):
        ld.restore({"epoch": 0, "step": 1, "global_batch_size": 4})
    with pytest.raises(ValueError, match="0 <= step < 5"):
        ld.restore({"epoch": 0, "step": 5})
    with pytest.raises(ValueError, match="needs integer 'epoch' and 'step'"):
        ld.restore({"epoch": 0})
    assert len(list(data.Loader(x, 8, 0, epochs=2))) == 10


def test_to_global_single_process():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.arange(24, dtype=np.float32).reshape(12, 2)
    batch = next(data.Loader((x, np.arange(12)), 4, 0))
    out = data.to_global(batch, sharding)
    assert isinstance(out[0], jax.Array) and out[0].shape == (4, 2) and out[0].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[0]), batch[0])


# ---------------------------------------------------------------------- image grid


def test_uint8_mapping():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(data.to_uint8(data.from_uint8(u)), u)
    assert data.from_uint8(u)[0] == -1.0 and data.from_uint8(u)[-1] == 1.0
    np.testing.assert_array_equal(
        data.to_uint8(np.array([-1.0, 1.0, -3.0, 2.0, np.nan, np.inf])), [0, 255, 0, 255, 0, 255]
    )
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
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # not the temporary file's 0600


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
