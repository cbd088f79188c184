"""Multistep solvers on grids of 15 or more steps whose last step is long in log-SNR.

diffusers' ``lower_order_final`` lowers the order of the last steps only on grids shorter
than 15 steps. A uniform-in-t grid to a small ``t_min`` ends with a step 3-5x as long in
log-SNR as the one before at every length (a quadratic grid 1.4-1.7x up to ~35 steps), and
a multistep update's extrapolation weights grow with that ratio, so the error of
DPM-Solver++(3M) or UniPC-3 jumped 2-25x from 14 to 15 steps. jdiff's data-prediction
multistep solvers in log-SNR (DPM-Solver++, UniPC, DPM-Solver-v3) now take such a last
step (more than ``jdiff.solvers._base.LONG_STEP_RATIO`` = 1.5 times the previous one) at
first order on grids of 15+ steps (:func:`jdiff.solvers._base.multistep_order`).

This script measures the rule: mean L2 distance per sample to the exact ODE solution
(diffrax, float64) on the exact Gaussian-mixture testbeds, with the rule (``on``) and
without it (``off``: the module constant set to None in a separate process), for the
multistep solvers on uniform and quadratic grids at 10-80 steps (DPM-Solver(3M) with noise
prediction and DEIS do not use the rule: their ``on`` equals ``off``). It prints a markdown
table and writes ``benchmarks/results/long_steps.csv``.

    python benchmarks/long_steps.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

SOLVERS = ["dpm++2m", "dpm++3m", "unipc2", "unipc3", "dpm3m", "deis3", "deis3-log_rho"]
STEPS = [10, 14, 15, 20, 40, 80]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "long_steps.csv")


def measure(rule: str, n_noise: int) -> list[dict]:
    """Every (testbed, solver, grid, steps) error with the long-step rule ``on`` or ``off``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import jdiff
    import jdiff.solvers._multistep as M
    from jdiff import solvers as S
    from jdiff.testbed import random_mixture

    if rule == "off":
        M.LONG_STEP_RATIO = None  # read when a solver builds its tables
    gm64 = random_mixture(jax.random.key(64), 64, 10, spread=0.6, std_range=(0.1, 0.5))
    gm2 = random_mixture(jax.random.key(2), 2, 8, spread=1.0, std_range=(0.05, 0.25))
    rows = []
    for tb, mix, proc in [
        ("gm64-vp", gm64, jdiff.vp_linear()),
        ("gm2-vp", gm2, jdiff.vp_linear()),
        ("gm64-cosine", gm64, jdiff.vp_cosine()),
    ]:
        den = mix.denoiser(proc)
        x = jdiff.prior_sample(proc, jax.random.key(7), (n_noise, mix.dim), jnp.float64)
        ref = np.asarray(mix.reference_ode(proc, x))
        for name in SOLVERS:
            s = S.get(name)
            for kind in ("uniform", "quadratic"):
                for n in STEPS:
                    grid = jdiff.time_grid(proc, n, kind=kind, dtype=jnp.float64)
                    y = np.asarray(jdiff.sample_padded(s, den, x, grid, max_steps=max(STEPS)))
                    err = float(np.mean(np.sqrt(np.sum((y - ref) ** 2, -1))))
                    rows.append(dict(testbed=tb, solver=name, grid=kind, steps=n, rule=rule, err=err))
                print(f"[{rule}] {tb} {name}", file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noises", type=int, default=100)
    ap.add_argument("--rule", choices=["on", "off"], help="(internal) measure one side and print JSON")
    args = ap.parse_args()
    if args.rule:
        print(json.dumps(measure(args.rule, args.noises)))
        return
    rows = []
    for rule in ("off", "on"):  # separate processes: compiled tables are cached per solver value
        out = subprocess.run(
            [sys.executable, __file__, "--rule", rule, "--noises", str(args.noises)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    err = {(r["testbed"], r["solver"], r["grid"], r["steps"], r["rule"]): r["err"] for r in rows}
    print("| testbed | solver | grid | " + " | ".join(f"{n} steps (off / on)" for n in STEPS) + " |")
    print("|---|---|---|" + "---:|" * len(STEPS))
    for tb, name, kind in dict.fromkeys((r["testbed"], r["solver"], r["grid"]) for r in rows):
        cells = [f"{err[tb, name, kind, n, 'off']:.3g} / {err[tb, name, kind, n, 'on']:.3g}" for n in STEPS]
        print(f"| {tb} | {name} | {kind} | " + " | ".join(cells) + " |")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
