"""FD-digits: a small classifier of the 8x8 scikit-learn digits, shipped with jdiff, whose
penultimate features give a Frechet distance for digit samples.

FID (Heusel et al., NeurIPS 2017) is the Frechet distance between Gaussians fitted to
InceptionV3 pool features. Inception weights cannot be downloaded everywhere and an
ImageNet network says little about 8x8 digits, so jdiff ships its own feature network
for its own default data set: a four-layer CNN trained on a fixed split of the digits
(``scripts/train_digits_classifier.py``, deterministic from a seed), whose weights live
in the package (``jdiff/assets/digits_classifier.npz``), so that the number is the same
on every machine. The Frechet distance of its 64-d features is called **FD-digits**. It
is *not* FID: its values cannot be compared with published FIDs, only with other
FD-digits values (of the same weights file, the same reference set and similar sample
counts: like FID, the estimate is biased upward for few samples).

- :class:`DigitsClassifier` (``DigitsClassifier.load()``): ``features(images) -> (n, 64)``,
  ``probs(images) -> (n, 10)``, ``predict``, ``accuracy`` on host arrays in batches
  through one compiled program; ``apply(images) -> (features, logits)`` as a pure JAX
  function (jit, vmap and grad safe: a differentiable reward model).
- :func:`fd_digits`: FD-digits between two image sets; :func:`digits_stats`: the
  ``(mu, sigma)`` statistics of one set (the pytorch-fid ``.npz`` format's keys).
- :func:`digits_split`: the fixed train / held-out split the classifier was trained on
  (its indices are stored in the weights file).

Images are what the jdiff digits data and samplers produce: NHWC ``(n, 8, 8, 1)`` (or
``(n, 8, 8)``) in ``[-1, 1]`` (pixel count ``v`` in ``0..16`` as ``v / 8 - 1``, see
:func:`jdiff.data.digits`). Samples are clipped to ``[-1, 1]`` before the network, as
they would be when saved as images.
"""

from __future__ import annotations

import importlib.resources
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.data import digits
from jdiff.metrics import frechet_distance, gaussian_stats

__all__ = [
    "FEATURE_NAME",
    "FEATURE_DIM",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "DigitsNet",
    "DigitsClassifier",
    "digits_classifier",
    "digits_split",
    "digits_stats",
    "fd_digits",
    "default_weights_path",
    "split_indices",
    "save_weights",
]

FEATURE_NAME = "fd-digits"
FEATURE_DIM = 64
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FORMAT_VERSION = 1
_WEIGHTS_FILE = "digits_classifier.npz"
_META_KEYS = ("format_version", "heldout_index", "split_seed")
_BATCH = 512  # images per compiled call (the last chunk is padded: one program per classifier)


def default_weights_path() -> str:
    """Path of the weights shipped in the package, ``jdiff/assets/digits_classifier.npz``."""
    return os.fspath(importlib.resources.files("jdiff").joinpath("assets", _WEIGHTS_FILE))


# ------------------------------------------------------------------------------ the network
class DigitsNet(nnx.Module):
    """The FD-digits network: ``conv3x3(32) - conv3x3(32) - avgpool2 - conv3x3(64) -
    avgpool2 - dense(64) - dense(10)`` with SiLU activations (about 45k parameters).

    ``__call__(x, key=None) -> (features, logits)``: ``x`` of shape ``(n, 8, 8, 1)``;
    ``features`` ``(n, 64)`` are the SiLU activations of the penultimate layer (smooth,
    so no unit is identically zero and the covariance stays well conditioned);
    ``key``: a PRNG key turns on dropout on the features (training), ``None`` is eval.
    """

    def __init__(self, *, dropout: float = 0.2, rngs: nnx.Rngs):
        conv = lambda i, o: nnx.Conv(i, o, (3, 3), padding="SAME", rngs=rngs)
        self.conv1 = conv(1, 32)
        self.conv2 = conv(32, 32)
        self.conv3 = conv(32, 64)
        self.fc1 = nnx.Linear(2 * 2 * 64, FEATURE_DIM, rngs=rngs)
        self.fc2 = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)
        self.rate = float(dropout)

    def __call__(self, x, key=None):
        pool = lambda h: nnx.avg_pool(h, (2, 2), strides=(2, 2))
        h = nnx.silu(self.conv1(x))
        h = pool(nnx.silu(self.conv2(h)))
        h = pool(nnx.silu(self.conv3(h)))
        feats = nnx.silu(self.fc1(h.reshape(h.shape[0], -1)))
        h = feats
        if key is not None and self.rate > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.rate), 0.0)
        return feats, self.fc2(h)


def _param_paths(state) -> dict[str, jax.ShapeDtypeStruct]:
    """``{"conv1/kernel": leaf, ...}`` of an ``nnx.State``."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    out = {}
    for path, leaf in flat:
        names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
        if len(names) > 1 and names[-1] == "value":  # the Variable's own field
            names = names[:-1]
        out["/".join(names)] = leaf
    return out


def _abstract_state():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitsNet(rngs=nnx.Rngs(0))))
    return graphdef, state


# ------------------------------------------------------------------------------ split
def split_indices(labels, seed: int = 0, heldout_fraction: float = 0.25) -> np.ndarray:
    """Sorted held-out indices of a stratified split: in each class, ``round(fraction * n_c)``
    examples drawn without replacement by ``numpy.random.default_rng(seed)`` (classes in
    increasing order). Used once by ``scripts/train_digits_classifier.py``; the result is
    stored in the weights file, so :func:`digits_split` does not depend on NumPy's streams."""
    labels = np.asarray(labels)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        held.append(rng.permutation(idx)[: int(round(heldout_fraction * idx.size))])
    return np.sort(np.concatenate(held)).astype(np.int64)


def digits_split(path=None):
    """The fixed split of scikit-learn's 1797 digits used to train the FD-digits classifier.

    Args:
      path: the weights file whose split to use (default: the shipped one).

    Returns:
      ``(x_train, y_train, x_heldout, y_heldout)``: float32 images ``(n, 8, 8, 1)`` in
      ``[-1, 1]`` (as :func:`jdiff.data.digits`) and int32 labels; 1347 train and 450
      held-out images (25% of each class).

    Raises:
      ValueError: the weights file is missing or malformed (see :meth:`DigitsClassifier.load`).
    """
    held = _read_weights(path)[1]["heldout_index"]
    x, y = digits(8)
    mask = np.zeros(len(x), bool)
    mask[held] = True
    return x[~mask], y[~mask], x[mask], y[mask]


# ------------------------------------------------------------------------------ weights I/O
def save_weights(path, model: DigitsNet, heldout_index, split_seed: int) -> None:
    """Write ``model``'s parameters (float32, keys ``conv1/kernel``, ...) and the split to
    an ``.npz`` (no pickle) readable by :meth:`DigitsClassifier.load`."""
    arrays = {k: np.asarray(v, np.float32) for k, v in _param_paths(nnx.state(model, nnx.Param)).items()}
    arrays["format_version"] = np.asarray(FORMAT_VERSION, np.int64)
    arrays["heldout_index"] = np.asarray(heldout_index, np.int64)
    arrays["split_seed"] = np.asarray(split_seed, np.int64)
    np.savez_compressed(path, **arrays)


def _read_weights(path=None):
    """``(params dict, meta dict)`` of a weights file, every array checked; ValueError otherwise."""
    path = default_weights_path() if path is None else os.fspath(path)
    where = f"FD-digits weights {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            arrays = {k: f[k] for k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{where}: cannot read the file (not an .npz written by save_weights?): {e}") from e
    if "format_version" not in arrays or int(arrays["format_version"]) != FORMAT_VERSION:
        got = arrays.get("format_version")
        raise ValueError(f"{where}: format_version {got} found, {FORMAT_VERSION} expected")
    _, state = _abstract_state()
    expected = _param_paths(state)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected) - set(_META_KEYS))
    if missing or extra:
        raise ValueError(f"{where}: parameter keys do not match DigitsNet: missing {missing}, unexpected {extra}")
    params = {}
    for k, leaf in expected.items():
        a = arrays[k]
        if a.shape != tuple(leaf.shape) or a.dtype != np.float32:
            raise ValueError(f"{where}: {k} is {a.dtype}{list(a.shape)}, expected float32{list(leaf.shape)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: {k} holds non-finite values")
        params[k] = a
    held = arrays.get("heldout_index")
    if held is None or held.ndim != 1 or not np.issubdtype(held.dtype, np.integer) or held.size == 0:
        raise ValueError(f"{where}: heldout_index must be a non-empty 1-D integer array")
    if held.min() < 0 or held.max() >= 1797 or np.unique(held).size != held.size:
        raise ValueError(f"{where}: heldout_index must hold distinct indices in [0, 1797)")
    return params, {k: arrays[k] for k in _META_KEYS if k in arrays}


# ------------------------------------------------------------------------------ classifier
def _as_images(images, what: str = "images") -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE[:2]:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{what}: expected digit images of shape (n, 8, 8, 1) or (n, 8, 8), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what}: expected a float array in [-1, 1], got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state, copy=True)(jnp.clip(x, -1.0, 1.0))


# one compiled program per image batch shape, shared by every loaded classifier
_forward_jit = jax.jit(_forward, static_argnums=0)


class DigitsClassifier:
    """The FD-digits classifier with loaded weights (build with :meth:`load`).

    Attributes:
      name: ``"fd-digits"``; dim: feature dimension (64); num_classes: 10;
      image_shape: ``(8, 8, 1)``; path: the weights file; heldout_index: the indices
      of the held-out digits (see :func:`digits_split`).
    """

    name = FEATURE_NAME
    dim = FEATURE_DIM
    num_classes = NUM_CLASSES
    image_shape = IMAGE_SHAPE

    def __init__(self, params: dict, meta: dict, path: str):
        graphdef, state = _abstract_state()
        flat = _param_paths(state)
        values = [jnp.asarray(params[k]) for k in flat]
        self._state = jax.tree.unflatten(jax.tree.structure(state), values)
        self._graphdef = graphdef
        self.path = path
        self.heldout_index = np.asarray(meta["heldout_index"])

    @classmethod
    def load(cls, path=None) -> DigitsClassifier:
        """Load the weights ``path`` (default: the ones shipped in the package).

        Raises:
          ValueError: missing file, not an ``.npz`` (or a pickled one, never executed),
            wrong format version, missing / extra / wrongly shaped / non-float32 /
            non-finite parameters, or a malformed held-out index; the message names
            the file and the offending entry.
        """
        path = default_weights_path() if path is None else os.fspath(path)
        params, meta = _read_weights(path)
        return cls(params, meta, path)

    def apply(self, images):
        """``(features (n, 64), logits (n, 10))`` of a JAX array ``(n, 8, 8, 1)``: a pure
        function of the images (no checks), safe under ``jit``, ``vmap`` and ``grad``
        (e.g. ``jax.nn.log_softmax(logits)[label]`` as a differentiable reward)."""
        return _forward(self._graphdef, self._state, images)

    def _run(self, images, what):
        x = _as_images(images, what)
        n = len(x)
        feats, logits = [], []
        for start in range(0, n, _BATCH):
            chunk = x[start : start + _BATCH]
            pad = _BATCH - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *IMAGE_SHAPE), np.float32)])
            f, g = _forward_jit(self._graphdef, self._state, chunk)
            feats.append(np.asarray(f)[: _BATCH - pad])
            logits.append(np.asarray(g)[: _BATCH - pad])
        if n == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        """Penultimate features ``(n, 64)`` (float32, host) of ``images`` ``(n, 8, 8[, 1])``
        in ``[-1, 1]``, in batches of 512 through one compiled program.

        Raises:
          ValueError: wrong shape or dtype, or non-finite values."""
        return self._run(images, "DigitsClassifier.features")[0]

    def logits(self, images) -> np.ndarray:
        """Class logits ``(n, 10)`` (host), as :meth:`features`."""
        return self._run(images, "DigitsClassifier.logits")[1]

    def probs(self, images) -> np.ndarray:
        """Class probabilities ``(n, 10)`` (softmax of the logits; host), as :meth:`features`."""
        return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))

    def predict(self, images) -> np.ndarray:
        """Most probable class ``(n,)`` int32, as :meth:`features`."""
        return np.argmax(self.logits(images), axis=-1).astype(np.int32)

    def accuracy(self, images, labels) -> float:
        """Fraction of ``images`` classified as ``labels`` (``(n,)`` integers in ``0..9``).

        Raises:
          ValueError: as :meth:`features`, or labels of the wrong shape or range."""
        labels = np.asarray(labels)
        n = np.shape(images)[0] if np.ndim(images) else -1
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"accuracy: labels must be integers of shape ({n},), got {labels.dtype}{labels.shape}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"accuracy: labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        return float(np.mean(self.predict(images) == labels)) if n else float("nan")

    def stats(self, images):
        """``(mu (64,), sigma (64, 64))`` float64 statistics of the features of ``images``."""
        return gaussian_stats(self.features(images))


_DEFAULT: DigitsClassifier | None = None


def digits_classifier(path=None) -> DigitsClassifier:
    """The FD-digits classifier; the shipped weights are loaded once per process and reused
    (``path`` given: loaded from that file every call). See :meth:`DigitsClassifier.load`."""
    global _DEFAULT
    if path is not None:
        return DigitsClassifier.load(path)
    if _DEFAULT is None:
        _DEFAULT = DigitsClassifier.load()
    return _DEFAULT


def digits_stats(images, classifier: DigitsClassifier | None = None):
    """``(mu, sigma)`` of the FD-digits features of ``images`` (float64; save them with
    ``np.savez(path, mu=mu, sigma=sigma)``, the pytorch-fid statistics format)."""
    return (classifier or digits_classifier()).stats(images)


def fd_digits(images_a, images_b, classifier: DigitsClassifier | None = None) -> float:
    """FD-digits: the Frechet distance (Dowson & Landau 1982; computed as FID, Heusel et
    al. 2017) between Gaussians fitted to the FD-digits features of two image sets.

    Args:
      images_a, images_b: ``(n, 8, 8[, 1])`` images in ``[-1, 1]``, each at least 2
        (use many more than 64 for a meaningful covariance; the estimate is biased
        upward for few samples, so compare values at equal sample counts).
      classifier: a :class:`DigitsClassifier` (default: the shipped weights).

    Returns:
      The distance (a non-negative float; not comparable with FID).

    Raises:
      ValueError: malformed images or fewer than 2 in a set.
    """
    clf = classifier or digits_classifier()
    for what, im in (("images_a", images_a), ("images_b", images_b)):
        if np.ndim(im) < 1 or np.shape(im)[0] < 2:
            raise ValueError(f"fd_digits: {what} needs at least 2 images, got shape {np.shape(im)}")
    return frechet_distance(*clf.stats(images_a), *clf.stats(images_b))
