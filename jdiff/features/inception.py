"""InceptionV3 as used for FID: pytorch-fid's port of the TensorFlow 2015-12-05 graph, in
Flax NNX (NHWC).

The network is torchvision's InceptionV3 (Szegedy et al., 2016, "Rethinking the Inception
Architecture for Computer Vision") with 1008 classes and the changes pytorch-fid makes to
reproduce TensorFlow's FID graph (Heusel et al., 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium"):

- the average pools inside the A, C and first E blocks (``Mixed_5b``-``Mixed_5d``,
  ``Mixed_6b``-``Mixed_6e``, ``Mixed_7b``) leave padding out of the average
  (``count_include_pad=False``), as TensorFlow's ``SAME`` pooling does;
- the last E block (``Mixed_7c``) pools with a 3x3 *max* pool where torchvision averages;
- the input, in ``[0, 1]``, is resized to 299x299 by bilinear interpolation with
  ``align_corners=False`` and no antialiasing (``torch.nn.functional.interpolate``), then
  mapped to ``[-1, 1]``;
- the features are the 2048 channels of the global average pool after ``Mixed_7c``
  ("pool3").

Every convolution is ``BasicConv2d``: a bias-free convolution, batch norm with
``eps = 0.001`` (running statistics) and ReLU. Module attribute names follow torchvision's,
so the PyTorch state-dict name of every parameter is its NNX path (see
:func:`inception_param_shapes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.features._inception_layers import (
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
    Linear,
    _max_pool,
)
from jdiff.features._random_weights import random_state_dict
from jdiff.features._torch_load import load_state_dict, save_npz

__all__ = [
    "FeatureExtractor",
    "InceptionV3",
    "InceptionExtractor",
    "inception_features",
    "inception_param_shapes",
    "inception_state_dict",
    "load_inception",
    "load_inception_state_dict",
    "save_inception_npz",
    "bilinear_resize_matrix",
    "INCEPTION_SIZE",
    "INCEPTION_DIM",
    "FID_WEIGHTS_FILE",
]

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# Layer outputs recorded by ``InceptionV3.layers``, in order. pytorch-fid's four output
# blocks end at maxpool1 (64 channels), maxpool2 (192), Mixed_6e (768) and pool3 (2048).
LAYER_NAMES = (
    "input",
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "pool3",
    "logits",
)


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluation code needs from a feature network.

    ``extractor(images) -> (n, dim)`` float array, for ``images`` an ``(n, H, W, C)``
    NHWC batch of uint8 (0..255) or floats in ``[0, 1]``; ``dim`` is the feature width and
    ``name`` a short label for tables ("inception-v3" gives FID; anything else is a
    Frechet distance in that network's features and must not be called FID).
    """

    name: str
    dim: int

    def __call__(self, images) -> np.ndarray: ...


# --------------------------------------------------------------------------- resize


def bilinear_resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """The ``(n_out, n_in)`` float32 matrix of 1-D bilinear interpolation with
    ``align_corners=False`` and no antialiasing, as ``torch.nn.functional.interpolate``
    computes it for float32 images: output ``i`` reads the input at
    ``src = scale * (i + 0.5) - 0.5`` with ``scale = float32(n_in / n_out)``, rounded once
    to float32 (PyTorch's CPU kernel evaluates it with a fused multiply-add) and clamped at
    0, between ``floor(src)`` and the next index (clamped at ``n_in - 1``), with weights
    ``1 - frac`` and ``frac``. Resizing an image is ``W_h @ x @ W_w^T``. The weights equal
    PyTorch's bit for bit (tests/test_inception.py).
    """
    if n_out < 1 or n_in < 1:
        raise ValueError(f"sizes must be positive, got n_out={n_out}, n_in={n_in}")
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    dst = np.arange(n_out, dtype=np.float64)
    # float32 * float32 is exact in float64, so this is the single rounding of an FMA.
    src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(f32), f32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0.astype(f32)).astype(f32)
    l0 = (f32(1) - l1).astype(f32)
    m = np.zeros((n_out, n_in), f32)
    np.add.at(m, (np.arange(n_out), i0), l0)
    np.add.at(m, (np.arange(n_out), i1), l1)
    return m


def _resize_299(x, precision):
    """Bilinear resize of NHWC ``x`` to 299x299 (identity, skipped, when already 299)."""
    h, w = x.shape[1], x.shape[2]
    if h != INCEPTION_SIZE:
        mh = jnp.asarray(bilinear_resize_matrix(INCEPTION_SIZE, h), x.dtype)
        x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
    if w != INCEPTION_SIZE:
        mw = jnp.asarray(bilinear_resize_matrix(INCEPTION_SIZE, w), x.dtype)
        x = jnp.einsum("pw,nhwc->nhpc", mw, x, precision=precision)
    return x


# --------------------------------------------------------------------------- network


class InceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 in Flax NNX, on NHWC images.

    ``model(images)`` gives the 2048-d pool3 features of ``(n, H, W, 3)`` float images in
    ``[0, 1]``; :meth:`layers` gives every block's output; :meth:`logits` the 1008-way
    ``fc`` outputs (for the Inception Score; unused by FID). Weights come from
    :func:`load_inception`.

    Args:
      num_classes: width of ``fc`` (1008 in the TF graph and pytorch-fid's weights).
      precision: matmul/convolution precision. The default ``HIGHEST`` keeps float32
        accumulation on accelerators (TF32 or bf16 passes would change the features at the
        1e-3 level); on CPU float32 is exact either way.
      seed: None leaves every weight zero (to be loaded); an integer fills the network with
        the deterministic pseudo-random weights of
        :func:`jdiff.features._random_weights.random_state_dict` (activations of order one;
        for tests and benchmarks, not for metrics).
    """

    def __init__(self, *, num_classes: int = 1008, precision=jax.lax.Precision.HIGHEST, seed: int | None = None):
        self.precision = precision
        c = partial(BasicConv2d, precision=precision)
        kw = dict(precision=precision)
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = Linear(INCEPTION_DIM, num_classes, precision=precision)
        if seed is not None:
            shapes = {name: shape for name, (_, shape, _) in _torch_names(self).items()}
            load_inception_state_dict(self, random_state_dict(shapes, seed))

    def _forward(self, x, *, resize_input, normalize_input, upto, record):
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes NHWC images with 3 channels, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"InceptionV3 takes float images in [0, 1], got dtype {x.dtype}")
        out = {}

        def rec(name, value):
            if record:
                out[name] = value
            return value

        x = x.astype(jnp.float32)
        if resize_input:
            x = _resize_299(x, self.precision)
        if normalize_input:
            x = 2 * x - 1
        x = rec("input", x)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = rec(name, getattr(self, name)(x))
        x = rec("maxpool1", _max_pool(x, 3, 2))
        for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
            x = rec(name, getattr(self, name)(x))
        x = rec("maxpool2", _max_pool(x, 3, 2))
        for name in LAYER_NAMES[LAYER_NAMES.index("Mixed_5b") : LAYER_NAMES.index("pool3")]:
            x = rec(name, getattr(self, name)(x))
        pool = rec("pool3", jnp.mean(x, axis=(1, 2)))
        if upto == "pool3":
            return out if record else pool
        logits = rec("logits", self.fc(pool))
        return out if record else logits

    def __call__(self, images, *, resize_input: bool = True, normalize_input: bool = True):
        """2048-d pool3 features (FID's features) of ``(n, H, W, 3)`` images in ``[0, 1]``.

        Args:
          images: float NHWC batch; any ``H, W`` (at least 75 without resizing).
          resize_input: bilinearly resize to 299x299 first (pytorch-fid does).
          normalize_input: map ``[0, 1]`` to ``[-1, 1]`` (pytorch-fid does).

        Returns:
          ``(n, 2048)`` float32 features.
        """
        return self._forward(
            images, resize_input=resize_input, normalize_input=normalize_input, upto="pool3", record=False
        )

    def logits(self, images, *, resize_input: bool = True, normalize_input: bool = True):
        """``fc`` applied to the pool3 features: ``(n, num_classes)`` logits (no dropout;
        class 0 of the TF graph's 1008 is "background")."""
        return self._forward(
            images, resize_input=resize_input, normalize_input=normalize_input, upto="logits", record=False
        )

    def layers(self, images, *, resize_input: bool = True, normalize_input: bool = True) -> dict:
        """Every recorded activation, ``{name: NHWC array}`` for the names of
        ``LAYER_NAMES`` ("input" is the resized, normalized image; "pool3" and "logits" are
        ``(n, d)``): the layer-by-layer comparison with pytorch-fid uses these."""
        return self._forward(
            images, resize_input=resize_input, normalize_input=normalize_input, upto="logits", record=True
        )


# --------------------------------------------------------------------------- weights


def _torch_names(model: InceptionV3) -> dict:
    """``{torch name: (variable, shape in PyTorch's layout, from_torch)}`` for every
    parameter and running statistic; ``from_torch`` maps PyTorch's layout (OIHW kernels,
    ``(out, in)`` dense weights) to this module's (HWIO, ``(in, out)``)."""
    ident = lambda a: a
    oihw = lambda a: np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
    entries = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, BasicConv2d):
            p = ".".join(map(str, path))
            kh, kw, cin, cout = node.kernel.shape
            entries[f"{p}.conv.weight"] = (node.kernel, (cout, cin, kh, kw), oihw)
            for torch_name, var in (("weight", node.scale), ("bias", node.bias)):
                entries[f"{p}.bn.{torch_name}"] = (var, (cout,), ident)
            for torch_name, var in (("running_mean", node.mean), ("running_var", node.var)):
                entries[f"{p}.bn.{torch_name}"] = (var, (cout,), ident)
    cin, cout = model.fc.kernel.shape
    entries["fc.weight"] = (model.fc.kernel, (cout, cin), np.transpose)
    entries["fc.bias"] = (model.fc.bias, (cout,), ident)
    return entries


def _to_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    if value.ndim == 2:
        return value.T
    return value


def inception_param_shapes(num_classes: int = 1008) -> dict[str, tuple[int, ...]]:
    """``{PyTorch state-dict name: shape in PyTorch's layout}`` of every tensor that
    :func:`load_inception_state_dict` reads (``num_batches_tracked`` entries are ignored).
    """
    return {name: shape for name, (_, shape, _) in _torch_names(InceptionV3(num_classes=num_classes)).items()}


def inception_state_dict(model: InceptionV3) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch-layout state dict ``{name: float32 array}``."""
    return {
        name: np.ascontiguousarray(_to_torch(np.asarray(var[...]))) for name, (var, _, _) in _torch_names(model).items()
    }


def load_inception_state_dict(model: InceptionV3, state_dict: Mapping[str, np.ndarray]) -> InceptionV3:
    """Copy a PyTorch-layout state dict into ``model`` (in place) and return it.

    Args:
      model: an :class:`InceptionV3`.
      state_dict: ``{name: array}`` with torchvision's names (pytorch-fid's weights file,
        :func:`jdiff.features.load_torch_state_dict`, or an ``.npz``); ``*.num_batches_tracked``
        entries are ignored.

    Raises:
      ValueError: names missing or unexpected, a shape differs from the module's, or a value
        is not finite; the message lists the offending names. Nothing is copied then.
    """
    entries = _torch_names(model)
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    missing = sorted(set(entries) - given)
    unexpected = sorted(given - set(entries))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    converted = []
    for name, (var, shape, from_torch) in entries.items():
        if name not in state_dict:
            continue
        arr = np.asarray(state_dict[name])
        if arr.shape != shape:
            problems.append(f"{name} has shape {arr.shape}, the network needs {shape}")
        elif not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"{name} has dtype {arr.dtype}, expected floats")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"{name} has non-finite values")
        else:
            converted.append((var, np.ascontiguousarray(from_torch(arr.astype(np.float32)))))
    if problems:
        raise ValueError("state dict does not match pytorch-fid's InceptionV3: " + "; ".join(problems))
    for var, value in converted:
        var[...] = jnp.asarray(value)
    return model


def _few(names, k=8):
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def load_inception(
    weights: str | os.PathLike | Mapping[str, np.ndarray], *, precision=jax.lax.Precision.HIGHEST
) -> InceptionV3:
    """pytorch-fid's FID InceptionV3 with its weights.

    Args:
      weights: path of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or any
        ``torch.save``'d state dict of this network, zip or legacy format: read without torch
        and without executing pickled code), of an ``.npz`` from :func:`save_inception_npz`,
        or a state dict ``{name: array}``.
      precision: see :class:`InceptionV3`.

    Returns:
      An :class:`InceptionV3` holding those weights.

    Raises:
      jdiff.features.UnsafePickleError: the ``.pth`` file's pickle holds anything but tensors.
      ValueError: the weights do not match the network (names, shapes, non-finite values).
    """
    state = weights if isinstance(weights, Mapping) else load_state_dict(weights)
    fc = state.get("fc.weight")
    num_classes = int(np.shape(fc)[0]) if fc is not None and np.ndim(fc) == 2 else 1008
    return load_inception_state_dict(InceptionV3(num_classes=num_classes, precision=precision), state)


def save_inception_npz(path: str | os.PathLike, model: InceptionV3) -> None:
    """Write the model's weights as an ``.npz`` (PyTorch names and layout) for
    :func:`load_inception`: converting pytorch-fid's ``.pth`` once avoids the pickle."""
    save_npz(path, inception_state_dict(model))


# --------------------------------------------------------------------------- features


@partial(jax.jit, static_argnums=(0,))
def _pool3(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return model(x)


def _check_images(images):
    x = np.asarray(images) if not isinstance(images, jax.Array) else images
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be an NHWC batch (n, H, W, C) with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images must be uint8 (0..255) or floats in [0, 1], got dtype {x.dtype}")
    if x.size:
        xp = jnp if isinstance(x, jax.Array) else np
        lo, hi = float(xp.min(x)), float(xp.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1] (map [-1, 1] data with (x + 1) / 2), got values in [{lo}, {hi}]"
            )
    return x


def inception_features(model: InceptionV3, images, batch_size: int = 50) -> np.ndarray:
    """pool3 features of a batch of images, computed in fixed-size batches.

    The images are uint8 (``/ 255``, as pytorch-fid's ``ToTensor``) or floats in ``[0, 1]``;
    grayscale (``C = 1``) is repeated to 3 channels. Batches are padded to ``batch_size`` so
    that one compiled program serves every call; with several local devices, a batch is
    split over them when ``batch_size`` is a multiple of their number.

    Args:
      model: an :class:`InceptionV3` (from :func:`load_inception` for FID).
      images: ``(n, H, W, C)`` array, uint8 or float in ``[0, 1]``.
      batch_size: images per network call.

    Returns:
      ``(n, 2048)`` float32 NumPy array.

    Raises:
      ValueError/TypeError: wrong shape, dtype or value range, or ``batch_size < 1``
        (before anything runs).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    x = _check_images(images)
    n = x.shape[0]
    graphdef, state = nnx.split(model)
    devices = jax.local_devices()
    shard = None
    if len(devices) > 1 and batch_size % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = np.empty((n, INCEPTION_DIM), np.float32)
    for start in range(0, n, batch_size):
        chunk = np.asarray(x[start : start + batch_size])
        m = chunk.shape[0]
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
        chunk = jax.device_put(chunk, shard) if shard is not None else chunk
        out[start : start + m] = np.asarray(_pool3(graphdef, state, chunk))[:m]
    return out


class InceptionExtractor:
    """The FID feature network as a :class:`FeatureExtractor`: ``extractor(images)`` gives
    ``(n, 2048)`` pool3 features (see :func:`inception_features`).

    Args:
      weights: an :class:`InceptionV3`, or anything :func:`load_inception` takes.
      batch_size: images per network call.
    """

    name = "inception-v3"
    dim = INCEPTION_DIM

    def __init__(self, weights, batch_size: int = 50):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = weights if isinstance(weights, InceptionV3) else load_inception(weights)
        self.batch_size = int(batch_size)

    def __call__(self, images) -> np.ndarray:
        return inception_features(self.model, images, self.batch_size)

    def __repr__(self):
        return f"InceptionExtractor(batch_size={self.batch_size})"
