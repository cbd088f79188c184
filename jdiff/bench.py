"""The main job's evaluation recipes: sample quality against NFE for every solver.

:func:`bench` is ``jdiff bench`` as a library call. Without a run directory it evaluates
the digits model shipped with jdiff and a Gaussian-mixture testbed:

- **digits**: FD-digits (the Frechet distance in the features of jdiff's shipped digits
  classifier; not FID) of class-conditional samples (labels ``0..9`` cycling) against the
  held-out digits, the classifier's accuracy on them, and the precise column ``ode_l2``:
  the mean L2 distance (per sample) of each cell's samples to the model's own converged
  probability-flow ODE solution from the same noises (:func:`ode_error_metric`; the
  measure the few-step work uses, ``experiments/low_nfe_digits.py --stage odeerr``).
  FD-digits on 100 samples cannot separate good solvers past NFE 8 (they all land inside
  the estimator's spread); the ODE error keeps falling with the solver's order.
- **testbed**: the exact Frechet distance of 4,000 samples to the true distribution of an
  8-D, 6-component Gaussian mixture (:func:`jdiff.testbed.random_mixture`).

With ``run=DIR`` it evaluates a trained run against reference statistics (FID with
InceptionV3 weights, FD-digits otherwise). Every sweep is :func:`jdiff.sweep.nfe_sweep`:
same seeds in every cell, resumable, its results (``results.csv``, ``results.md``,
``fd_vs_nfe.png``) written once, by the sweep.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

import jdiff
from jdiff import solvers as S
from jdiff import testbed as TB
from jdiff._generate import generate
from jdiff._grid import time_grid
from jdiff.data import load_image_folder
from jdiff.features import InceptionExtractor
from jdiff.features.digits import digits_classifier, digits_split
from jdiff.metrics import StreamingStats, frechet_distance, gaussian_stats
from jdiff.runs import denoiser_apply, load_run_state, pretrained, run_denoiser, to_host, writable_path
from jdiff.sweep import nfe_sweep

__all__ = [
    "DEFAULT_NFES",
    "ODE_SOLVER",
    "ODE_STEPS",
    "BenchSettings",
    "Sweep",
    "bench",
    "digits_sweep",
    "testbed_sweep",
    "run_sweep",
    "digits_metrics",
    "feature_metrics",
    "ode_error_metric",
    "check_out_dir",
]

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 15, 20, 50)
TESTBED_DIM = 8
TESTBED_COMPONENTS = 6
TESTBED_NUM = 4000
ODE_SOLVER = "dpm++3m"  # the converged reference: DPM-Solver++(3M) ...
ODE_STEPS = 200  # ... at 200 steps of the sweep's grid kind

ODE_DOC = (
    "ode_l2: mean over samples of the L2 distance (in the model's data units, over all {dim} values of a "
    "sample) between the cell's sample and the model's own converged probability-flow ODE solution from the "
    "same starting noise and label ({ref}); it measures the solver's discretization error, so it keeps ranking "
    "solvers where FD-digits on few samples cannot. For stochastic solvers (ddpm, sde-*, euler-maruyama) the "
    "distance is still defined but is not an error: their samples leave the ODE's path by design and the value "
    "stays large at any NFE."
)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What every sweep of :func:`bench` shares.

    Attributes:
      solvers: registry names (default: every solver of :func:`jdiff.solvers.names`).
      nfes: numbers of network evaluations per sample.
      num: samples per (solver, NFE) cell (the testbed always uses 4,000).
      seed: the noise seed shared by every cell.
      guidance: classifier-free guidance scale (class-conditional models).
      batch_size: samples per device program (0: all at once).
      grid_kind: the time grid (:func:`jdiff.time_grid`).
      ode_steps: steps of the converged ODE reference of the ``ode_l2`` column (0: no
        column; None: :data:`ODE_STEPS` for the digits sweep, no column for a trained run,
        whose sweeps predate the column); the reference is :data:`ODE_SOLVER` on a
        ``grid_kind`` grid.
      progress: a progress bar on stderr.
    """

    solvers: Sequence[str] | None = None
    nfes: Sequence[int] = DEFAULT_NFES
    num: int = 100
    seed: int = 0
    guidance: float = 1.0
    batch_size: int = 0
    grid_kind: str = "default"
    ode_steps: int | None = None
    progress: bool = True

    def names(self) -> list[str]:
        return list(self.solvers) if self.solvers else S.names()


class Sweep(NamedTuple):
    """One finished sweep: its rows (:func:`jdiff.sweep.nfe_sweep`), its folder and its
    wall time in seconds."""

    rows: list[dict]
    out_dir: str
    seconds: float


def check_out_dir(out: str) -> None:
    """Raise ``ValueError`` unless ``out`` is, or can be created as, a writable folder
    (nothing is created)."""
    writable_path(out, "output folder", directory=True)


# ----------------------------------------------------------------------------- metrics
def digits_metrics(classifier, ref, labels=None) -> Callable[[np.ndarray], dict]:
    """``samples -> {"fd_digits", "accuracy"}``: FD-digits against the statistics ``ref``
    (``(mu, sigma)``) and, with ``labels``, the classifier's accuracy on them."""

    def metrics(x):
        mu, sigma = classifier.stats(x)
        out = {"fd_digits": frechet_distance(mu, sigma, *ref)}
        if labels is not None:
            out["accuracy"] = classifier.accuracy(x, labels)
        return out

    return metrics


def feature_metrics(extractor, ref, name: str, to_unit: bool) -> Callable[[np.ndarray], dict]:
    """``samples -> {name: FD}`` in the features of ``extractor`` against ``ref``; with
    ``to_unit`` the samples are mapped from ``[-1, 1]`` to ``[0, 1]`` first (InceptionV3)."""

    def metrics(x):
        imgs = np.clip((x + 1.0) / 2.0, 0.0, 1.0) if to_unit else x
        st = StreamingStats()
        st.update(extractor(imgs))
        return {name: frechet_distance(st.mean, st.cov, *ref)}

    return metrics


def ode_error_metric(
    denoiser,
    shape,
    *,
    num: int,
    steps: int = ODE_STEPS,
    solver: str = ODE_SOLVER,
    seed: int = 0,
    cond=None,
    batch_size: int = 0,
    grid_kind: str = "default",
    cache_dir: str | None = None,
) -> Callable[[np.ndarray], dict]:
    """``samples -> {"ode_l2": mean_i |x_i - x_ref_i|_2}``: the distance of a sweep
    cell's samples to the converged probability-flow ODE solution from the same noises.

    The reference ``x_ref`` is ``solver`` over ``steps`` intervals of the ``grid_kind``
    grid, drawn by :func:`jdiff.generate` with the sweep's own ``num``, ``seed``, ``cond``
    and ``batch_size`` (so sample ``i`` starts from the same noise as sample ``i`` of every
    cell) through the same padded loop (``max_steps=steps``) a sweep uses, so the cell of
    ``solver`` at ``nfe == steps`` is the reference itself (distance 0). It is computed on
    the first call only, and kept as ``ode_reference_{solver}_{steps}.npy`` in
    ``cache_dir``: run it inside :func:`jdiff.sweep.nfe_sweep` with ``settings`` that
    identify the noises, so that a folder's cache always belongs to its sweep.

    Args:
      denoiser: the model (as for :func:`jdiff.sweep.nfe_sweep`).
      shape: the shape of one sample.
      num, seed, cond, batch_size, grid_kind: as the sweep's.
      steps: intervals of the reference's grid (200 by default: DPM-Solver++(3M) there is
        converged far below the differences between solvers at NFE 50).
      solver: the reference's registry name (a deterministic ODE solver).
      cache_dir: where the reference is kept (None: in memory only).

    Returns:
      The metric function of one argument, samples ``(num, *shape)``.

    Raises:
      ValueError: ``steps < 1``, or a stochastic reference solver.
    """
    ref_solver = S.get(solver)
    if steps < 1 or ref_solver.num_steps(steps) < ref_solver.min_steps:
        raise ValueError(f"the ODE reference needs at least {ref_solver.min_steps} steps of {solver}, got {steps}")
    if getattr(ref_solver, "stochastic", False):
        raise ValueError(f"the ODE reference must be a deterministic solver, {solver} is stochastic")
    path = None if cache_dir is None else os.path.join(cache_dir, f"ode_reference_{solver}_{steps}.npy")
    held: list[np.ndarray] = []

    def reference() -> np.ndarray:
        if held:
            return held[0]
        if path is not None and os.path.exists(path):
            ref = np.load(path)
        else:
            n = int(ref_solver.num_steps(steps))
            grid = np.asarray(time_grid(denoiser.process, n, kind=grid_kind))
            ref, _ = generate(
                ref_solver,
                denoiser,
                num,
                shape,
                nfe=steps,
                grid=grid,
                seed=seed,
                cond=cond,
                batch_size=batch_size,
                grid_kind=grid_kind,
                return_nfe=True,
                max_steps=n,
            )
            ref = np.asarray(ref)
            if not np.all(np.isfinite(ref)):
                raise ValueError(f"the ODE reference ({solver}, {steps} steps) is not finite")
            if path is not None:
                tmp = path + ".tmp.npy"
                np.save(tmp, ref)
                os.replace(tmp, path)
        held.append(ref)
        return ref

    def metrics(x):
        ref = reference()
        d = np.asarray(x, np.float64).reshape(len(ref), -1) - ref.reshape(len(ref), -1)
        return {"ode_l2": float(np.mean(np.sqrt(np.sum(d * d, axis=1))))}

    return metrics


def _both(first, second):
    def metrics(x):
        return {**first(x), **second(x)}

    return metrics


# ----------------------------------------------------------------------------- sweeps
def _sweep(den, shape, settings: BenchSettings, metrics, out, ident, label, *, num=None, cond=None, **report):
    t0 = time.perf_counter()
    rows = nfe_sweep(
        den,
        shape,
        solvers=settings.names(),
        nfes=list(settings.nfes),
        num=settings.num if num is None else num,
        metrics=metrics,
        cond=cond,
        seed=settings.seed,
        batch_size=settings.batch_size,
        grid_kind=settings.grid_kind,
        out_dir=out,
        settings=ident,
        progress=settings.progress,
        label=label,
        **report,
    )
    return Sweep(rows, out, time.perf_counter() - t0)


def _floor_note(metric: str, floor: float) -> str:
    return f"Floor: {metric} of real data against the reference at the same sample count = {floor:.4g}"


def _ode_table(dim: int, steps: int, grid_kind: str):
    ref = f"{ODE_SOLVER} at {steps} steps, grid kind {grid_kind}"
    return ("ode_l2", "mean L2 to the converged ODE solution from the same noises", ODE_DOC.format(dim=dim, ref=ref))


def _with_ode_column(metrics, tables, ident, den, shape, steps, labels, settings, out):
    """``metrics`` with the ``ode_l2`` column added (its table first in ``tables``, its
    reference recorded in the sweep's identity ``ident``)."""
    ident["ode_reference"] = f"{ODE_SOLVER}@{steps}"
    ode = ode_error_metric(
        den,
        shape,
        num=settings.num,
        steps=steps,
        seed=settings.seed,
        cond=labels,
        batch_size=settings.batch_size,
        grid_kind=settings.grid_kind,
        cache_dir=out,
    )
    tables.insert(0, _ode_table(int(np.prod(shape)), steps, settings.grid_kind))
    return _both(metrics, ode)


def digits_sweep(out: str, settings: BenchSettings = BenchSettings()) -> Sweep:
    """The main job on the shipped digits model, into ``out``: FD-digits against the
    held-out digits, accuracy, and (unless ``settings.ode_steps == 0``) the ``ode_l2`` column.

    The floor in ``results.md`` is FD-digits of ``num`` real training digits (a seeded
    subset) against the held-out set: the Frechet estimator's bias at this sample count."""
    clf = digits_classifier()
    x_train, _, x_held, _ = digits_split()
    ref = clf.stats(x_held)
    n = min(settings.num, len(x_train))
    pick = np.random.default_rng(settings.seed).choice(len(x_train), n, replace=False)
    floor = digits_metrics(clf, ref)(x_train[pick])["fd_digits"]
    den, _ = pretrained("digits", guidance=settings.guidance)
    labels = (np.arange(settings.num) % 10).astype(np.int32)
    shape = (8, 8, 1)
    ident = dict(model="pretrained:digits", guidance=settings.guidance, metric="fd_digits")
    metrics = digits_metrics(clf, ref, labels)
    tables = [("accuracy", "classifier accuracy on class-conditional samples", "")]
    steps = ODE_STEPS if settings.ode_steps is None else settings.ode_steps
    if steps:
        metrics = _with_ode_column(metrics, tables, ident, den, shape, steps, labels, settings, out)
    return _sweep(
        den,
        shape,
        settings,
        metrics,
        out,
        ident,
        "digits",
        cond=labels,
        title="shipped digits model: FD-digits against held-out digits",
        headline="fd_digits",
        notes=[_floor_note("fd_digits", floor)],
        tables=tables,
    )


def testbed_sweep(out: str, settings: BenchSettings = BenchSettings()) -> Sweep:
    """The same sweep on the 8-D, 6-component Gaussian-mixture testbed (VP-cosine, 4,000
    samples), scored by the exact Frechet distance to the true distribution, into ``out``.
    The floor is the mean distance of exact mixture samples at the same count (5 draws)."""
    mix = TB.random_mixture(jax.random.key(0), TESTBED_DIM, TESTBED_COMPONENTS)
    process = jdiff.vp_cosine()
    mu, cov = np.asarray(mix.mean(), np.float64), np.asarray(mix.cov(), np.float64)

    def metrics(x):
        return {"fd_exact": frechet_distance(*gaussian_stats(x), mu, cov)}

    draws = [metrics(np.asarray(mix.sample(jax.random.key(100 + i), TESTBED_NUM)))["fd_exact"] for i in range(5)]
    floor = float(np.mean(draws))
    ident = dict(
        model=f"gmm(dim={TESTBED_DIM}, components={TESTBED_COMPONENTS}, key=0)", process=process.name, metric="fd_exact"
    )
    return _sweep(
        mix.denoiser(process),
        (TESTBED_DIM,),
        settings,
        metrics,
        out,
        ident,
        "testbed",
        num=TESTBED_NUM,
        title="Gaussian-mixture testbed: exact Frechet distance to the true distribution",
        headline="fd_exact",
        notes=[_floor_note("fd_exact", floor)],
    )


def load_images(path: str, shape) -> np.ndarray:
    """Reference images: a folder of image files (resized to ``shape``), or an
    ``.npy``/``.npz`` array ``(n, H, W, C)`` in ``[-1, 1]``. ``ValueError`` names the file."""
    if os.path.isdir(path):
        try:
            return load_image_folder(path, int(shape[0]), int(shape[-1]))[0]
        except (ValueError, OSError) as e:
            raise ValueError(f"reference images {path}: {e}") from None
    try:
        data = np.load(path, allow_pickle=False)
        if hasattr(data, "files"):
            key = "images" if "images" in data.files else data.files[0]
            data = data[key]
    except (ValueError, OSError) as e:
        raise ValueError(f"reference images {path}: not a NumPy .npy/.npz array file ({e})") from None
    x = np.asarray(data, np.float32)
    if x.ndim != 4 or not np.all(np.isfinite(x)):
        raise ValueError(f"reference images {path}: expected finite images (n, H, W, C), got shape {x.shape}")
    return x


def run_sweep(
    run_dir: str,
    out: str,
    settings: BenchSettings = BenchSettings(),
    *,
    step: int | None = None,
    ref: tuple[Any, Any] | None = None,
    ref_data: str | None = None,
    inception: str | None = None,
) -> Sweep:
    """The sweep of a trained run (``jdiff train``'s directory), into ``out``.

    Args:
      run_dir: the run; its newest usable checkpoint (or ``step``), EMA weights if kept.
      settings: as for :func:`bench` (``guidance`` applies to class-conditional runs).
      ref: reference statistics ``(mu, sigma)`` in the metric's feature space.
      ref_data: reference images (:func:`load_images`) when ``ref`` is None (default:
        the run's own training data).
      inception: InceptionV3 weights: FID instead of FD-digits (which needs 8x8x1 images).

    Returns:
      The :class:`Sweep`; with ``settings.ode_steps > 0`` the rows carry ``ode_l2`` too.
    """
    cfg, _, run_, state, step = load_run_state(run_dir, step)
    params = to_host(state.ema_params if state.ema_params is not None else state.params)
    nc = run_.num_classes
    den = run_denoiser(denoiser_apply(run_), run_, params, settings.guidance if nc else 1.0)
    labels = (np.arange(settings.num) % nc).astype(np.int32) if nc else None
    if inception:
        try:
            ext = InceptionExtractor(inception)
        except (OSError, pickle.UnpicklingError) as e:
            raise ValueError(f"InceptionV3 weights {inception}: {e}") from None
        name = "fid"
        metrics_of = lambda r: feature_metrics(ext, r, "fid", True)  # noqa: E731
        stats_of = lambda x: gaussian_stats(ext((x + 1.0) / 2.0))  # noqa: E731
    else:
        if tuple(run_.data_shape) != (8, 8, 1):
            raise ValueError(
                f"FD-digits needs 8x8x1 images, this run makes {run_.data_shape}: give InceptionV3 weights"
            )
        clf = digits_classifier()
        name, metrics_of, stats_of = "fd_digits", (lambda r: digits_metrics(clf, r, labels)), clf.stats
    if ref is None:
        x_ref = load_images(ref_data, run_.data_shape) if ref_data else cfg.data.load()[0]
        if tuple(x_ref.shape[1:]) != tuple(run_.data_shape):
            raise ValueError(f"reference images have shape {x_ref.shape[1:]}, the model makes {run_.data_shape}")
        ref = stats_of(x_ref)
    ident = dict(model=f"{os.path.abspath(run_dir)}@{step}", guidance=settings.guidance, metric=name)
    metrics, tables = metrics_of(ref), []
    if labels is not None and name == "fd_digits":
        tables.append(("accuracy", "classifier accuracy on class-conditional samples", ""))
    if settings.ode_steps:
        shape, steps = run_.data_shape, settings.ode_steps
        metrics = _with_ode_column(metrics, tables, ident, den, shape, steps, labels, settings, out)
    return _sweep(
        den,
        run_.data_shape,
        settings,
        metrics,
        out,
        ident,
        "run",
        cond=labels,
        title=f"{cfg.name} step {step}: {name}",
        headline=name,
        tables=tables,
    )


def bench(
    out: str = "bench_results",
    settings: BenchSettings = BenchSettings(),
    *,
    run: str | None = None,
    digits: bool = True,
    testbed: bool = True,
    report: Callable[[str], None] | None = None,
    **run_options,
) -> dict[str, Sweep]:
    """``jdiff bench``: the main job, or the sweep of a trained run.

    Without ``run``: :func:`digits_sweep` into ``out/digits`` (unless ``digits=False``)
    and :func:`testbed_sweep` into ``out/testbed`` (unless ``testbed=False``). With
    ``run``: :func:`run_sweep` into ``out`` (``run_options``: ``step``, ``ref``,
    ``ref_data``, ``inception``). Cells finished by an interrupted call into the same
    folder are kept and not recomputed.

    Args:
      out: the results folder (checked before any work).
      settings: what the sweeps share (:class:`BenchSettings`).
      report: called with one line per finished sweep (cells, seconds, results file).

    Returns:
      ``{"digits": Sweep, "testbed": Sweep}`` (the ones run), or ``{"run": Sweep}``.

    Raises:
      ValueError: before any sampling, for an output folder that is a file or cannot be
        created, an unknown solver, a bad NFE, or a folder holding a sweep with other
        settings; :func:`run_sweep`'s errors for bad references.
    """
    check_out_dir(out)
    jobs: list[tuple[str, Callable[[], Sweep]]] = []
    if run is not None:
        jobs.append(("run", lambda: run_sweep(run, out, settings, **run_options)))
    else:
        if run_options:
            raise ValueError(f"{', '.join(sorted(run_options))} apply to a trained run only")
        if digits:
            jobs.append(("digits", lambda: digits_sweep(os.path.join(out, "digits"), settings)))
        if testbed:
            jobs.append(("testbed", lambda: testbed_sweep(os.path.join(out, "testbed"), settings)))
    done = {}
    for name, job in jobs:
        done[name] = res = job()
        if report is not None:
            where = os.path.join(res.out_dir, "results.md")
            report(f"{name} sweep: {len(res.rows)} cells in {res.seconds:.0f} s -> {where}")
    return done
