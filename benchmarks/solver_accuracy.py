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
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, today, write_csv  # noqa: E402

import jdiff  # noqa: E402
from jdiff import solvers as S  # noqa: E402
from jdiff.testbed import frechet_distance, gaussian_stats, random_mixture  # noqa: E402

SOLVERS = {
    "euler(t)": lambda: S.euler(),
    "heun(t)": lambda: S.heun(),
    "ddim": lambda: S.ddim(),
    "ipndm-4": lambda: S.ipndm(4),
    "ipndm_v-4": lambda: S.ipndm(4, variable_step=True),
    "deis-3(t)": lambda: S.deis(3),
    "dpm_solver-2": lambda: S.dpm_solver(2),
    "dpm_solver-3": lambda: S.dpm_solver(3),
    "dpm_solver++(2S)": lambda: S.dpm_solver_pp(2, method="singlestep"),
    "dpm_solver++(2M)": lambda: S.dpm_solver_pp(2),
    "dpm_solver++(3M)": lambda: S.dpm_solver_pp(3),
    "unipc-2(bh1)": lambda: S.unipc(2, variant="bh1"),
    "unipc-2(bh2)": lambda: S.unipc(2),
    "unipc-3(bh2)": lambda: S.unipc(3),
    "ddpm": lambda: S.ddpm(),
    "sde_dpm_solver++(2M)": lambda: S.sde_dpm_solver_pp(2),
    "euler_maruyama": lambda: S.euler_maruyama(),
}
QUICK = ["euler(t)", "heun(t)", "dpm_solver-3", "dpm_solver++(2M)", "unipc-2(bh2)"]
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
    ap.add_argument("--solvers", nargs="*", default=None, help="subset of solver names")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/solver_accuracy[_quick].csv)")
    args = ap.parse_args()
    names = args.solvers or (QUICK if args.quick else list(SOLVERS))
    nfes = (5, 10, 20) if args.quick else NFES
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", "solver_accuracy_quick.csv" if args.quick else "solver_accuracy.csv"
    )
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
                solver = SOLVERS[name]()
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
                if metric == "l2" and SOLVERS[name]().stochastic:
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
