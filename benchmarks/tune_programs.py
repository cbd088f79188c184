"""Compiled programs and memory mappings over a long run of grid fits (`jdiff.tune`).

A sweep of ``jdiff.tune.tune`` calls (LD3, a few Adam steps, validated on held-out
noises against the fixed grids) over several solvers x NFEs x repeats on a small VP
Gaussian mixture, config by config as a sweep runs them. Each setting runs in a fresh
process and records the backend compilations (jax monitoring's
``/jax/core/compile/backend_compile_duration`` events) and the memory mappings
(``/proc/self/maps`` lines; Linux allows 65,530 by default) after every fit:

- ``bounded``: the default, each fit function keeping at most
  ``jdiff.tune._programs.MAX_PROGRAMS`` compiled programs;
- ``unbounded``: the same with the bound lifted (every program kept, as before).

Fits that share solver, NFE, settings and shapes share one program, so the repeats
compile nothing; the bound keeps the mappings flat as new configurations arrive. Prints a
markdown table and writes ``benchmarks/results/tune_programs.csv``.

    python benchmarks/tune_programs.py                 # 5 solvers x 4 NFEs x 10 repeats = 200 fits
    python benchmarks/tune_programs.py --repeats 2     # quicker
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tune_programs.csv")
SOLVERS = ("ddim", "dpm++2m", "unipc2", "ipndm2", "dpm++3m")
NFES = (3, 4, 6, 8)
EVENT = "/jax/core/compile/backend_compile_duration"


from _common import machine, today  # noqa: E402 (benchmarks/_common.py, next to this script)


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def worker(mode: str, repeats: int, iters: int) -> dict:
    """One sweep in this process; returns its counts."""
    import jax

    import jdiff
    from jdiff import tune as T
    from jdiff.testbed import random_mixture
    from jdiff.tune import _programs

    compiles = [0]

    def listen(event, duration, **kw):
        if event == EVENT:
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    if mode == "unbounded":
        for fn in (T._ld3._ld3_fit, T._validate._errors):
            fn.limit = 10**9
    mix = random_mixture(jax.random.key(16), 16, 4, spread=1.0, std_range=(0.1, 0.4))
    proc = jdiff.vp_linear()
    den = mix.denoiser(proc)
    x_tr = proc.prior_sample(jax.random.key(0), (16, 16))
    x_va = proc.prior_sample(jax.random.key(1), (16, 16))
    y = T.teacher_solve(den, jax.numpy.concatenate([x_tr, x_va]), steps=50)
    teacher = (y[:16], y[16:])
    start, m0, c0 = time.perf_counter(), maps(), compiles[0]
    peak, fits, first, rest = m0, 0, [], 0
    for solver in SOLVERS:
        for nfe in NFES:
            print(f"{mode}: {solver} nfe {nfe}, {compiles[0]} programs, {maps()} mappings", file=sys.stderr)
            for r in range(repeats):
                c = compiles[0]
                T.tune(den, solver, [nfe], x_train=x_tr, x_val=x_va, teacher=teacher, iters=iters, seed=r,
                       progress=False)  # fmt: skip
                if r == 0:
                    first.append(compiles[0] - c)
                else:
                    rest += compiles[0] - c
                fits += 1
                peak = max(peak, maps())
    return dict(
        mode=mode,
        fits=fits,
        configs=len(SOLVERS) * len(NFES),
        programs_compiled=compiles[0] - c0,
        compiled_in_repeats=rest,
        max_programs_per_config=max(first),
        maps_start=m0,
        maps_peak=peak,
        maps_end=maps(),
        ld3_programs_held=T._ld3._ld3_fit.cache_size(),
        limit=_programs.MAX_PROGRAMS if mode == "bounded" else None,
        seconds=round(time.perf_counter() - start, 1),
        machine=machine(),
        date=today(),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=OUT, help="the CSV file")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--modes", default="bounded,unbounded")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.iters)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--repeats", str(args.repeats)]
        cmd += ["--iters", str(args.iters)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{mode}: {rows[-1]}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["mode", "fits", "configs", "programs_compiled", "compiled_in_repeats", "maps_start", "maps_peak"]
    cols += ["maps_end", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
