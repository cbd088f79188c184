"""Solver overhead: sampling wall time against NFE x the denoiser's own time.

For each solver and NFE, the sampler (``jit(jdiff.sample)``) is timed against a
compiled loop that calls the same denoiser NFE times and nothing else (``lax.scan``
with a data dependence, so XLA cannot skip or reorder calls). The two are timed
interleaved and the minimum over repeats is kept. The overhead is
``(T_sample - T_model_loop) / T_model_loop``. Stochastic solvers also draw the
noise: the default (threefry) keys and ``impl="rbg"`` keys are both measured. Two denoisers: a trivial one (the
solver's own cost dominates) and an MLP tuned to about 1 ms per call on this machine.
Also the compile time (trace + lower + XLA compile, caches cleared, best of 3) of
``sample`` at NFE 5 and NFE 100 (the scan keeps the program the same size, so they
should be about equal).

    python benchmarks/solver_overhead.py [--quick] [--solvers NAME ...]

Solvers are named as in ``jdiff.solvers.get``. The full run writes the tracked
``benchmarks/results/solver_overhead.csv``; ``--quick`` writes to the system's temporary
directory unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, time_pair, timeit, today, write_csv  # noqa: E402

import jdiff  # noqa: E402
from jdiff import solvers as S  # noqa: E402

# registry names (jdiff.solvers.get); stochastic ones are also timed with rbg keys
SOLVERS = ["ddim", "euler", "heun", "dpm3", "dpm++2m", "dpm++3m", "deis3", "unipc2", "unipc3", "ipndm4", "sde-dpm++2m"]
QUICK = ["ddim", "dpm++2m", "unipc2", "dpm3"]
RBG = " [rbg key]"


def runs(names):
    """(label, solver, rbg) for each name; stochastic solvers twice (threefry and rbg keys)."""
    out = []
    for n in names:
        s = S.get(n)
        out.append((s.name, s, False))
        if s.stochastic:
            out.append((s.name + RBG, s, True))
    return out


def mlp_denoiser(process, dim, hidden, depth, key):
    ks = jax.random.split(key, depth + 1)
    dims = [dim + 1] + [hidden] * depth + [dim]
    params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)) for k, a, b in zip(ks, dims[:-1], dims[1:])]

    def apply(params, x, t, cond):
        h = jnp.concatenate([x, t[:, None]], axis=1)
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.silu(h)
        return h

    return jdiff.denoiser(apply, process, "eps", params=params)


def model_loop(den, x, grid, nfe, key=None):
    """Call the denoiser nfe times in a compiled loop, feeding each output back. With a
    key, also draw the same per-sample Gaussian noise a stochastic solver draws."""
    from jdiff._random import normal_per_sample, per_sample_keys

    keys = None if key is None else per_sample_keys(key, x.shape[0])

    def body(x, it):
        i, t = it
        p = den(x, t)
        x = x + 1e-3 * p.eps
        if keys is not None:
            x = x + 1e-3 * normal_per_sample(keys, x.shape, x.dtype, step=i)
        return x, None

    ts = jnp.linspace(grid[0], grid[-2], nfe)
    return jax.lax.scan(body, x, (jnp.arange(nfe), ts))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer solvers and NFEs")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument(
        "--solvers", nargs="*", default=None, help="registry names (jdiff.solvers.names(); settings in parentheses)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="CSV path (default: benchmarks/results/solver_overhead.csv for the full run, which is tracked; "
        "with --quick, solver_overhead_quick.csv in the temporary directory)",
    )
    args = ap.parse_args()
    try:
        todo = runs(args.solvers or (QUICK if args.quick else SOLVERS))
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    if args.out is None:
        args.out = (
            os.path.join(tempfile.gettempdir(), "solver_overhead_quick.csv")
            if args.quick
            else os.path.join(os.path.dirname(__file__), "results", "solver_overhead.csv")
        )

    proc = jdiff.vp_linear()
    key = jax.random.key(0)
    x = jdiff.prior_sample(proc, key, (args.batch, args.dim))
    trivial = jdiff.denoiser(lambda x, t, c: 0.5 * x, proc, "eps")
    # an MLP of about 1 ms per call on this machine: tune the width until it is
    hidden, mlp = 256, None
    for _ in range(8):
        mlp = mlp_denoiser(proc, args.dim, hidden, 3, key)
        one = jax.jit(lambda x, t: mlp(x, t).eps)
        ms = 1e3 * timeit(one, x, jnp.asarray(0.5))
        if ms > 0.85:
            break
        hidden = int(hidden * 1.4)
    print(f"MLP denoiser: width {hidden}, {ms:.2f} ms per call at batch {args.batch} x {args.dim}")
    compile_runs = [r for r in todo if not r[2]]
    nfes = (5, 10, 20, 50, 100) if not args.quick else (10, 50)
    rows, table_rows = [], []
    for dname, den in [("trivial", trivial), ("mlp_1ms", mlp)]:
        for name, solver, rbg in todo:
            for nfe in nfes:
                k = jax.random.key(0, impl="rbg") if rbg else key
                grid = jdiff.time_grid(proc, nfe=nfe, solver=solver)
                f = jax.jit(lambda x, g, s=solver, d=den, k=k: jdiff.sample(s, d, x, g, key=k, nfe=nfe))
                _, info = jdiff.sample(solver, den, x, grid, key=k, nfe=nfe, return_info=True)
                used = int(info.nfe)
                g = jax.jit(lambda x, g, d=den, n=used: model_loop(d, x, g, n))
                t_sample, t_model = time_pair(f, g, (x, grid), (x, grid))
                over = (t_sample - t_model) / t_model
                over_noise = float("nan")
                if solver.stochastic:  # separate the cost of drawing the noise from the solver's own
                    gn = jax.jit(lambda x, g, d=den, n=used, k=k: model_loop(d, x, g, n, key=k))
                    t_s2, t_mn = time_pair(f, gn, (x, grid), (x, grid))
                    over_noise = (t_s2 - t_mn) / t_model
                rows.append(
                    dict(
                        denoiser=dname,
                        solver=name,
                        nfe=used,
                        sample_ms=1e3 * t_sample,
                        model_loop_ms=1e3 * t_model,
                        overhead_pct=100 * over,
                        overhead_beyond_noise_pct=100 * over_noise,
                    )
                )
                table_rows.append(
                    [
                        dname,
                        name,
                        used,
                        f"{1e3 * t_sample:.3f}",
                        f"{1e3 * t_model:.3f}",
                        f"{100 * over:+.1f}%",
                        "" if not solver.stochastic else f"{100 * over_noise:+.1f}%",
                    ]
                )
                print(" | ".join(str(c) for c in table_rows[-1]), flush=True)
    print()
    print(
        table(table_rows, ["denoiser", "solver", "NFE", "sample ms", "model-only ms", "overhead", "beyond noise draws"])
    )

    print("\nCompile time of jit(sample) (trivial denoiser):")
    ctab = []
    for name, solver, _ in compile_runs:
        ct = {}
        for nfe in (5, 100):
            grid = jdiff.time_grid(proc, nfe=nfe, solver=solver)
            best = float("inf")
            for _ in range(3):  # trace + compile from scratch each time; keep the fastest
                jax.clear_caches()
                f = jax.jit(lambda x, g, s=solver, n=nfe: jdiff.sample(s, trivial, x, g, key=key, nfe=n))
                t0 = time.perf_counter()
                f.lower(x, grid).compile()
                best = min(best, time.perf_counter() - t0)
            ct[nfe] = best
        rows.append(
            dict(
                denoiser="trivial",
                solver=name,
                nfe=-1,
                sample_ms=float("nan"),
                model_loop_ms=float("nan"),
                overhead_pct=float("nan"),
                overhead_beyond_noise_pct=float("nan"),
                compile_s_nfe5=ct[5],
                compile_s_nfe100=ct[100],
            )
        )
        ctab.append([name, f"{ct[5]:.2f}", f"{ct[100]:.2f}", f"{ct[100] / ct[5]:.2f}"])
    print(table(ctab, ["solver", "compile s, NFE 5", "compile s, NFE 100", "ratio"]))
    for r in rows:
        r.setdefault("compile_s_nfe5", float("nan"))
        r.setdefault("compile_s_nfe100", float("nan"))
    write_csv(args.out, rows)
    print(f"\n{machine()}, {today()}; wrote {args.out}")


if __name__ == "__main__":
    main()
