"""The NFE-versus-FID benchmark on any denoiser: ``jdiff bench --model``.

:func:`model_sweep` runs the main job's sweep (:func:`jdiff.sweep.nfe_sweep`: every
(solver, NFE) cell from the same seeds, resumable, the same ``results.csv``,
``results.md`` and ``fd_vs_nfe.png``) on any denoiser: samples are drawn in the model's
own space (pixels, or a VAE's latents), decoded to images in ``[-1, 1]``, quantized to
``uint8`` as saved PNGs would be, and scored by the Frechet distance of their InceptionV3
pool3 features to reference statistics: FID (Heusel et al., NeurIPS 2017) with
pytorch-fid's weights (:class:`jdiff.features.InceptionExtractor`). The reference is a
pytorch-fid/clean-fid ``.npz`` (``mu``, ``sigma``) or a folder of images whose statistics
are computed here (and kept in the output folder, so a resumed sweep does not read the
folder again). Sampling (:func:`jdiff.generate`), decoding (:func:`decode_batches`) and
the Inception features shard the batch over every device.

:func:`model_bench` is the same sweep on a loaded pretrained model
(:func:`jdiff.interop.load_diffusers`'s result, or anything with its attributes).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jdiff
from jdiff._generate import _default_mesh, _to_global, _to_host
from jdiff.bench import BenchSettings, Sweep, _with_ode_column, check_out_dir
from jdiff.data import list_images, load_image_folder
from jdiff.features import FID_WEIGHTS_FILE, InceptionExtractor, UnsafePickleError
from jdiff.interop import load_diffusers
from jdiff.metrics import check_fid_sample_count, frechet_distance, gaussian_stats, load_stats, save_stats
from jdiff.sweep import nfe_sweep

__all__ = [
    "decode_batches",
    "to_uint8",
    "reference_stats",
    "fid_metric",
    "metric_name",
    "inception_extractor",
    "model_sweep",
    "model_bench",
    "load_model",
]

MODEL_GRID = "model"  # grid_kind naming a model's own grid (its scheduler's timesteps)


def to_uint8(images) -> np.ndarray:
    """Images in ``[-1, 1]`` as ``uint8``: ``round(127.5 (x + 1))`` clipped to
    ``0..255``, what saving them as PNG keeps (ADM's and pytorch-fid's evaluations score
    such files)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_batches(decode: Callable, z, *, batch_size: int = 0, mesh=None) -> np.ndarray:
    """``decode`` (latents -> images, batched) over ``z`` in chunks, each chunk sharded
    over the ``data`` axis of ``mesh`` (default: every device), gathered on the host.

    Args:
      decode: a JAX function of a batch ``(b, *shape)``; jitted here (pass the same
        jitted function to every call to compile once).
      z: ``(n, *shape)`` host array.
      batch_size: latents per program (0: all at once), rounded up to a multiple of the
        number of devices; the last chunk is padded, so one program serves every chunk.
      mesh: a 1-D device mesh (as for :func:`jdiff.generate`).

    Returns:
      The decoded ``(n, ...)`` float32 host array, in order.
    """
    z = np.asarray(z, np.float32)
    n = len(z)
    mesh = _default_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    data_sh = NamedSharding(mesh, P(mesh.axis_names[0]))
    bs = n if batch_size == 0 else min(int(batch_size), n)
    bs = -(-bs // n_dev) * n_dev
    fn = decode if hasattr(decode, "lower") else jax.jit(decode)
    out = []
    for start in range(0, n, bs):
        idx = np.arange(start, start + bs) % n  # the last chunk is padded with the first
        x = fn(_to_global(z[idx], data_sh))
        out.append(np.asarray(_to_host(x), np.float32)[: min(bs, n - start)])
    return np.concatenate(out, axis=0)


def metric_name(features) -> str:
    """``"fid"`` for InceptionV3 features, ``"fd_<name>"`` for any other network (a
    Frechet distance in other features is not FID)."""
    return "fid" if features.name == InceptionExtractor.name else f"fd_{features.name}"


def inception_extractor(weights) -> InceptionExtractor:
    """pytorch-fid's InceptionV3 from ``weights`` (a path, :func:`jdiff.features.load_inception`)
    with a batch a multiple of the local devices, so every feature batch is sharded over
    them. ``ValueError`` names the file when it cannot be read."""
    n = jax.local_device_count()
    try:
        return InceptionExtractor(weights, batch_size=-(-50 // n) * n)
    except (OSError, UnsafePickleError) as e:
        raise ValueError(f"InceptionV3 weights {weights}: {e}") from None


def _folder_key(folder: str, features, resolution: int, channels: int) -> str:
    """A fingerprint of an image folder's files (names, sizes, modification times) and of
    how they are scored, naming the cached statistics."""
    h = hashlib.sha1(f"{features.name}|{features.dim}|{resolution}|{channels}".encode())
    for rel in list_images(folder):
        st = os.stat(os.path.join(folder, rel))
        h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def reference_stats(reference, features, image_shape, *, cache_dir: str | None = None):
    """The reference's Gaussian statistics ``(mu, sigma)`` in ``features``.

    Args:
      reference: a statistics ``.npz`` with keys ``mu`` and ``sigma`` (pytorch-fid's
        ``--save-stats``, clean-fid; :func:`jdiff.metrics.load_stats`); a folder of images
        (PNG, JPEG, ...; read with Pillow, converted to the generated images' channels and
        brought to their size by :func:`jdiff.data.load_image_folder`, which leaves
        images of that size untouched); a tuple ``(mu, sigma)``; or an image array
        ``(n, H, W, C)``, ``uint8`` or floats in ``[-1, 1]``.
      features: the feature network (:class:`jdiff.features.FeatureExtractor`).
      image_shape: ``(H, W, C)`` of the generated images.
      cache_dir: where statistics computed from a folder are kept
        (``reference_stats_<fingerprint>.npz``, a fingerprint of the folder's files and of
        the feature network), so that a rerun does not read the folder again.

    Returns:
      ``(mu, sigma)`` as float64 arrays.

    Raises:
      ValueError: a missing path, a file that is not such an ``.npz``, a folder without
        images, non-square images for a folder, or statistics of another dimension than
        ``features.dim``.
    """
    h, w, c = (int(s) for s in image_shape)
    if isinstance(reference, tuple):
        mu, sigma = (np.asarray(a, np.float64) for a in reference)
    elif isinstance(reference, (str, os.PathLike)) and os.path.isdir(reference):
        folder = os.fspath(reference)
        if h != w:
            raise ValueError(f"a folder reference needs square images, the model makes {h}x{w}: give statistics")
        path = None
        if cache_dir is not None:
            path = os.path.join(cache_dir, f"reference_stats_{_folder_key(folder, features, h, c)}.npz")
        if path is not None and os.path.exists(path):
            mu, sigma = load_stats(path)
        else:
            images, _ = load_image_folder(folder, h, c, dtype=np.uint8)
            mu, sigma = gaussian_stats(features(images))
            if path is not None:
                os.makedirs(cache_dir, exist_ok=True)
                save_stats(path, mu, sigma)
    elif isinstance(reference, (str, os.PathLike)):
        if not os.path.exists(reference):
            raise ValueError(f"reference not found: {reference}")
        mu, sigma = load_stats(reference)
    else:
        x = np.asarray(reference)
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"reference images must be (n, H, W, C) with C = 1 or 3, got shape {x.shape}")
        mu, sigma = gaussian_stats(features(x if x.dtype == np.uint8 else to_uint8(x)))
    if mu.shape != (features.dim,):
        raise ValueError(
            f"reference statistics of dimension {mu.shape[0] if mu.ndim else 0}, "
            f"the {features.name} features have {features.dim}"
        )
    return mu, sigma


def fid_metric(decode, features, ref, *, quantize: bool = True, batch_size: int = 0, mesh=None):
    """``samples -> {metric_name(features): FD}``: decode the samples (None: they are
    the images), map ``[-1, 1]`` to ``uint8`` (:func:`to_uint8`; ``quantize=False``: to
    floats in ``[0, 1]``), take ``features`` and the Frechet distance of their statistics
    to ``ref = (mu, sigma)`` (NaN when the decoded images are not finite)."""
    name = metric_name(features)
    fn = None if decode is None else (decode if hasattr(decode, "lower") else jax.jit(decode))

    def metrics(x):
        imgs = x if fn is None else decode_batches(fn, x, batch_size=batch_size, mesh=mesh)
        if not np.all(np.isfinite(imgs)):
            return {name: float("nan")}
        imgs = to_uint8(imgs) if quantize else np.clip((imgs + 1.0) / 2.0, 0.0, 1.0)
        return {name: frechet_distance(*gaussian_stats(features(imgs)), *ref)}

    return metrics


def _image_shape(decode, shape) -> tuple[int, int, int]:
    if decode is None:
        out = (1, *shape)
    else:
        out = jax.eval_shape(decode, jax.ShapeDtypeStruct((1, *shape), np.float32)).shape
    if len(out) != 4 or out[-1] not in (1, 3):
        raise ValueError(f"the decoded images must be NHWC with 1 or 3 channels, got shape {tuple(out[1:])}")
    return tuple(int(s) for s in out[1:])


def model_sweep(
    denoiser,
    shape,
    out: str,
    reference,
    settings: BenchSettings | None = None,
    *,
    decode: Callable | None = None,
    features=None,
    num_classes: int | None = None,
    null_class: int | None = None,
    grid: Callable[[int], Any] | None = None,
    finish: Callable | None = None,
    model_id: str = "",
    quantize: bool = True,
    report: Callable[[str], None] | None = None,
) -> Sweep:
    """The NFE-versus-FID sweep of ``denoiser`` into ``out``.

    Args:
      denoiser: a :class:`jdiff.Denoiser` on the model's space (NHWC images or latents).
      shape: one sample's shape in that space.
      out: the results folder: ``cells.jsonl`` (resumable), ``results.csv``,
        ``results.md``, ``fd_vs_nfe.png``, cached reference statistics.
      reference: see :func:`reference_stats` (checked before any sampling).
      settings: (default ``BenchSettings()``) solvers, NFEs, samples per cell, seed, guidance, batch size, grid kind
        (``"model"``: the model's own ``grid``), the ``ode_l2`` column
        (``settings.ode_steps > 0``: distance to the converged ODE solution in the
        model's space) (:class:`jdiff.bench.BenchSettings`).
      decode: latents -> images in ``[-1, 1]`` NHWC, a batched JAX function (a VAE's
        decoder); None: the samples are the images.
      features: the feature network (default: none, give InceptionV3 through
        :func:`inception_extractor`); its name picks the metric (:func:`metric_name`).
      num_classes, null_class: a class-conditional model: sample ``i`` gets label
        ``i % num_classes``; with ``settings.guidance != 1`` classifier-free guidance
        (Ho & Salimans, 2021; :func:`jdiff.wrappers.guidance`) against ``null_class``
        (default ``num_classes``, DiT's null label).
      grid: ``steps -> steps + 1`` decreasing times (for ``grid_kind="model"``).
      finish: a wrapper applied after guidance (a scheduler's thresholding, which diffusers
        applies to the guided prediction), or None.
      model_id: what identifies the model in the sweep's settings (a resumed sweep must
        match it).
      quantize: score ``uint8`` images (:func:`to_uint8`); False: the float images.
      report: called with one line per finished cell.

    Returns:
      The :class:`jdiff.bench.Sweep`.

    Raises:
      ValueError: before any sampling, for a bad output folder, reference, solver, NFE,
        too few samples for the feature dimension, guidance on an unconditional model, a
        ``"model"`` grid without ``grid``, or a folder holding a sweep with other settings.
    """
    settings = BenchSettings() if settings is None else settings
    if features is None:
        raise ValueError("give a feature network: InceptionV3 weights for FID (inception_extractor)")
    check_out_dir(out)
    check_fid_sample_count(int(settings.num), int(features.dim))
    shape = tuple(int(s) for s in shape)
    guided = settings.guidance != 1.0
    if guided and not num_classes:
        raise ValueError(f"guidance {settings.guidance} needs a class-conditional model; this one has no classes")
    if settings.grid_kind == MODEL_GRID and grid is None:
        raise ValueError("grid kind 'model' needs the model's own grid; this model has none")
    if settings.grid_kind == MODEL_GRID and settings.ode_steps:
        raise ValueError("the ode_l2 column needs a jdiff grid kind, not the model's own grid")
    image_shape = _image_shape(decode, shape)
    ref = reference_stats(reference, features, image_shape, cache_dir=out)
    labels = (np.arange(settings.num) % num_classes).astype(np.int32) if num_classes else None
    null = num_classes if null_class is None else null_class  # DiT's convention: the last class
    den = jdiff.wrappers.guidance(denoiser, settings.guidance, null) if guided else denoiser
    den = den if finish is None else finish(den)
    name = metric_name(features)
    if isinstance(reference, (str, os.PathLike)):
        ref_id = os.path.abspath(reference)
    else:
        ref_id = "sha1:" + hashlib.sha1(np.asarray(ref[0]).tobytes() + np.asarray(ref[1]).tobytes()).hexdigest()[:16]
    ident = dict(model=model_id, guidance=settings.guidance, metric=name, reference=ref_id, quantize=quantize)
    metrics = fid_metric(decode, features, ref, quantize=quantize, batch_size=settings.batch_size)
    tables: list = []
    if settings.ode_steps:
        metrics = _with_ode_column(metrics, tables, ident, den, shape, settings.ode_steps, labels, settings, out)

    def on_cell(row):
        if report is not None:
            value = row.get(name, float("nan"))
            report(f"{row['solver']} nfe {row['nfe']}: {name} {value:.4g} ({row['seconds']:.1f} s sampling)")

    t0 = time.perf_counter()
    rows = nfe_sweep(
        den,
        shape,
        solvers=settings.names(),
        nfes=list(settings.nfes),
        num=settings.num,
        metrics=metrics,
        cond=labels,
        seed=settings.seed,
        batch_size=settings.batch_size,
        grid_kind=settings.grid_kind,
        grid_fn=grid if settings.grid_kind == MODEL_GRID else None,
        out_dir=out,
        settings=ident,
        progress=settings.progress,
        label="model",
        title=f"{model_id or 'model'}: {name}",
        headline=name,
        tables=tables,
        on_cell=on_cell,
    )
    return Sweep(rows, out, time.perf_counter() - t0)


def load_model(path: str):
    """The pretrained model in the diffusers-format folder ``path``
    (:func:`jdiff.interop.load_diffusers`)."""
    return load_diffusers(path)


def model_bench(
    model,
    out: str,
    reference,
    settings: BenchSettings | None = None,
    *,
    features=None,
    inception=None,
    model_id: str = "",
    report: Callable[[str], None] | None = None,
) -> Sweep:
    """``jdiff bench --model``: :func:`model_sweep` on a pretrained model.

    Args:
      model: a diffusers-format folder (loaded with :func:`load_model`) or a loaded model:
        an object with ``denoiser``, ``shape`` (one sample in the model's space) and
        optionally ``decode`` (latents -> images in ``[-1, 1]``), ``num_classes``,
        ``null_class`` and ``grid`` (``steps -> times``), as
        :func:`jdiff.interop.load_diffusers` returns.
      out, reference, settings, report: as for :func:`model_sweep`.
      features: the feature network; or ``inception``: InceptionV3 weights (FID).
      model_id: the model's name in the sweep's settings (default: the folder's absolute
        path).

    Returns:
      The :class:`jdiff.bench.Sweep`.
    """
    check_out_dir(out)
    settings = BenchSettings() if settings is None else settings
    if features is None:
        if inception is None:
            raise ValueError(f"FID needs InceptionV3 weights (pytorch-fid's {FID_WEIGHTS_FILE})")
        features = inception_extractor(inception)
    if isinstance(model, (str, os.PathLike)):
        model_id = model_id or os.path.abspath(model)
        model = load_model(os.fspath(model))
    return model_sweep(
        model.denoiser,
        model.shape,
        out,
        reference,
        settings,
        decode=getattr(model, "decode", None),
        features=features,
        num_classes=getattr(model, "num_classes", None),
        null_class=getattr(model, "null_class", None),
        grid=getattr(model, "grid", None),
        finish=getattr(getattr(model, "scheduler", None), "thresholding", None),
        model_id=model_id,
        report=report,
    )
