"""Data sources: each returns numpy ``(x, labels)`` with ``labels`` an int32 ``(N,)``
array or ``None``.

Images are NHWC. With a float ``dtype`` (the default) they are in ``[-1, 1]``; sources
read from ``uint8`` files also accept ``dtype=np.uint8`` to keep the raw bytes (4x less
memory; convert each batch with :func:`jdiff.data.from_uint8`).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np

from jdiff.data._images import _check_channels, _open_image, from_uint8

__all__ = [
    "digits",
    "load_npz",
    "IMAGE_EXTENSIONS",
    "list_images",
    "image_folder_classes",
    "load_image_folder",
    "CIFAR10_CLASSES",
    "load_cifar10",
]


def _is_uint8_dtype(dtype) -> bool:
    return np.dtype(dtype) == np.uint8


def _check_float_dtype(dtype, what: str):
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"{what}: dtype must be a float dtype, got {np.dtype(dtype)}")


# --------------------------------------------------------------------------- digits
def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of linear interpolation with half-pixel centers.

    Output pixel ``i`` samples the input at ``(i + 1/2) n_in / n_out - 1/2``, clamped to
    ``[0, n_in - 1]`` (edge pixels are repeated). This is ``jax.image.resize(...,
    "linear")`` and OpenCV/PIL-style bilinear for upsampling. For an integer factor every
    input pixel's weights sum to exactly that factor, so the image mean is preserved.
    """
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def digits(resolution: int = 8, *, method: str = "bilinear", dtype=np.float32):
    """scikit-learn's 8x8 handwritten digits (1797 images, the UCI "Optical Recognition
    of Handwritten Digits" test set), shipped with scikit-learn, so no download.

    Pixel counts ``0..16`` map linearly to ``[-1, 1]`` (``v / 8 - 1``), so both ends are
    attained. For ``resolution`` a multiple of 8 above 8, images are upsampled by the
    integer factor ``resolution / 8``:

    - ``"bilinear"``: separable linear interpolation with half-pixel centers and edge
      clamping (equal to ``jax.image.resize(..., "linear")``); smooth, stays in
      ``[-1, 1]`` (convex weights) and preserves each image's mean exactly;
    - ``"nearest"``: each pixel repeated ``factor x factor`` times.

    Returns:
      ``(images, labels)``: ``(1797, resolution, resolution, 1)`` of ``dtype`` and int32
      class labels ``0..9``.
    """
    # deferred: scikit-learn takes several seconds to import and only the digits need it
    from sklearn.datasets import load_digits

    _check_float_dtype(dtype, "digits")
    if not isinstance(resolution, (int, np.integer)) or resolution < 8 or resolution % 8:
        raise ValueError(f"digits: resolution must be a multiple of 8 (8, 16, 32, ...), got {resolution!r}")
    if method not in ("bilinear", "nearest"):
        raise ValueError(f"digits: method must be 'bilinear' or 'nearest', got {method!r}")
    d = load_digits()
    x = np.asarray(d.images, np.float64) / 8.0 - 1.0  # (N, 8, 8)
    factor = resolution // 8
    if factor > 1 and method == "nearest":
        x = x.repeat(factor, axis=1).repeat(factor, axis=2)
    elif factor > 1:
        m = _linear_resize_matrix(8, resolution)
        x = np.einsum("ih,nhw,jw->nij", m, x, m)
        x = np.clip(x, -1.0, 1.0)  # only float round-off to remove
    return x[..., None].astype(dtype), np.asarray(d.target, np.int32)


# ------------------------------------------------------------------------------ npz
_IMAGE_KEYS = ("images", "x", "image", "data", "arr_0")
_LABEL_KEYS = ("labels", "y", "label")


def _check_labels(labels, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int32)


def load_npz(
    path,
    *,
    key: str | None = None,
    label_key: str | None = None,
    channels: int | None = None,
    resolution: int | None = None,
    dtype=np.float32,
):
    """Arrays from an ``.npz`` file (``np.savez``), loaded without pickle.

    Expected keys:
      data: ``key`` if given, else the first of ``images``, ``x``, ``image``, ``data``,
        ``arr_0`` (``np.savez(path, a)`` names an unnamed array ``arr_0``).
      labels (optional): ``label_key`` if given, else the first of ``labels``, ``y``,
        ``label`` if present; integers of shape ``(N,)``.

    Accepted data:
      - ``(N, D)`` vectors (float), returned unchanged (cast to ``dtype``);
      - ``(N, H, W)`` grayscale images (a channel axis is added) or ``(N, H, W, C)``
        images, NHWC with ``C`` in (1, 3);
      - images as ``uint8`` (scaled ``u / 127.5 - 1``, or kept raw with
        ``dtype=np.uint8``) or float already in ``[-1, 1]``. Float images in ``[0, 1]``
        cannot be told apart from ``[-1, 1]`` data and are not rescaled.

    ``channels`` / ``resolution``, if given, state what the caller's model expects; the
    file must then hold ``(N, resolution, resolution, channels)`` images (or ``(N, H, W)``
    when ``channels == 1``), nothing is resized.

    Raises:
      ValueError: missing or unreadable file or keys, wrong rank, NCHW layout, channel
        count or resolution other than requested, float images outside ``[-1, 1]`` or
        non-finite, unsupported dtype, labels of the wrong shape or type.
    """
    where = f"load_npz({os.fspath(path)!r})"
    if channels is not None:
        channels = _check_channels(channels)
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # missing, truncated, pickled
        raise ValueError(f"{where}: cannot read file: {e}") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{where}: not an .npz archive (a single .npy array?); save with np.savez(path, images=..., labels=...)"
        )
    with f:
        files = list(f.files)
        if key is None:
            key = next((k for k in _IMAGE_KEYS if k in files), None)
            if key is None:
                raise ValueError(f"{where}: no data array; expected one of {_IMAGE_KEYS} (or pass key=), found {files}")
        elif key not in files:
            raise ValueError(f"{where}: no array named {key!r}; found {files}")
        if label_key is None:
            label_key = next((k for k in _LABEL_KEYS if k in files and k != key), None)
        elif label_key not in files:
            raise ValueError(f"{where}: no label array named {label_key!r}; found {files}")
        try:
            x = f[key]
            labels = None if label_key is None else f[label_key]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{where}: cannot read arrays: {e}") from e

    if x.dtype == np.uint8:
        kind = "uint8"
    elif np.issubdtype(x.dtype, np.floating):
        kind = "float"
    else:
        raise ValueError(f"{where}: array {key!r} has dtype {x.dtype}; use uint8 images in [0, 255] or floats")
    image_config = channels is not None or resolution is not None
    if x.ndim == 2 and not image_config:
        if kind == "uint8":
            raise ValueError(
                f"{where}: array {key!r} is (N, D) uint8; vectors must be float (images are (N, H, W[, C]))"
            )
    elif x.ndim in (3, 4):
        if x.ndim == 3:
            x = x[..., None]
        c = x.shape[-1]
        if c not in (1, 3):
            hint = " (this looks like NCHW; transpose to NHWC)" if x.shape[1] in (1, 3) else ""
            raise ValueError(
                f"{where}: images {key!r} of shape {x.shape} have {c} channels; expected NHWC with 1 or 3{hint}"
            )
        if channels is not None and c != channels:
            raise ValueError(f"{where}: images {key!r} have {c} channel(s), {channels} requested; shape {x.shape}")
        if resolution is not None and x.shape[1:3] != (resolution, resolution):
            raise ValueError(
                f"{where}: images {key!r} are {x.shape[1]}x{x.shape[2]}, {resolution}x{resolution} requested; "
                f"shape {x.shape}"
            )
    else:
        want = "(N, H, W) or (N, H, W, C)" if image_config else "(N, D) vectors or (N, H, W[, C]) images"
        raise ValueError(f"{where}: array {key!r} has shape {x.shape}; expected {want}")

    if kind == "float":
        if _is_uint8_dtype(dtype):
            raise ValueError(f"{where}: dtype=uint8 requested but the file holds float data")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{where}: array {key!r} contains NaN or infinity")
        if x.ndim == 4 and x.size and (x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3):
            raise ValueError(
                f"{where}: float images must be in [-1, 1], got [{x.min():.4g}, {x.max():.4g}] "
                "(store uint8 to have them scaled)"
            )
        x = x.astype(dtype)
    elif not _is_uint8_dtype(dtype):
        _check_float_dtype(dtype, where)
        x = from_uint8(x, dtype)
    if labels is not None:
        labels = _check_labels(labels, x.shape[0], where)
    return x, labels


# ----------------------------------------------------------------------- image folder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(root, extensions=IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``root`` (recursively), as sorted paths relative to ``root``.

    A file counts if its extension (case-insensitive) is in ``extensions``; hidden files
    and folders (name starting with ``.``, e.g. macOS ``._x.png`` resource forks) are
    skipped.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory")
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and name.lower().endswith(exts):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def image_folder_classes(root) -> list[str]:
    """Class names for ``load_image_folder(..., labels=True)``: the sorted names of the
    non-hidden sub-folders of ``root``; class ``i`` is ``image_folder_classes(root)[i]``."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory")
    return sorted(d for d in os.listdir(root) if not _is_hidden(d) and os.path.isdir(os.path.join(root, d)))


def load_image_folder(
    root,
    resolution: int,
    channels: int = 3,
    *,
    labels: bool = False,
    extensions=IMAGE_EXTENSIONS,
    dtype=np.float32,
):
    """All images under a folder, as one ``(N, resolution, resolution, channels)`` array.

    Every image is decoded with Pillow, EXIF-rotated, converted to grayscale (``"L"``)
    or RGB (alpha dropped), its shorter side resized to ``resolution`` (bicubic,
    antialiased) and the central square cropped (:func:`resize_center_crop`). Files are
    read in the order of :func:`list_images` (sorted relative paths).

    Arguments:
      root: the folder; searched recursively.
      resolution: output height and width.
      channels: 1 or 3, whatever the files hold.
      labels: if True, each non-hidden immediate sub-folder of ``root`` is a class
        (:func:`image_folder_classes`, sorted by name) and an image's label is the index
        of the class folder it is under (at any depth).
      extensions: file name endings treated as images (case-insensitive).
      dtype: float (values in ``[-1, 1]``) or ``np.uint8`` (raw).

    Returns:
      ``(images, labels)`` with ``labels`` int32 ``(N,)`` or None.

    Raises:
      ValueError: no such folder, no images, an image that cannot be decoded (named),
        bad ``channels``/``resolution``; with ``labels=True``: no class sub-folders,
        images directly in ``root``, or an empty class folder.
    """
    channels = _check_channels(channels)
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if not _is_uint8_dtype(dtype):
        _check_float_dtype(dtype, "load_image_folder")
    root = os.fspath(root)
    files = list_images(root, extensions)
    if not files:
        raise ValueError(f"no images ({', '.join(extensions)}) found under {root!r}")
    y = None
    if labels:
        classes = image_folder_classes(root)
        if not classes:
            raise ValueError(f"labels=True but {root!r} has no class sub-folders")
        loose = [f for f in files if os.sep not in f]
        if loose:
            raise ValueError(
                f"labels=True but {len(loose)} image(s) lie directly in {root!r} (e.g. {loose[0]!r}); "
                "put each in a class sub-folder"
            )
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[f.split(os.sep, 1)[0]] for f in files], np.int32)
        empty = [c for i, c in enumerate(classes) if not np.any(y == i)]
        if empty:
            raise ValueError(f"class folder(s) with no images under {root!r}: {empty}")
    out = np.empty((len(files), resolution, resolution, channels), np.uint8)
    for i, rel in enumerate(files):
        out[i] = _open_image(os.path.join(root, rel), channels, resolution)
    return (out if _is_uint8_dtype(dtype) else from_uint8(out, dtype)), y


# --------------------------------------------------------------------------- CIFAR-10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only dicts/lists/bytes/str/ints and numpy arrays: a CIFAR batch needs
    nothing else, and refusing every other global keeps a crafted file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_batch(raw: bytes, where: str):
    try:
        d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any decoding failure is a bad file
        raise ValueError(f"{where}: not a CIFAR-10 python batch: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{where}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{where}: batch has keys {sorted(d)}; expected 'data' and 'labels'")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: 'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
    labels = _check_labels(d["labels"], data.shape[0], where)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels must be in 0..9, got [{labels.min()}, {labels.max()}]")
    # Rows are the red, green and blue 32x32 planes, each row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(root, split: str = "train", *, dtype=np.float32):
    """CIFAR-10 from the "CIFAR-10 python version" files (Krizhevsky, 2009,
    https://www.cs.toronto.edu/~kriz/cifar.html), already on disk.

    Arguments:
      root: the ``cifar-10-batches-py`` folder, a folder containing it, or the
        ``cifar-10-python.tar.gz`` archive itself (read without extracting).
      split: ``"train"`` (``data_batch_1`` .. ``data_batch_5`` in that order, 50000
        images) or ``"test"`` (``test_batch``, 10000).
      dtype: float (values in ``[-1, 1]``) or ``np.uint8`` (raw).

    Each batch is a pickled dict with ``data``, a ``uint8 (n, 3072)`` array whose rows
    hold the R, G, B planes of a 32x32 image, and ``labels``, ``n`` ints in ``0..9``
    (names in :data:`CIFAR10_CLASSES`). Batches are unpickled with an allow-list (numpy
    arrays and builtins only), so a tampered file cannot execute code.

    Returns:
      ``(images, labels)``: ``(N, 32, 32, 3)`` and int32 ``(N,)``.

    Raises:
      ValueError: unknown split, missing batch files, or a malformed batch (named).
    """
    if split not in _CIFAR_SPLITS:
        raise ValueError(f"load_cifar10: split must be 'train' or 'test', got {split!r}")
    if not _is_uint8_dtype(dtype):
        _check_float_dtype(dtype, "load_cifar10")
    root = os.fspath(root)
    names = _CIFAR_SPLITS[split]
    raws = {}
    if os.path.isfile(root):
        try:
            with tarfile.open(root, "r:*") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                for name in names:
                    if name in members:
                        raws[name] = tar.extractfile(members[name]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"load_cifar10: cannot read archive {root!r}: {e}") from e
    else:
        folder = root
        if not os.path.isfile(os.path.join(folder, names[0])) and os.path.isdir(os.path.join(root, _CIFAR_DIR)):
            folder = os.path.join(root, _CIFAR_DIR)
        for name in names:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    raws[name] = f.read()
    missing = [n for n in names if n not in raws]
    if missing:
        raise ValueError(f"load_cifar10: {split} split needs {list(names)} under {root!r}; missing {missing}")
    parts = [_read_batch(raws[n], f"load_cifar10: {n} in {root!r}") for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return (x if _is_uint8_dtype(dtype) else from_uint8(x, dtype)), y
