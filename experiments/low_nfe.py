"""Few-step sampling: the best fixed time grid against optimized and learned grids.

On exact Gaussian-mixture testbeds (64-D and 2-D under VP, 64-D under rectified flow),
for each NFE, the error is the mean L2 distance (per sample) between a sampler's output
and the exact probability-flow ODE solution (diffrax Dopri8, float64, rtol 1e-10) from
the same held-out noises. Two sides:

- fixed: every deterministic solver of the registry (``jdiff.solvers.names()``) on every
  grid kind of ``jdiff.time_grid`` (uniform, logSNR, quadratic, Karras; under rectified
  flow, which starts at infinite log-SNR, uniform and quadratic only);
- tuned: ``jdiff.tune`` -- LD3 (started from the best fixed grid of that solver and NFE;
  ``ld3``: the grid only, ``ld3-dec``: the grid and the network's decoupled times,
  ``jdiff.wrappers.network_time``), GITS and DMN (VP only) -- for a few solvers
  (``--tuned-solvers``; ``NAME+afs`` is an iPNDM with the analytic first step, which is
  not in the registry: it is also run on the fixed grids, as ``fixed-extra`` rows, and
  the tables give the ratio to the best fixed configuration with and without them).

Both sides are scored on the same held-out noises; the learned grids were fit on other
noises (the training set). Prints one table per testbed and writes
``experiments/results/low_nfe/{testbed}.csv``, ``results.md`` and ``{testbed}.png``.

    python experiments/low_nfe.py                      # all testbeds, NFE 5 6 8 10
    python experiments/low_nfe.py --testbeds gm64-vp --nfes 5
    python experiments/low_nfe.py --reuse-fixed=-dec --methods ld3-dec   # fixed side from the CSVs
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import solvers as S
from jdiff import tune as T
from jdiff.testbed import random_mixture

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "low_nfe")


def testbeds():
    """name -> (mixture, process, final)."""
    gm64 = random_mixture(jax.random.key(64), 64, 10, spread=0.6, std_range=(0.1, 0.5))
    gm2 = random_mixture(jax.random.key(2), 2, 8, spread=1.0, std_range=(0.05, 0.25))
    return {
        "gm64-vp": (gm64, jdiff.vp_linear(), "t_min"),
        "gm2-vp": (gm2, jdiff.vp_linear(), "t_min"),
        "gm64-flow": (gm64, jdiff.rectified_flow(), "data"),
    }


def deterministic_solvers():
    out = {}
    for name in S.names():
        s = S.get(name)
        if not s.stochastic:
            out[name] = s
    return out


def l2(x, y):
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return float(np.mean(np.sqrt(np.sum(d.reshape(len(d), -1) ** 2, -1))))


def fixed_side(den, proc, final, x_va, y_va, nfes, solvers):
    kinds = ("uniform", "quadratic") if T.grid_space(proc, proc.t_max, proc.t_min) != "logsnr" else jdiff.GRID_KINDS
    rows = []
    for name, s in solvers.items():
        for kind in kinds:
            for nfe in nfes:
                try:
                    grid = jdiff.time_grid(proc, kind=kind, nfe=nfe, solver=s, final=final)
                    if len(grid) - 1 < s.min_steps:
                        continue
                    x, used = jdiff.sample_padded(
                        s,
                        den,
                        x_va,
                        grid,
                        max_steps=max(max(nfes), *(s.num_steps(n) for n in nfes)),  # AFS: one step more
                        nfe=T._nfe_arg(s, nfe),
                        return_nfe=True,
                    )
                except ValueError:
                    continue
                if int(used) > nfe:
                    continue
                rows.append(dict(side="fixed", method=kind, solver=name, nfe=nfe, nfe_used=int(used), err=l2(x, y_va)))
    return rows


def solver_of(spec):
    """A registry name, or ``NAME+afs`` for an iPNDM with the analytic first step (not in
    the registry: its fixed-grid errors are measured too, as ``fixed-extra`` rows)."""
    if spec.endswith("+afs"):
        base = S.get(spec[: -len("+afs")])
        if not hasattr(base, "afs"):
            raise ValueError(f"{spec}: only iPNDM has the analytic first step")
        return dataclasses.replace(base, afs=True)
    return S.get(spec)


def fixed_extra(den, proc, final, x_va, y_va, nfes, specs, log):
    """The tuned side's solvers that are not in the registry, on the fixed grid kinds."""
    extra = {sp: solver_of(sp) for sp in specs if sp not in S.names()}
    rows = fixed_side(den, proc, final, x_va, y_va, nfes, extra) if extra else []
    for r in rows:
        r["side"] = "fixed-extra"
    log(f"  {len(rows)} fixed-extra cells ({', '.join(extra) or 'none'})")
    return rows


def tuned_side(den, proc, final, x_tr, y_tr, x_va, y_va, nfes, names, fixed, log, args):
    rows = []
    t_end = float(proc.t_data) if final == "data" else None
    vp = T.grid_space(proc, proc.t_max, proc.t_min) == "logsnr"
    for name in names:
        s = solver_of(name)
        for nfe in nfes:
            mine = [r for r in fixed if r["solver"] == name and r["nfe"] == nfe]
            if not mine:
                continue
            best_kind = min(mine, key=lambda r: r["err"])["method"]
            N = s.num_steps(nfe)
            init = np.asarray(jdiff.time_grid(proc, N, kind=best_kind, final=final), np.float64)
            fits = {}
            for method in args.methods:
                t0 = time.perf_counter()
                if method in ("ld3", "ld3-dec"):
                    fits[method] = T.ld3(
                        s,
                        den,
                        x_tr,
                        y_tr,
                        nfe,
                        init=init,
                        t_end=t_end,
                        iters=args.iters,
                        learning_rate=args.lr,
                        decouple=args.decouple if method == "ld3-dec" else 0.0,
                        keep=args.keep,
                    )
                elif method == "gits":
                    fits[method] = T.gits(s, den, x_tr[:32], nfe, t_end=t_end, fine_steps=60)
                elif method == "dmn" and vp:
                    fits[method] = T.dmn(proc, N, order=min(s.order, 3))
                if method in fits:
                    fits[method].seconds = time.perf_counter() - t0
            for method, fit in fits.items():
                x = jdiff.sample(s, fit.denoiser(den), x_va, jnp.asarray(fit.grid, jnp.float32), nfe=T._nfe_arg(s, nfe))
                err = l2(x, y_va)
                rows.append(
                    dict(
                        side="tuned",
                        method=method,
                        solver=name,
                        nfe=nfe,
                        nfe_used=nfe,
                        err=err,
                        fit_seconds=round(fit.seconds, 1),
                        grid=" ".join(f"{v:.5g}" for v in fit.grid),
                        net_grid="" if fit.net_grid is None else " ".join(f"{v:.5g}" for v in fit.net_grid),
                    )
                )
                log(f"  {name} nfe {nfe} {method}: {err:.4g} (fit {fit.seconds:.1f} s)")
    return rows


def _usable(spec, proc):
    """False for the analytic first step under a process with alpha = 0 at t_max (rectified flow)."""
    return not spec.endswith("+afs") or float(proc.alpha(jnp.asarray(proc.t_max, jnp.float32))) > 0


def write_csv(rows, path):
    cols = ["side", "method", "solver", "nfe", "nfe_used", "err", "fit_seconds", "grid", "net_grid"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})


def summary(rows, nfes):
    """Per NFE: the best fixed row (registry), the best fixed row including the tuned
    side's extra solvers on fixed grids, the best tuned row and both ratios."""
    out = []
    for nfe in nfes:
        f = [r for r in rows if r["side"] == "fixed" and r["nfe"] == nfe]
        fx = f + [r for r in rows if r["side"] == "fixed-extra" and r["nfe"] == nfe]
        t = [r for r in rows if r["side"] == "tuned" and r["nfe"] == nfe]
        if not f or not t:
            continue
        bf, bfx, bt = (min(v, key=lambda r: r["err"]) for v in (f, fx, t))
        out.append((nfe, bf, bfx, bt, bt["err"] / bf["err"], bt["err"] / bfx["err"]))
    return out


def markdown(name, summ, meta):
    lines = [
        f"### {name}: best fixed grid vs best tuned grid ({meta})",
        "",
        "| NFE | best fixed (solver, grid) | error | best tuned (solver, method) | error | ratio "
        "| best fixed incl. extra solvers | ratio to it |",
        "|---:|---|---:|---|---:|---:|---|---:|",
    ]
    for nfe, bf, bfx, bt, ratio, ratio_x in summ:
        lines.append(
            f"| {nfe} | {bf['solver']}, {bf['method']} | {bf['err']:.4g} | {bt['solver']}, {bt['method']} | "
            f"{bt['err']:.4g} | {ratio:.2f} | {bfx['solver']}, {bfx['method']}: {bfx['err']:.4g} | {ratio_x:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", nargs="*", default=None, help="gm64-vp gm2-vp gm64-flow (default: all)")
    ap.add_argument("--nfes", nargs="*", type=int, default=[5, 6, 8, 10])
    ap.add_argument(
        "--tuned-solvers",
        nargs="*",
        default=["ipndm3", "ipndm3+afs"],
        help="registry names, or NAME+afs (iPNDM with the analytic first step)",
    )
    ap.add_argument(
        "--methods",
        nargs="*",
        default=["ld3-dec", "gits", "dmn"],
        help="ld3 (grid only), ld3-dec (grid and decoupled network times), gits, dmn (VP only)",
    )
    ap.add_argument("--iters", type=int, default=300, help="LD3 Adam steps")
    ap.add_argument("--lr", type=float, default=0.05, help="LD3 learning rate")
    ap.add_argument("--decouple", type=float, default=0.5, help="ld3-dec: network-time window (<= 0.5)")
    ap.add_argument("--keep", default="x0", choices=["x0", "eps"], help="ld3-dec: the prediction kept")
    ap.add_argument("--train", type=int, default=100, help="training noises")
    ap.add_argument("--val", type=int, default=200, help="held-out noises")
    ap.add_argument("--out", default=OUT)
    ap.add_argument(
        "--reuse-fixed",
        metavar="SUFFIX",
        help="read the fixed side (and earlier tuned rows, which enter the tables) from {out}/{testbed}.csv and "
        "write the new rows to {testbed}{SUFFIX}.csv",
    )
    args = ap.parse_args()
    beds = testbeds()
    names = args.testbeds or list(beds)
    os.makedirs(args.out, exist_ok=True)
    solvers = deterministic_solvers()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    md = []
    for name in names:
        mix, proc, final = beds[name]
        den = mix.denoiser(proc)
        t_end = float(proc.t_data) if final == "data" else None
        x_tr = proc.prior_sample(jax.random.key(0), (args.train, mix.dim))
        x_va = proc.prior_sample(jax.random.key(1), (args.val, mix.dim))
        t0 = time.perf_counter()
        with jax.enable_x64(True):
            ref = lambda x: np.asarray(mix.reference_ode(proc, jnp.asarray(x, jnp.float64), t_end=t_end))  # noqa: E731
            y_tr, y_va = ref(x_tr), ref(x_va)
        log(f"{name}: exact references in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        suffix = args.reuse_fixed or ""
        earlier = []
        if args.reuse_fixed:
            with open(os.path.join(args.out, f"{name}.csv")) as f:
                old = [
                    dict(r, nfe=int(r["nfe"]), nfe_used=int(r["nfe_used"]), err=float(r["err"]))
                    for r in csv.DictReader(f)
                    if int(r["nfe"]) in args.nfes
                ]
            fixed = [r for r in old if r["side"] == "fixed"]
            earlier = [r for r in old if r["side"] != "fixed"]
        else:
            fixed = fixed_side(den, proc, final, x_va, y_va, args.nfes, solvers)
            log(f"{name}: {len(fixed)} fixed cells in {time.perf_counter() - t0:.1f} s")
            write_csv(fixed, os.path.join(args.out, f"{name}.csv"))  # kept if the tuned side fails
        specs = [sp for sp in args.tuned_solvers if _usable(sp, proc)]
        extra = fixed_extra(den, proc, final, x_va, y_va, args.nfes, specs, log)
        tuned = tuned_side(den, proc, final, x_tr, y_tr, x_va, y_va, args.nfes, specs, fixed + extra, log, args)
        rows = fixed + earlier + extra + tuned
        write_csv(rows if not suffix else extra + tuned, os.path.join(args.out, f"{name}{suffix}.csv"))
        meta = (
            f"d={mix.dim}, {type(proc).__name__}, to {'the data' if final == 'data' else 't_min'}, "
            f"{args.val} held-out noises, {args.train} training noises"
        )
        table = markdown(name, summary(rows, args.nfes), meta)
        print(table, flush=True)
        md.append(table)
        plot(rows, args.nfes, name, os.path.join(args.out, f"{name}{suffix}.png"))
    with open(os.path.join(args.out, f"results{args.reuse_fixed or ''}.md"), "w") as f:
        f.write("\n".join(md))


def plot(rows, nfes, name, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, label in (("fixed", "best fixed grid"), ("tuned", "best tuned grid")):
        pts = [
            (n, min(r["err"] for r in rows if r["side"] == side and r["nfe"] == n))
            for n in nfes
            if any(r["side"] == side and r["nfe"] == n for r in rows)
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for m in ("ld3", "ld3-dec", "gits", "dmn"):
        pts = [
            (n, min(r["err"] for r in rows if r["method"] == m and r["nfe"] == n))
            for n in nfes
            if any(r["method"] == m and r["nfe"] == n for r in rows)
        ]
        if pts:
            ax.plot(*zip(*pts), ls=":", marker=".", label=f"best {m}")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("mean L2 to the exact ODE solution")
    ax.set_title(name)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
