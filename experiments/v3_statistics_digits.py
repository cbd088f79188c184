"""DPM-Solver-v3 on the shipped digits model: how the statistics' sample count and log-SNR
resolution decide whether it helps (RESULTS.md "DPM-Solver-v3 statistics on the digits
model").

For each ``--stats N:M`` (N real digits with their labels, M log-SNR points) it computes
:func:`jdiff.solvers.model_statistics`, then samples DPM-Solver-v3 of order 2 and 3 on the
logSNR and quadratic grids at each ``--nfes`` from the same 200 noises and labels as
``experiments/low_nfe_digits.py``'s ``odeerr`` stage, and reports the ODE error: the mean L2
per sample to the model's own accurate solution (:func:`jdiff.tune.teacher_solve`, 40
DPM-Solver++(3M) steps). The first row is degenerate statistics (DPM-Solver++ exactly).
Prints a markdown table and writes ``experiments/results/v3_statistics_digits.csv``.

    python experiments/v3_statistics_digits.py                       # the recorded table
    python experiments/v3_statistics_digits.py --stats 100:13 --nfes 5   # one row, quick
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import solvers as S
from jdiff import tune as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from low_nfe_digits import FixedLabels  # noqa: E402 (the experiment's labelled-model wrapper)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "v3_statistics_digits.csv")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", nargs="*", default=["100:13", "1000:13", "100:51", "1000:51"], help="digits:points")
    ap.add_argument("--nfes", nargs="*", type=int, default=[5, 10, 20])
    ap.add_argument("--noises", type=int, default=200)
    args = ap.parse_args()

    from jdiff.data import digits
    from jdiff.presets import pretrained

    den, cfg = pretrained("digits")
    proc, shape = den.process, tuple(cfg.data.shape)
    real, labels = digits()
    n = int(args.noises)
    x = proc.prior_sample(jax.random.key(0), (n, *shape))  # low_nfe_digits' evaluation noises (seed 0)
    lab = jnp.arange(n, dtype=jnp.int32) % 10
    t0 = time.perf_counter()
    ref = np.asarray(T.teacher_solve(den, x, steps=40, cond=lab), np.float64)
    print(f"teacher: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def err(y):
        return float(np.mean(np.sqrt(np.sum((np.asarray(y, np.float64) - ref).reshape(n, -1) ** 2, -1))))

    rows = []
    for spec in ["degenerate", *args.stats]:
        secs = None
        if spec == "degenerate":
            ends = [float(proc.lambda_(jnp.asarray(t, jnp.float64))) for t in (proc.t_max, proc.t_min)]
            lam = np.linspace(*ends, 3)  # the range model_statistics uses by default
            st = S.ModelStatistics.degenerate(lam, shape, proc.name)
        else:
            k, m = (int(v) for v in spec.split(":"))
            idx = np.random.default_rng(0).permutation(len(real))[:k]
            t0 = time.perf_counter()
            st = S.model_statistics(
                FixedLabels(den, jnp.asarray(labels[idx], jnp.int32)),
                jnp.asarray(real[idx]),
                key=jax.random.key(2),
                num_lambdas=m,
                model="digits",
            )
            secs = round(time.perf_counter() - t0, 1)
        for order in (2, 3):
            s = S.dpm_solver_v3(st, order)
            for nfe in args.nfes:
                for kind in ("logsnr", "quadratic"):
                    g = jdiff.time_grid(proc, kind=kind, nfe=nfe, solver=s)
                    e = err(jdiff.sample(s, den, x, g, cond=lab))
                    rows.append(dict(stats=spec, seconds=secs, order=order, nfe=nfe, grid=kind, err=e))
                    print(f"{spec} v3-{order} {kind} NFE {nfe}: {e:.4f}", file=sys.stderr, flush=True)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = [(o, nfe, k) for nfe in args.nfes for o in (2, 3) for k in ("logsnr", "quadratic")]
    print("| statistics (digits:points) | time | " + " | ".join(f"v3-{o} {k} NFE {nfe}" for o, nfe, k in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    e = {(r["stats"], r["order"], r["nfe"], r["grid"]): r for r in rows}
    for spec in ["degenerate", *args.stats]:
        secs = e[spec, 2, args.nfes[0], "logsnr"]["seconds"]
        cells = [f"{e[spec, o, nfe, k]['err']:.3g}" for o, nfe, k in cols]
        print(f"| {spec} | {'' if secs is None else f'{secs:.0f} s'} | " + " | ".join(cells) + " |")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
