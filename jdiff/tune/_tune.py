"""``tune``: fit, validate on held-out noises and save a grid per NFE (the ``jdiff tune`` command)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jdiff import solvers as S
from jdiff._grid import time_grid
from jdiff.tune._dmn import dmn
from jdiff.tune._files import model_fingerprint, save_grids
from jdiff.tune._gits import gits
from jdiff.tune._grids import _check_steps, _nfe_arg, grid_error, grid_space, teacher_solve
from jdiff.tune._ld3 import ld3

METHODS = ("ld3", "gits", "dmn")


# ---------------------------------------------------------------------------- tune
def tune(
    denoiser,
    solver,
    nfes: Sequence[int],
    *,
    shape: Sequence[int],
    method: str = "ld3",
    num_train: int = 100,
    num_val: int = 100,
    seed: int = 0,
    teacher: Callable | None = None,
    num_classes: int = 0,
    baseline_kind: str = "default",
    out: str | None = None,
    model: str | None = None,
    progress: bool = True,
    **options,
) -> list[dict]:
    """Fit, evaluate and (optionally) save a grid per NFE for ``denoiser`` and ``solver``.

    Noises come from the process's prior (training: ``seed``; validation: ``seed + 1``,
    held out). The teacher maps noises at ``t_max`` to their end states at ``t_min``
    (default :func:`teacher_solve`, 200 DPM-Solver++(3M) steps). Each grid is evaluated
    on the held-out noises as the mean L2 distance to the teacher, next to the same
    solver on the fixed grid of kind ``baseline_kind``.

    Args:
      denoiser: the model.
      solver: a deterministic solver or registry name.
      nfes: the NFEs to fit.
      shape: the shape of one sample.
      method: ``"ld3"``, ``"gits"`` or ``"dmn"``.
      num_train, num_val: training and held-out noises.
      teacher: ``(x_T, cond) -> x_end`` (default: :func:`teacher_solve`).
      num_classes: for a class-conditional model, sample ``i`` gets the int32 label
        ``i % num_classes`` as ``cond`` (0: no conditioning).
      out: a JSON file to save the grids to (:func:`save_grids`).
      model: the model id stored in the file (default :func:`model_fingerprint`).
      progress: a progress bar on stderr.
      options: passed to the method (:func:`ld3`, :func:`gits`, :func:`dmn`).

    Returns:
      One dict per NFE: ``solver``, ``nfe``, ``method``, ``grid`` (and ``net_grid`` for
      LD3 with ``decouple``), ``err`` (held-out mean L2 to the teacher), ``err_baseline``,
      ``seconds``.

    Raises:
      ValueError: before any fitting, for an unknown method or solver, an NFE below the
        solver's minimum, an empty noise set, a non-finite teacher output.
    """

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(solver, str):
        solver = S.get(solver)
    nfes = list(nfes)
    if not nfes:
        raise ValueError("give at least one NFE")
    steps = {int(n): _check_steps(solver, n) for n in nfes}
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int (a non-empty noise set), got {v!r}")
    process = denoiser.process
    if method == "dmn" and grid_space(process, process.t_max, process.t_min) != "logsnr":
        raise ValueError(f"method 'dmn' needs finite log-SNR at both ends of {process!r}")
    if out is not None and model is None:
        model = model_fingerprint(denoiser)
    shape = tuple(int(s) for s in shape)
    x_tr = process.prior_sample(jax.random.key(seed), (int(num_train), *shape))
    x_va = process.prior_sample(jax.random.key(seed + 1), (int(num_val), *shape))
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")

    def labels(n):
        return jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None

    c_tr, c_va = labels(int(num_train)), labels(int(num_val))
    teach = teacher or (lambda x, c: teacher_solve(denoiser, x, cond=c))
    y = jnp.asarray(teach(jnp.concatenate([x_tr, x_va]), labels(int(num_train) + int(num_val))))  # one program
    y_tr, y_va = y[: int(num_train)], y[int(num_train) :]
    for name, y in (("teacher (training)", y_tr), ("teacher (held out)", y_va)):
        if not bool(jnp.all(jnp.isfinite(y))):
            raise ValueError(f"the {name} output has non-finite values")
    rows = []
    bar = tqdm(nfes, desc=f"tune {method} {solver.name}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for nfe in bar:
        N = steps[int(nfe)]
        use_nfe = _nfe_arg(solver, nfe)
        if method == "ld3":
            fit = ld3(solver, denoiser, x_tr, y_tr, int(nfe), cond=c_tr, **options)
        elif method == "gits":
            fit = gits(solver, denoiser, x_tr, int(nfe), cond=c_tr, **options)
        else:
            fit = dmn(process, N, **options)
        base = time_grid(process, N, kind=baseline_kind)
        row = dict(
            solver=solver.name,
            nfe=int(nfe),
            method=method,
            grid=[float(v) for v in fit.grid],
            err=grid_error(solver, fit.denoiser(denoiser), x_va, y_va, fit.grid, nfe=use_nfe, cond=c_va),
            err_baseline=grid_error(solver, denoiser, x_va, y_va, base, nfe=use_nfe, cond=c_va),
            baseline_kind=baseline_kind,
            seconds=round(fit.seconds, 3),
        )
        if fit.net_grid is not None:
            row["net_grid"] = [float(v) for v in fit.net_grid]
        bar.set_postfix_str(f"nfe {nfe}: {row['err']:.3g} vs {row['err_baseline']:.3g}")
        rows.append(row)
    bar.close()
    if out is not None:
        save_grids(out, rows, model=model, process=process)
    return rows
