"""Sample quality against the number of network evaluations: the NFE sweep.

:func:`nfe_sweep` generates samples from one denoiser with every (solver, NFE) pair of a
list, from the same seeds, and scores each cell with a metric function (a Frechet
distance in a feature space, a classifier's accuracy, the exact distance on a testbed).
Each solver's sampling loop is compiled once for all its NFEs
(:func:`jdiff.sample_padded`). Finished cells are appended to ``cells.jsonl`` in the
output folder as they complete, so a killed sweep run again with the same settings skips
them; when the sweep ends the folder receives, once, ``results.csv`` (every cell),
``results.md`` (the full tables and the best configuration of each solver family per NFE,
:func:`family_table`) and ``fd_vs_nfe.png`` (one line per solver family: its best
configuration at each NFE, and the front of all of them).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from jdiff import solvers as S
from jdiff._generate import generate
from jdiff._grid import time_grid
from jdiff.plotting import plot_sweep
from jdiff.solvers._registry import IDENTICAL

__all__ = [
    "nfe_sweep",
    "plan_cells",
    "write_results",
    "plot_results",
    "read_cells",
    "markdown_table",
    "family_table",
    "family_best",
    "solver_family",
    "FAMILIES",
]

CELLS = "cells.jsonl"
# metrics where higher is better: full tables only, no family bests (which take minima)
HIGHER_IS_BETTER = frozenset({"accuracy"})
SETTINGS = "sweep.json"


def plan_cells(
    solver_names: Sequence[str],
    nfes: Sequence[int],
    process,
    *,
    grid_kind: str = "default",
    grid_fn: Callable[[int], np.ndarray] | None = None,
):
    """Resolve solver names and check every cell before anything runs.

    Returns ``(solvers, cells, skipped)``: the solver values by name, the runnable
    ``(name, nfe, grid)`` cells (the grid of ``solver.num_steps(nfe)`` intervals:
    ``time_grid(process, steps, kind=grid_kind)``, or ``grid_fn(steps)`` when given, e.g.
    a pretrained model's own scheduler grid), and ``(name, nfe, reason)`` for cells a
    solver cannot run (too few evaluations for its order). Raises ``ValueError`` for an
    unknown solver name, an NFE that is not a positive int, or a ``grid_fn`` grid that is
    not ``steps + 1`` finite times.
    """
    if not solver_names:
        raise ValueError("give at least one solver")
    if not nfes:
        raise ValueError("give at least one NFE")
    for n in nfes:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"every NFE must be a positive int, got {n!r}")
    solvers, unknown = {}, []
    for name in solver_names:
        try:
            solvers[name] = S.get(name)
        except (KeyError, ValueError):
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown solver(s) {unknown}; known: {', '.join(S.names())}")
    cells, skipped, grids = [], [], {}
    for name, solver in solvers.items():
        for nfe in nfes:
            try:
                steps = int(solver.num_steps(int(nfe)))
                if steps < solver.min_steps:
                    raise ValueError(f"needs at least {solver.min_steps} steps")
                if steps not in grids:  # one grid per length, shared by the solvers
                    grids[steps] = _grid(process, steps, grid_kind, grid_fn)
            except _GridError as e:
                raise ValueError(str(e)) from None
            except ValueError as e:
                skipped.append((name, int(nfe), str(e).split(";")[0]))
                continue
            cells.append((name, int(nfe), grids[steps]))
    return solvers, cells, skipped


class _GridError(Exception):
    """A ``grid_fn`` that breaks its contract: an error of the caller, not a skipped cell."""


def _grid(process, steps: int, grid_kind: str, grid_fn) -> np.ndarray:
    if grid_fn is None:
        return np.asarray(time_grid(process, steps, kind=grid_kind))
    grid = np.asarray(grid_fn(steps), np.float32)
    if grid.shape != (steps + 1,) or not np.all(np.isfinite(grid)):
        raise _GridError(f"the model's grid for {steps} steps must be {steps + 1} finite times, got shape {grid.shape}")
    return grid


def read_cells(out_dir: str) -> list[dict]:
    """The finished cells recorded in ``out_dir`` (a torn last line is ignored)."""
    path = os.path.join(out_dir, CELLS)
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: that cell is recomputed
    return rows


def _append_cell(out_dir: str, row: dict) -> None:
    with open(os.path.join(out_dir, CELLS), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out_dir} holds a sweep with other settings ({lines}); its finished cells would not be "
                "comparable: choose another output folder or delete it"
            )
        return
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def nfe_sweep(
    denoiser,
    shape,
    *,
    solvers: Sequence[str],
    nfes: Sequence[int],
    num: int,
    metrics: Callable[[np.ndarray], dict],
    cond=None,
    seed: int = 0,
    batch_size: int = 0,
    grid_kind: str = "default",
    out_dir: str | None = None,
    settings: dict | None = None,
    progress: bool = True,
    label: str = "",
    share_identical: bool = True,
    title: str = "",
    headline: str | None = None,
    notes: Sequence[str] = (),
    tables: Sequence[tuple[str, str, str]] = (),
    grid_fn: Callable[[int], np.ndarray] | None = None,
    on_cell: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Score ``num`` samples of ``denoiser`` for every (solver, NFE) cell.

    Args:
      denoiser: a :class:`jdiff.Denoiser` (or a wrapper such as guidance).
      shape: the shape of one sample.
      solvers: registry names (:func:`jdiff.solvers.names`).
      nfes: numbers of network evaluations.
      num: samples per cell; sample ``i`` has the same starting noise in every cell.
      metrics: ``samples (num, *shape) -> {name: float}``, e.g. a Frechet distance.
      cond: per-sample conditioning with leading axis ``num`` (e.g. labels).
      seed: the noise seed shared by all cells.
      batch_size: samples per device program (0: all at once).
      out_dir: folder for ``cells.jsonl`` (resumable), ``results.csv``, ``results.md``,
        ``fd_vs_nfe.png``; None keeps nothing on disk.
      settings: what identifies the sweep besides solvers and NFEs (model, metric,
        guidance...): a rerun into the same folder with other settings is refused.
      progress: a progress bar on stderr.
      label: prefix of the progress bar.
      share_identical: a solver that computes exactly the same steps as another one in the
        list (``jdiff.solvers._registry.IDENTICAL``: e.g. every first-order exponential
        integrator is DDIM; proven by the tests) is not run again: its rows repeat the
        target's numbers with ``same_as`` naming the target.
      title, headline, notes, tables: the layout of ``results.md`` and ``fd_vs_nfe.png``
        (:func:`write_results`), written once when the sweep ends.
      grid_fn: ``steps -> grid`` of ``steps + 1`` decreasing times, used instead of
        ``grid_kind`` (:func:`plan_cells`; name it in ``settings`` and ``grid_kind``).
      on_cell: called with each newly computed row as soon as it is recorded (progress
        lines in logs, where a progress bar is not kept).

    Returns:
      One dict per cell: ``solver``, ``nfe`` (requested), ``nfe_used``, ``seconds``, the
      metric values; cells a solver cannot run carry ``skipped`` instead.

    Raises:
      ValueError: before any sampling, for an unknown solver, a bad NFE, ``num < 1``, or
        an output folder holding a sweep with other settings.
    """
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    solver_values, cells, skipped = plan_cells(solvers, nfes, denoiser.process, grid_kind=grid_kind, grid_fn=grid_fn)
    alias = {n: IDENTICAL[n] for n in solvers if share_identical and IDENTICAL.get(n) in solver_values}
    copies = [c for c in cells if c[0] in alias]
    cells = [c for c in cells if c[0] not in alias]
    done: dict[tuple[str, int], dict] = {}
    if out_dir is not None:
        ident = dict(settings or {}, num=int(num), seed=int(seed), grid_kind=grid_kind, shape=list(shape))
        _check_settings(out_dir, ident)
        for row in read_cells(out_dir):
            done[(row["solver"], int(row["nfe"]))] = row
    rows = [dict(solver=n, nfe=f, skipped=why) for n, f, why in skipped]
    todo = [c for c in cells if (c[0], c[1]) not in done]
    rows += [done[(c[0], c[1])] for c in cells if (c[0], c[1]) in done]
    if done and progress:
        print(f"{label}resuming: {len(cells) - len(todo)} of {len(cells)} cells already done", file=sys.stderr)
    bar = tqdm(total=len(todo), desc=label or "sweep", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    by_solver: dict[str, list] = {}
    for c in todo:
        by_solver.setdefault(c[0], []).append(c)
    for name, group in by_solver.items():
        solver = solver_values[name]
        # one compiled loop for the solver's longest grid serves all its NFEs
        max_steps = max(len(grid) - 1 for _, _, grid in group)
        for _, nfe, grid in group:
            bar.set_postfix_str(f"{name} nfe {nfe}")
            t0 = time.perf_counter()
            x, used = generate(
                solver,
                denoiser,
                num,
                shape,
                nfe=nfe,
                grid=grid,
                seed=seed,
                cond=cond,
                batch_size=batch_size,
                grid_kind=grid_kind,
                return_nfe=True,
                max_steps=max_steps,
            )
            seconds = time.perf_counter() - t0
            finite = bool(np.all(np.isfinite(x)))
            values = metrics(x) if finite else {}
            row = dict(solver=name, nfe=nfe, nfe_used=int(used), seconds=round(seconds, 3), finite=finite)
            row.update({k: float(v) for k, v in values.items()})
            rows.append(row)
            if out_dir is not None:
                _append_cell(out_dir, row)
            if on_cell is not None:
                on_cell(row)
            bar.update(1)
    bar.close()
    found = {(r["solver"], r["nfe"]): r for r in rows}
    for name, nfe, _ in copies:
        src = found.get((alias[name], nfe))
        if src is not None:
            rows.append(dict(src, solver=name, same_as=alias[name]))
    order = {n: i for i, n in enumerate(solvers)}
    rows.sort(key=lambda r: (order[r["solver"]], r["nfe"]))
    if out_dir is not None:
        write_results(rows, out_dir, metric=headline, title=title, notes=notes, tables=tables)
    return rows


def _columns(rows) -> list[str]:
    cols = ["solver", "nfe", "nfe_used"]
    extra = []
    for r in rows:
        for k in r:
            if k not in cols and k not in extra and k not in ("seconds", "finite", "skipped", "same_as"):
                extra.append(k)
    return cols + extra + ["seconds", "same_as", "skipped"]


def write_results(
    rows: list[dict],
    out_dir: str,
    *,
    metric: str | None = None,
    title: str = "",
    notes: Sequence[str] = (),
    tables: Sequence[tuple[str, str, str]] = (),
) -> None:
    """Write ``results.csv``, ``results.md`` and ``fd_vs_nfe.png`` into ``out_dir``.

    Args:
      rows: the sweep's cells (:func:`nfe_sweep`).
      metric: the headline metric (default: the first metric column).
      title: the heading of ``results.md`` and the figure.
      notes: paragraphs after the headline table (e.g. the metric's floor).
      tables: ``(metric, title, doc)`` of further full tables (``doc``: a paragraph saying
        what the metric means; may be empty).

    ``results.md`` holds the headline table (one row per solver, one column per NFE),
    ``notes``, the best of each solver family per NFE (:func:`family_table`) for the
    headline and the further tables' metrics (except :data:`HIGHER_IS_BETTER`), then the
    further full tables. The figure
    draws the family bests (:func:`jdiff.plotting.plot_sweep`), one panel per metric with
    a family table.
    """
    os.makedirs(out_dir, exist_ok=True)
    cols = _columns(rows)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    metric = metric or next((c for c in cols if c not in ("solver", "nfe", "nfe_used", "seconds", "skipped")), None)
    if metric is None:
        return
    parts = [markdown_table(rows, metric, title=title)]
    parts += [f"{n}\n" for n in notes]
    ranked = [metric] + [m for m, _, _ in tables if m not in HIGHER_IS_BETTER]
    for m in ranked:
        parts.append(family_table(rows, m))
    for m, t, doc in tables:
        parts.append(markdown_table(rows, m, title=t, level=4) + (f"\n{doc}\n" if doc else ""))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(parts))
    plot_results(rows, os.path.join(out_dir, "fd_vs_nfe.png"), metric=ranked, title=title)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def markdown_table(rows: list[dict], metric: str, *, title: str = "", level: int = 3) -> str:
    """``metric`` as a Markdown table: one row per solver, one column per NFE (a heading
    of ``level`` hashes)."""
    nfes = sorted({r["nfe"] for r in rows})
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    cell = {(r["solver"], r["nfe"]): r for r in rows}
    out = [f"{'#' * level} {title or metric}\n"]
    out.append(f"{metric} by solver (rows) and NFE (columns); '-': the solver cannot run\n")
    out.append("| solver | " + " | ".join(str(n) for n in nfes) + " |")
    out.append("|---|" + "---:|" * len(nfes))
    for s in solvers:
        vals = []
        for n in nfes:
            r = cell.get((s, n))
            vals.append("-" if r is None or "skipped" in r else _fmt(r.get(metric)))
        same = next((r.get("same_as") for r in rows if r["solver"] == s and r.get("same_as")), None)
        out.append(f"| {s}{f' (= {same})' if same else ''} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


# Solver families of the registry's names, first match wins: (family, name prefixes).
FAMILIES = (
    ("SDE / SA-Solver", ("euler-maruyama", "sde-", "sa-", "sa_")),
    ("DPM-Solver++", ("dpm++", "dpm_solver++", "dpm-solver++")),
    ("DPM-Solver", ("dpm",)),
    ("DDIM / DDPM", ("ddim", "ddpm")),
    ("Euler / Heun", ("euler", "heun")),
    ("DEIS", ("deis",)),
    ("UniPC", ("unip",)),
    ("iPNDM", ("ipndm",)),
)


def solver_family(name: str) -> str:
    """The family of a registry name (:data:`FAMILIES`): ``"dpm++2m"`` -> DPM-Solver++,
    ``"unip2"`` -> UniPC, ``"ddpm"`` -> DDIM / DDPM, ``"sde-dpm++2m"`` -> SDE /
    SA-Solver...; a name outside them is its own family (its letters before the first
    digit or dash)."""
    low = name.lower()
    for family, prefixes in FAMILIES:
        if low.startswith(prefixes):
            return family
    return re.split(r"[\d\-(]", low, maxsplit=1)[0] or name


def family_best(rows: list[dict], metric: str) -> dict[str, dict[int, dict]]:
    """``{family: {nfe: row}}``: per family and NFE, the cell with the lowest finite
    ``metric`` (the first one in the sweep's order on a tie, so a solver is preferred to
    its identical alias)."""
    best: dict[str, dict[int, dict]] = {}
    for r in rows:
        v = r.get(metric)
        if "skipped" in r or v is None or not math.isfinite(v):
            continue
        fam = best.setdefault(solver_family(r["solver"]), {})
        if r["nfe"] not in fam or v < fam[r["nfe"]][metric]:
            fam[r["nfe"]] = r
    return best


def family_table(rows: list[dict], metric: str) -> str:
    """Markdown: the best ``metric`` of each solver family per NFE, with the solver that
    reached it, and the best of all (the quality-versus-NFE front)."""
    nfes = sorted({r["nfe"] for r in rows})
    best = family_best(rows, metric)
    front = {n: min((f[n] for f in best.values() if n in f), key=lambda r: r[metric], default=None) for n in nfes}
    out = [f"#### {metric}: the best of each solver family per NFE\n"]
    out.append("| family | " + " | ".join(str(n) for n in nfes) + " |")
    out.append("|---|" + "---:|" * len(nfes))

    def cell(r):
        if r is None:
            return "-"
        same = f" = {r['same_as']}" if r.get("same_as") else ""
        return f"{_fmt(r[metric])} ({r['solver']}{same})"

    for fam, by_nfe in best.items():
        out.append(f"| {fam} | " + " | ".join(cell(by_nfe.get(n)) for n in nfes) + " |")
    out.append("| **best of all** | " + " | ".join(cell(front[n]) for n in nfes) + " |")
    return "\n".join(out) + "\n"


def plot_results(rows: list[dict], path: str, *, metric, title: str = "", points=()) -> None:
    """The sweep's figure: per metric (a name or a list of names, one panel each), the
    best of each solver family against NFE (:func:`jdiff.plotting.plot_sweep`), and
    ``points`` (single configurations such as few-step students, drawn as markers: dicts
    with ``label``, ``nfe`` and the metrics' values)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    families = [f for f, _ in FAMILIES]
    plot_sweep({m: family_best(rows, m) for m in metrics}, path, title=title, families=families, points=points)
