"""Inversion and likelihood studies on the shipped digits model (issue 13).

Sections (``--section``):

- ``inversion``: the round trip ``x0 -> x_T -> x0`` of every inversion in
  :mod:`jdiff.inversion` on held-out digits (:func:`jdiff.features.digits.digits_split`)
  with the shipped class-conditional model (``jdiff.presets.pretrained("digits")``, the
  true labels as conditioning), at equal inversion cost NFE in {10, 20, 50, 100}
  (grid steps = NFE / model calls per step), in float32 and float64. Prints a table
  and writes ``experiments/results/inversion_roundtrip.csv`` (relative L2 error of the
  batch, ``||x0' - x0|| / ||x0||``, and the wall time of inversion + regeneration,
  compilation included).

- ``likelihood``, ``ito``, ``superdiff`` (in ``_likelihood_sections.py``, see there): bits
  per dimension of the digits model with exact and Hutchinson divergence; the PF-ODE and
  Ito log-densities against the exact one on a Gaussian-mixture testbed; SuperDiff OR and
  AND of two class prompts, judged by the digits classifier.

    python experiments/inversion_likelihood.py [--section inversion|likelihood|ito|superdiff|all]
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------ inversion
def _inversion_methods():
    """name -> (model calls per step, invert(den, x0, grid, cond) -> record)."""
    from jdiff import inversion as I
    from jdiff import solvers as S

    key = jax.random.key(0)
    return {
        "ddim": (1, lambda d, x, g, c: I.invert(S.ddim(), d, x, g, cond=c)),
        "ddim+refine1": (2, lambda d, x, g, c: I.invert(S.ddim(), d, x, g, cond=c, refine=1)),
        "dpm++2m": (1, lambda d, x, g, c: I.invert(S.dpm_solver_pp(2), d, x, g, cond=c)),
        "unipc2": (1, lambda d, x, g, c: I.invert(S.unipc(2), d, x, g, cond=c)),
        "edict(p=0.93)": (2, lambda d, x, g, c: I.edict_invert(d, x, g, cond=c)),
        "bdia(gamma=1)": (1, lambda d, x, g, c: I.bdia_invert(d, x, g, cond=c)),
        "bdia(gamma=0.96)": (1, lambda d, x, g, c: I.bdia_invert(d, x, g, cond=c, gamma=0.96)),
        "ddpm-ef": (1, lambda d, x, g, c: I.ddpm_invert(d, x, g, cond=c, key=key)),
    }


def run_inversion(args):
    """Round-trip error of each inversion against NFE and dtype; returns the rows."""
    import jdiff
    from jdiff import inversion as I
    from jdiff.features.digits import digits_split
    from jdiff.presets import pretrained

    den, _ = pretrained("digits")
    _, _, xh, yh = digits_split()
    x_all, labels = np.asarray(xh[: args.samples]), jnp.asarray(yh[: args.samples], jnp.int32)
    methods = _inversion_methods()
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    rows = []
    print(f"inversion round trip on {len(x_all)} held-out digits (relative L2 error, wall s incl. compile)")
    for dtype in args.dtypes:
        with jax.enable_x64(dtype == "float64"):
            dt = jnp.dtype(dtype)
            x0 = jnp.asarray(x_all, dt)
            for name, (calls, inv_fn) in methods.items():
                for nfe in args.nfe:
                    steps = nfe // calls
                    grid = jdiff.time_grid(den.process, steps, dtype=dt)
                    t0 = time.perf_counter()
                    inv = inv_fn(den, x0, grid, labels)
                    x = jax.block_until_ready(I.regenerate(den, inv, cond=labels))
                    wall = time.perf_counter() - t0
                    err = float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(x0, np.float64)))
                    err /= float(np.linalg.norm(np.asarray(x0, np.float64)))
                    rows.append(dict(dtype=dtype, method=name, nfe=nfe, steps=steps, rel_err=err, wall_s=wall))
                    print(
                        f"  {dtype:8s} {name:18s} NFE {nfe:4d} ({steps:3d} steps)  {err:.3e}  {wall:6.1f} s", flush=True
                    )
                    _write_csv(rows, os.path.join(args.out, "inversion_roundtrip.csv"))  # partial results survive
    print(f"wrote {os.path.join(args.out, 'inversion_roundtrip.csv')}")
    _print_table(rows, args.nfe)
    return rows


def _print_table(rows, nfes):
    print("\n| dtype | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---:|" * len(nfes))
    keys = dict.fromkeys((r["dtype"], r["method"]) for r in rows)
    for dtype, method in keys:
        errs = {r["nfe"]: r["rel_err"] for r in rows if r["dtype"] == dtype and r["method"] == method}
        print(f"| {dtype} | {method} | " + " | ".join(f"{errs[n]:.2e}" if n in errs else "" for n in nfes) + " |")


def _write_csv(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _sections():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _likelihood_sections as L

    return L, {
        "inversion": run_inversion,
        "likelihood": L.run_likelihood,
        "ito": L.run_ito,
        "superdiff": L.run_superdiff,
    }


def main(argv=None):
    L, SECTIONS = _sections()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--methods", nargs="*", default=None, help="inversion methods to run (default: all)")
    ap.add_argument("--out", default=RESULTS)
    L.add_arguments(ap)
    args = ap.parse_args(argv)
    for name, fn in SECTIONS.items():
        if args.section in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
