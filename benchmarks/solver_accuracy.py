"""Solver accuracy per NFE on exact Gaussian-mixture testbeds.

For each testbed (a Gaussian mixture in d = 2 and d = 64, under the VP-linear process
on a logSNR grid and under rectified flow / flow matching on a uniform grid to t = 0),
each solver and each NFE, from the same x_T:

- ``l2``: the mean L2 distance of the final samples to the exact probability-flow ODE
  solution (diffrax Dopri8, float64, rtol 1e-9) -- the solver's own error;
- ``fd``: the Frechet distance of the samples to the true data distribution (closed-form
  mean and covariance of the mixture), next to ``fd_ref``, the same for the exact ODE
  samples (the finite-sample floor).

Samplers run in float32 as users run them. Stochastic samplers get ``fd`` only.

    python benchmarks/solver_accuracy.py            # all testbeds, solvers, NFEs
    python benchmarks/solver_accuracy.py --quick    # 2-D testbeds, 5 solvers, 3 NFEs

Solvers are named as in ``jdiff.solvers.get`` (``jdiff.solvers.names()``), and the CSV
keys them by ``solver.name``. The full run writes the tracked
``benchmarks/results/solver_accuracy.csv``; ``--quick`` writes to the system's
temporary directory (``solver_accuracy_quick.csv`` there) unless ``--out`` says
otherwise, so a smoke run never rewrites a tracked result.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, today, write_csv  # noqa: E402

import jdiff  # noqa: E402
from jdiff import solvers as S  # noqa: E402
from jdiff.metrics import frechet_distance, gaussian_stats  # noqa: E402
from jdiff.testbed import random_mixture  # noqa: E402

# registry names (jdiff.solvers.get); any other registry name works with --solvers
SOLVERS = [
    "euler",
    "heun",
    "ddim",
    "ipndm4",
    "ipndm4-v",
    "deis3",
    "dpm2",
    "dpm3",
    "dpm++2s",
    "dpm++2m",
    "dpm++3m",
    "unipc2-bh1",
    "unipc2",
    "unipc3",
    "ddpm",
    "sde-dpm++2m",
    "euler-maruyama",
]
QUICK = ["euler", "heun", "dpm3", "dpm++2m", "unipc2"]
NFES = (4, 5, 6, 8, 10, 15, 20, 50)


def testbeds(quick: bool):
    """name -> (mixture, process, grid kwargs)."""
    out = {}
    dims = (2,) if quick else (2, 64)
    for d in dims:
        if d == 2:
            mix = random_mixture(jax.random.key(2), 2, 8, spread=1.0, std_range=(0.05, 0.25))
        else:
            mix = random_mixture(jax.random.key(64), 64, 10, spread=0.6, std_range=(0.1, 0.5))
        out[f"gm{d}-vp"] = (mix, jdiff.vp_linear(), dict(kind="logsnr", final="t_min"))
        out[f"gm{d}-flow"] = (mix, jdiff.rectified_flow(), dict(kind="uniform", final="data"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-D testbeds, 5 solvers, NFE 5/10/20")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument(
        "--solvers", nargs="*", default=None, help="registry names (jdiff.solvers.names(); settings in parentheses)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="CSV path (default: benchmarks/results/solver_accuracy.csv for the full run, which is tracked; "
        "with --quick, solver_accuracy_quick.csv in the temporary directory, never the tracked file)",
    )
    args = ap.parse_args()
    try:
        solvers = {s.name: s for s in (S.get(n) for n in (args.solvers or (QUICK if args.quick else SOLVERS)))}
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    names = list(solvers)
    nfes = (5, 10, 20) if args.quick else NFES
    if args.out:
        out = args.out
    elif args.quick:
        out = os.path.join(tempfile.gettempdir(), "solver_accuracy_quick.csv")
    else:
        out = os.path.join(os.path.dirname(__file__), "results", "solver_accuracy.csv")
    rows = []
    t_start = time.time()
    for tb_name, (mix, proc, gkw) in testbeds(args.quick).items():
        key = jax.random.key(0)
        x_T = jdiff.prior_sample(proc, key, (args.samples, mix.dim))
        t0 = time.time()
        t_end = proc.t_data if gkw["final"] == "data" else proc.t_min
        with jax.enable_x64(True):
            ref = np.asarray(
                mix.reference_ode(
                    proc, jnp.asarray(np.asarray(x_T), jnp.float64), proc.t_max, t_end, rtol=1e-9, atol=1e-9
                )
            )
        mu, cov = mix.mean(), mix.cov()
        fd_ref = frechet_distance(*gaussian_stats(ref), mu, cov)
        print(
            f"\n== {tb_name}: d={mix.dim}, {type(proc).__name__}, grid {gkw}; reference ODE in "
            f"{time.time() - t0:.1f}s, FD(reference samples, data) = {fd_ref:.4f}",
            flush=True,
        )
        for name in names:
            for nfe in nfes:
                solver = solvers[name]
                try:
                    grid = jdiff.time_grid(proc, nfe=nfe, solver=solver, **gkw)
                    if grid.shape[0] - 1 < solver.min_steps:
                        continue
                    f = jax.jit(
                        lambda x, g, s=solver, n=nfe: jdiff.sample(
                            s, mix.denoiser(proc), x, g, key=key, nfe=n, return_info=True
                        )
                    )
                    x, info = f(x_T, grid)
                except ValueError as e:  # e.g. a singlestep solver asked for fewer calls than steps
                    print(f"  {name} NFE {nfe}: skipped ({e})")
                    continue
                x = np.asarray(x, np.float64)
                finite = bool(np.all(np.isfinite(x)))
                l2 = float(np.mean(np.linalg.norm(x - ref, axis=1))) if not solver.stochastic else float("nan")
                fd = frechet_distance(*gaussian_stats(x), mu, cov) if finite else float("nan")
                rows.append(
                    dict(
                        testbed=tb_name,
                        dim=mix.dim,
                        process=proc.name,
                        solver=name,
                        nfe_target=nfe,
                        nfe=int(info.nfe),
                        steps=int(grid.shape[0] - 1),
                        l2=l2,
                        fd=fd,
                        fd_ref=fd_ref,
                        stochastic=solver.stochastic,
                        finite=finite,
                    )
                )
            last = [r for r in rows if r["testbed"] == tb_name and r["solver"] == name]
            print(f"  {name:22s} " + " ".join(f"{r['nfe']:>3d}:{r['l2']:.2e}/{r['fd']:.3f}" for r in last), flush=True)

    write_csv(out, rows)
    # tables: L2 (deterministic) and FD (all), one per testbed, NFE as columns
    for tb_name in dict.fromkeys(r["testbed"] for r in rows):
        for metric in ("l2", "fd"):
            tab = []
            for name in names:
                rs = {r["nfe_target"]: r for r in rows if r["testbed"] == tb_name and r["solver"] == name}
                if metric == "l2" and solvers[name].stochastic:
                    continue
                cells = []
                for n in nfes:
                    r = rs.get(n)
                    if r is None:
                        cells.append("-")
                    else:
                        v = r[metric]
                        mark = "" if r["nfe"] == n else f" ({r['nfe']})"
                        cells.append(("nan" if math.isnan(v) else f"{v:.3g}") + mark)
                tab.append([name] + cells)
            what = "mean L2 to the exact ODE solution" if metric == "l2" else "Frechet distance to the data"
            print(f"\n{tb_name}: {what} (NFE spent in parentheses where it differs from the target)")
            print(table(tab, ["solver"] + [f"NFE {n}" for n in nfes]))
    print(f"\n{machine()}, {today()}; {time.time() - t_start:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
