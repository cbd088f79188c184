"""Time to fit a learned time grid: LD3 (`jdiff.tune.ld3`) for the 64-D Gaussian-mixture
testbed under VP at NFE 5, the configuration of `experiments/low_nfe.py` that met the
issue's accuracy target (iPNDM-3 with the analytic first step, decoupled network times,
300 Adam steps, 100 training noises, exact ODE solutions as the teacher).

Reports the first fit (with its compilation), a second fit of the same settings (the
compiled program reused), the held-out error of the fit against the exact ODE solution
(200 other noises) and, for scale, that of the starting quadratic grid. Prints a markdown
table and writes ``benchmarks/results/tune_speed.csv``.

    python benchmarks/tune_speed.py
"""

from __future__ import annotations

import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
from low_nfe import l2, solver_of, testbeds  # noqa: E402 (the experiment's testbeds and solver names)

import jdiff  # noqa: E402
from jdiff import tune as T  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tune_speed.csv")
NFE = 5


def main():
    mix, proc, _ = testbeds()["gm64-vp"]
    den = mix.denoiser(proc)
    x_tr = proc.prior_sample(jax.random.key(0), (100, mix.dim))
    x_va = proc.prior_sample(jax.random.key(1), (200, mix.dim))
    with jax.enable_x64(True):
        y_tr, y_va = (np.asarray(mix.reference_ode(proc, jnp.asarray(x, jnp.float64))) for x in (x_tr, x_va))
    s = solver_of("ipndm3+afs")
    init = np.asarray(jdiff.time_grid(proc, s.num_steps(NFE), kind="quadratic"), np.float64)
    base = l2(jdiff.sample(s, den, x_va, jnp.asarray(init, jnp.float32)), y_va)
    rows = []
    for run in ("first (with compilation)", "second (compiled)"):
        t0 = time.perf_counter()
        fit = T.ld3(s, den, x_tr, y_tr, NFE, init=init, iters=300, learning_rate=0.05, decouple=0.5, keep="x0")
        jax.block_until_ready(fit.grid)
        secs = time.perf_counter() - t0
        err = l2(jdiff.sample(s, fit.denoiser(den), x_va, jnp.asarray(fit.grid, jnp.float32)), y_va)
        rows.append(dict(fit=run, seconds=round(secs, 2), held_out_error=err, quadratic_grid_error=base))
        print(f"{run}: {secs:.1f} s, held-out error {err:.4g} (quadratic grid {base:.4g})", file=sys.stderr)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| LD3 fit, gm64-vp, iPNDM-3+AFS, NFE 5, 300 steps | seconds | held-out error | quadratic grid |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fit']} | {r['seconds']:.1f} | {r['held_out_error']:.4g} | {r['quadratic_grid_error']:.4g} |")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
