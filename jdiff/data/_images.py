"""Image conversion, loading and PNG grids.

Model space is float in ``[-1, 1]``; files are ``uint8`` in ``[0, 255]``. The two are
related by

    u = round((x + 1) * 127.5)   (clipped to [0, 255])        x = u / 127.5 - 1

so ``to_uint8(from_uint8(u)) == u`` exactly for every ``uint8`` array ``u``. Images are
NHWC (one image: HWC) with 1 (grayscale, Pillow mode ``"L"``) or 3 (``"RGB"``) channels.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "to_uint8",
    "from_uint8",
    "load_image",
    "resize_center_crop",
    "make_image_grid",
    "save_image_grid",
    "save_png",
]

_MODES = {1: "L", 3: "RGB"}


def _check_channels(channels) -> int:
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(channels)


def to_uint8(images) -> np.ndarray:
    """Map float images in ``[-1, 1]`` to ``uint8``: ``round((x + 1) * 127.5)``.

    Values outside ``[-1, 1]`` (and infinities) are clipped; NaN becomes 0, so a diverged
    sample shows up as black instead of crashing the caller. Accepts numpy or JAX arrays.
    """
    x = np.asarray(images, dtype=np.float64)
    x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images, dtype=np.float32) -> np.ndarray:
    """Map ``uint8`` images to ``[-1, 1]``: ``u / 127.5 - 1`` (0 -> -1, 255 -> 1)."""
    u = np.asarray(images)
    if u.dtype != np.uint8:
        raise ValueError(f"from_uint8 expects a uint8 array, got dtype {u.dtype}")
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise ValueError(f"from_uint8 returns a float dtype, got {dt}")
    return u.astype(dt) / dt.type(127.5) - dt.type(1.0)


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (Pillow bicubic, which antialiases
    when shrinking), then crop the central ``resolution x resolution`` square.

    When the longer side's excess is odd the extra pixel is cut from the right/bottom.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    w, h = img.size
    scale = resolution / min(w, h)
    # The shorter side must come out exactly `resolution`; round the other one.
    nw = resolution if w <= h else max(resolution, round(w * scale))
    nh = resolution if h < w else max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _open_image(path, channels: int, resolution) -> np.ndarray:
    """Decode ``path`` to a ``uint8`` (H, W, channels) array."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # honour camera rotation tags
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grayscale: Pillow's convert() would clip at 255, so scale to 8 bits
                a = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
            img = img.convert(_MODES[channels])  # drops alpha, expands palettes / gray
            if resolution is not None:
                img = resize_center_crop(img, resolution)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def load_image(path, resolution: int | None = None, channels: int = 3, dtype=np.float32) -> np.ndarray:
    """Read one image file as an (H, W, channels) array.

    Arguments:
      path: an image file Pillow can decode (PNG, JPEG, ...). EXIF orientation is applied;
        an alpha channel is dropped; 16-bit grayscale is scaled to 8 bits (``v / 257``).
      resolution: if given, resize the shorter side to it and center-crop to a square
        (:func:`resize_center_crop`); otherwise keep the file's size.
      channels: 1 (grayscale, ITU-R 601 luma as Pillow's ``"L"``) or 3 (RGB).
      dtype: a float dtype gives values in ``[-1, 1]``; ``np.uint8`` gives the raw bytes.

    Raises:
      ValueError: bad ``channels``/``resolution``, or a file that cannot be decoded.
    """
    channels = _check_channels(channels)
    arr = _open_image(path, channels, resolution)
    return arr if np.dtype(dtype) == np.uint8 else from_uint8(arr, dtype)


def _as_nhwc(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:  # (N, H, W): grayscale
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in _MODES or 0 in x.shape[:3]:
        raise ValueError(
            f"expected a non-empty batch of images (N, H, W, C) with C in (1, 3), or (N, H, W); got shape {x.shape}"
        )
    return x


def make_image_grid(images, nrow: int | None = None, *, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images in ``[-1, 1]`` into one ``uint8`` (H, W, C) grid.

    Arguments:
      images: (N, h, w, C) with C in (1, 3), or (N, h, w); numpy or JAX.
      nrow: images per row (default ``ceil(sqrt(N))``); there are ``ceil(N / nrow)`` rows.
      padding: pixels between images and around the border.
      pad_value: colour of padding and empty cells, in ``[-1, 1]`` (default 1: white).

    Returns:
      ``uint8`` array of shape ``(rows * h + (rows + 1) * padding,
      nrow * w + (nrow + 1) * padding, C)``; image ``i`` sits in row ``i // nrow``,
      column ``i % nrow``.
    """
    x = _as_nhwc(images)
    n, h, w, c = x.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    rows = math.ceil(n / nrow)
    fill = to_uint8(pad_value)
    grid = np.full((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, c), fill, np.uint8)
    tiles = to_uint8(x)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def save_png(img: Image.Image, path, *, format: str = "PNG") -> None:
    """Write a Pillow image atomically: to a temporary file in the same folder (created
    if missing), given the usual permissions (``0666`` less the umask; a temporary file
    starts at ``0600``), then renamed into place, so a reader never sees a half-written
    file. The file is PNG whatever ``path``'s extension, unless ``format="JPEG"``
    (quality 95; other modes converted to RGB)."""
    if format not in ("PNG", "JPEG"):
        raise ValueError(f"format must be 'PNG' or 'JPEG', got {format!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix="." + format.lower(), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if format == "PNG":
                img.save(f, format="PNG")
            else:
                img.convert(img.mode if img.mode in ("L", "RGB") else "RGB").save(f, format="JPEG", quality=95)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_image_grid(images, path, nrow: int | None = None, *, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Write images in ``[-1, 1]`` as one PNG grid (see :func:`make_image_grid`) with
    :func:`save_png`. Returns the ``uint8`` grid that was written."""
    grid = make_image_grid(images, nrow, padding=padding, pad_value=pad_value)
    save_png(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, _MODES[grid.shape[-1]]), path)
    return grid
