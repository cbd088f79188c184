"""Compile cost of ``sample_padded``'s coefficient tables over an NFE sweep.

``jdiff bench`` runs every distinct registry solver at NFE 3, 4, 5, 6, 8, 10, 15, 20 and
50 through :func:`jdiff.sample_padded` (grids as :func:`jdiff.sweep.plan_cells` builds
them, ``max_steps`` = the solver's longest grid). This times building the tables of all
those cells (trace + compile + run; no network) in two ways:

- ``padded``: the tables program compiled once per solver, the grid padded to
  ``max_steps + 1`` points and its length and NFE target passed as data (what
  ``sample_padded`` does for solvers with ``padded_tables``);
- ``per-length``: one tables program per grid length (what it did before, and still does
  for solvers without ``padded_tables``).

``--check`` builds both and compares the padded tables' rows ``i < N`` with the
per-length ones for every cell (the whole registry; the tests cover one solver per kind).

    python benchmarks/padded_tables.py [--per-length | --check] [--solvers NAME ...]
"""

from __future__ import annotations

import argparse
import time

from jdiff._xla import prefer_fast_cpu_compile

prefer_fast_cpu_compile()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jdiff  # noqa: E402
from jdiff import solvers as S  # noqa: E402
from jdiff._padded import _init, _tables, _tables_per_length  # noqa: E402
from jdiff.solvers._registry import IDENTICAL  # noqa: E402
from jdiff.sweep import plan_cells  # noqa: E402

NFES = (3, 4, 5, 6, 8, 10, 15, 20, 50)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-length", action="store_true", help="one tables program per grid length (the old way)")
    ap.add_argument("--check", action="store_true", help="compare padded with per-length tables, every cell")
    ap.add_argument("--solvers", nargs="*", default=[n for n in S.names() if n not in IDENTICAL])
    args = ap.parse_args()
    process = jdiff.vp_cosine()
    solvers, cells, skipped = plan_cells(args.solvers, NFES, process)
    x = jnp.zeros((4, 2), jnp.float32)
    key = jax.random.key(0)
    groups: dict[str, list] = {}
    for name, nfe, grid in cells:
        groups.setdefault(name, []).append((nfe, jnp.asarray(grid)))
    total, worst = 0.0, {}
    for name, group in groups.items():
        solver = solvers[name]
        max_steps = max(g.shape[0] - 1 for _, g in group)
        t0 = time.perf_counter()
        for nfe, grid in group:
            if args.per_length or args.check:
                ref = _tables_per_length(solver, process, grid, nfe=nfe, max_steps=max_steps, dtype=x.dtype)[0]
                jax.block_until_ready(ref)
            if not args.per_length:
                k = key if solver.stochastic else None
                out = _init(solver, process, x, grid, k, nfe=nfe, max_steps=max_steps).aux
                jax.block_until_ready(out)
            if args.check:
                worst[name] = max(worst.get(name, 0.0), _rel_diff(out, ref, grid.shape[0] - 1))
        seconds = time.perf_counter() - t0
        total += seconds
        diff = f"  rows < N: max rel. diff {worst[name] / np.finfo(np.float32).eps:.0f} eps" if args.check else ""
        print(f"{name:14s} {len(group)} cells {seconds:6.2f} s{diff}", flush=True)
    programs = (_tables_per_length if args.per_length else _tables)._cache_size()
    mode = "per-length" if args.per_length else "padded + per-length" if args.check else "padded"
    print(
        f"{mode}: {len(solvers)} solvers, {len(cells)} cells ({len(skipped)} skipped), "
        f"{programs} tables programs, {total:.1f} s"
    )


def _rel_diff(padded, reference, n: int) -> float:
    """Largest ``|a - b| / max(1, |b|)`` over the rows ``< n`` of two table pytrees
    (inf if their shapes, dtypes or non-finite entries differ)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(reference), strict=True):
        a, b = np.asarray(a)[:n].astype(np.float64), np.asarray(b)[:n].astype(np.float64)
        if a.shape != b.shape or not np.array_equal(np.isfinite(a), np.isfinite(b)):
            return float("inf")
        ok = np.isfinite(b)
        if ok.any():
            worst = max(worst, float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(1.0, np.abs(b[ok])))))
    return worst


if __name__ == "__main__":
    main()
