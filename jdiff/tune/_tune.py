"""``tune``: fit, validate on held-out noises and save a grid per NFE (the ``jdiff tune`` command)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jdiff import solvers as S
from jdiff._grid import default_grid_kind
from jdiff.tune._dmn import dmn
from jdiff.tune._files import check_grid_file, model_fingerprint, save_grids
from jdiff.tune._gits import gits
from jdiff.tune._grids import _check_noise, _check_steps, _ends, _flags, _nfe_arg, grid_space, teacher_solve
from jdiff.tune._ld3 import ld3
from jdiff.tune._validate import FAR, FIXED_KINDS, fixed_grids, heldout_errors, validate, verdict

METHODS = ("ld3", "gits", "dmn")


# ---------------------------------------------------------------------------- tune
def tune(
    denoiser,
    solver,
    nfes: Sequence[int],
    *,
    shape: Sequence[int] | None = None,
    method: str = "ld3",
    num_train: int = 100,
    num_val: int = 100,
    seed: int = 0,
    x_train=None,
    x_val=None,
    teacher: Callable | tuple | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    num_classes: int = 0,
    baseline_kind: str = "best",
    far: float = FAR,
    out: str | None = None,
    model: str | None = None,
    progress: bool = True,
    **options,
) -> list[dict]:
    """Fit, validate on held-out noises and (optionally) save a grid per NFE for
    ``denoiser`` and ``solver``.

    Noises come from the process's prior (training: ``seed``; held out: ``seed + 1``),
    or are the user's own (``x_train``, ``x_val``). The teacher maps noises at
    ``t_start`` to their end states at ``t_end`` (default :func:`teacher_solve`, 200
    DPM-Solver++(3M) steps). Every fit is validated on the held-out noises against the
    best fixed grid of the same solver and NFE (the ``jdiff.time_grid`` kind of lowest
    held-out mean error, or ``baseline_kind``; :mod:`jdiff.tune._validate`): both are
    reported by mean and median L2 distance to the teacher and by how many held-out
    noises end *far* from their teacher (farther than ``far`` times the fixed grid's
    median distance). When the fit's mean is not lower, the fixed grid is kept (and one
    line says so, on stderr with ``progress``); the grid file records the comparison.

    Args:
      denoiser: the model.
      solver: a deterministic solver or registry name.
      nfes: the NFEs to fit.
      shape: the shape of one sample (not needed with ``x_train`` / ``x_val``).
      method: ``"ld3"``, ``"gits"`` or ``"dmn"``.
      num_train, num_val: training and held-out noises drawn from the prior.
      seed: their PRNG seed (held-out: ``seed + 1``).
      x_train, x_val: the user's own ``(n, ...)`` training and held-out noises at
        ``t_start`` (both or neither; they replace ``num_train``, ``num_val``, ``seed``).
      teacher: ``(x_T, cond) -> x_end`` at ``t_end`` (default: :func:`teacher_solve` from
        ``t_start`` to ``t_end``), or the pair ``(y_train, y_val)`` of end states of the
        training and held-out noises.
      t_start, t_end: the grids' end points (default ``t_max``, ``t_min``; ``t_end`` may
        be the data, the process's ``t_data``): the fits, the default teacher and the
        fixed grids all span them.
      num_classes: for a class-conditional model, sample ``i`` gets the int32 label
        ``i % num_classes`` as ``cond`` (0: no conditioning).
      baseline_kind: the fixed grid to beat: ``"best"`` (the kind of
        :data:`~jdiff.tune._validate.FIXED_KINDS` with the lowest held-out mean) or one
        ``jdiff.time_grid`` kind (``"default"``: the process's own).
      far: the factor that defines a *far* held-out noise (see above).
      out: a JSON file to save the grids to (:func:`save_grids`); checked before any work.
      model: the model id stored in the file (default :func:`model_fingerprint`).
      progress: a progress bar on stderr, and the line of each fit that the fixed grid replaces.
      options: passed to the method (:func:`ld3`, :func:`gits`, :func:`dmn`).

    Returns:
      One dict per NFE: ``solver``, ``nfe``, ``method``, ``kept`` (``"fit"`` or
      ``"fixed"``), ``grid`` (the kept grid; ``net_grid`` too for a kept LD3 fit with
      ``decouple``), ``err`` (the kept grid's held-out mean L2 to the teacher),
      ``err_fit``, ``err_baseline`` (the best fixed grid's), ``baseline_kind``,
      ``heldout`` (:func:`~jdiff.tune._validate.validate`'s comparison), ``verdict``
      (the one line), ``seconds``.

    Raises:
      ValueError: before any fitting, for an unknown method or solver, an NFE below the
        solver's minimum, an empty or mismatched noise set, an ``out`` that is not a grid
        file for this model, a non-finite teacher output.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(solver, str):
        solver = S.get(solver)
    nfes = list(nfes)
    if not nfes:
        raise ValueError("give at least one NFE")
    process = denoiser.process
    t0, t1 = _ends(process, t_start, t_end)
    to_data, from_noise = _flags(process, t0, t1)
    steps = {int(n): _check_steps(solver, n, to_data=to_data, from_noise=from_noise) for n in nfes}
    if method == "dmn" and grid_space(process, t0, t1) != "logsnr":
        raise ValueError(f"method 'dmn' needs finite log-SNR at both ends of {process!r}")
    kinds = FIXED_KINDS if baseline_kind == "best" else (default_grid_kind(process),)
    if baseline_kind not in ("best", "default"):
        if baseline_kind not in FIXED_KINDS:
            raise ValueError(
                f"unknown baseline_kind {baseline_kind!r}; expected 'best', 'default' or one of {FIXED_KINDS}"
            )
        kinds = (baseline_kind,)
    if not fixed_grids(process, 1, t0, t1, kinds):
        raise ValueError(f"baseline_kind {baseline_kind!r} needs finite log-SNR at both ends of {process!r}")
    if not (np.isfinite(far) and far > 0):
        raise ValueError(f"far must be a positive number, got {far!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    x_tr, x_va = _noises(process, x_train, x_val, shape, num_train, num_val, seed)
    if out is not None:
        model = model_fingerprint(denoiser) if model is None else model
        check_grid_file(out, model=model, process=process)
    n_tr, n_va = x_tr.shape[0], x_va.shape[0]

    def labels(n):
        return jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None

    c_tr, c_va = labels(n_tr), labels(n_va)
    if isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise ValueError(f"teacher must be a callable or the pair (y_train, y_val), got {len(teacher)} items")
        y_tr, y_va = (jnp.asarray(y) for y in teacher)
    else:
        teach = teacher or (lambda x, c: teacher_solve(denoiser, x, t0, t1, cond=c))
        y = jnp.asarray(teach(jnp.concatenate([x_tr, x_va]), labels(n_tr + n_va)))  # one program
        y_tr, y_va = y[:n_tr], y[n_tr:]
    for name, y, x in (("teacher (training)", y_tr, x_tr), ("teacher (held out)", y_va, x_va)):
        if y.shape != x.shape:
            raise ValueError(f"the {name} output has shape {y.shape}, not its noises' {x.shape}")
        if not bool(jnp.all(jnp.isfinite(y))):
            raise ValueError(f"the {name} output has non-finite values")
    if method in ("ld3", "gits"):
        options = dict(options, t_start=t0, t_end=t1)
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
            fit = dmn(process, N, t_start=t0, t_end=t1, **options)
        fixed = fixed_grids(process, N, t0, t1, kinds)
        errs = {k: heldout_errors(solver, denoiser, x_va, y_va, g, nfe=use_nfe, cond=c_va) for k, g in fixed.items()}
        e_fit = heldout_errors(solver, fit.denoiser(denoiser), x_va, y_va, fit.grid, nfe=use_nfe, cond=c_va)
        v = validate(e_fit, errs, far=far)
        keep_fit = v["kept"] == "fit"
        grid = fit.grid if keep_fit else np.asarray(fixed[v["fixed"]["kind"]], np.float64)
        line = verdict(solver.name, int(nfe), method, v)
        row = dict(
            solver=solver.name,
            nfe=int(nfe),
            method=method,
            kept=v["kept"],
            grid=[float(g) for g in grid],
            err=v["fit"]["mean"] if keep_fit else v["fixed"]["mean"],
            err_fit=v["fit"]["mean"],
            err_baseline=v["fixed"]["mean"],
            baseline_kind=v["fixed"]["kind"],
            heldout=v,
            verdict=line,
            seconds=round(fit.seconds, 3),
        )
        if keep_fit and fit.net_grid is not None:
            row["net_grid"] = [float(g) for g in fit.net_grid]
            row["keep"] = fit.keep
        if progress and not keep_fit:
            bar.write(line, file=sys.stderr)
        rows.append(row)
    bar.close()
    if out is not None:
        save_grids(out, rows, model=model, process=process)
    return rows


def _noises(process, x_train, x_val, shape, num_train, num_val, seed):
    """The training and held-out noises: the user's (checked) or drawn from the prior."""
    if (x_train is None) != (x_val is None):
        raise ValueError("give both x_train and x_val (the training and the held-out noises), or neither")
    if x_train is not None:
        x_tr, x_va = _check_noise(x_train, "x_train"), _check_noise(x_val, "x_val")
        if x_tr.shape[1:] != x_va.shape[1:] or (shape is not None and tuple(shape) != x_tr.shape[1:]):
            want = "" if shape is None else f" and shape {tuple(shape)}"
            raise ValueError(f"x_train {x_tr.shape} and x_val {x_va.shape} must have the same sample shape{want}")
        return x_tr, x_va
    for name, v in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int (a non-empty noise set), got {v!r}")
    if shape is None:
        raise ValueError("give shape (the shape of one sample), or the noises x_train and x_val")
    shape = tuple(int(s) for s in shape)
    x_tr = process.prior_sample(jax.random.key(seed), (int(num_train), *shape))
    x_va = process.prior_sample(jax.random.key(seed + 1), (int(num_val), *shape))
    return x_tr, x_va
