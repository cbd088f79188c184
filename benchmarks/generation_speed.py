"""Generation throughput of the shipped digits model: samples per second at NFE 10.

``jdiff.generate`` with DPM-Solver++(2M) and the registry's other common solvers on the
``presets.pretrained("digits")`` U-Net (8x8x1, class-conditional, guidance 1), batch
``--num``; the first call compiles, the median of 3 later calls is reported.

    python benchmarks/generation_speed.py [--num 500] [--solvers dpm++2m,ddim,unipc2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, today  # noqa: E402

import jdiff  # noqa: E402
from jdiff import presets  # noqa: E402
from jdiff import solvers as S  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--solvers", default="dpm++2m,ddim,unipc2")
    args = ap.parse_args(argv)
    den, _ = presets.pretrained("digits")
    labels = (np.arange(args.num) % 10).astype(np.int32)
    rows = []
    for name in args.solvers.split(","):
        solver = S.get(name)
        t0 = time.perf_counter()
        jdiff.generate(solver, den, args.num, (8, 8, 1), nfe=args.nfe, cond=labels)
        first = time.perf_counter() - t0
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            jdiff.generate(solver, den, args.num, (8, 8, 1), nfe=args.nfe, cond=labels)
            ts.append(time.perf_counter() - t0)
        sec = sorted(ts)[1]
        rows.append(
            [solver.name, args.nfe, args.num, f"{args.num / sec:.0f}", f"{1e3 * sec / args.nfe:.1f}", f"{first:.1f}"]
        )
    print(f"# {machine()}; {today()}")
    print(table(rows, ["solver", "NFE", "batch", "samples/s", "ms per step", "first call s (compile)"]))


if __name__ == "__main__":
    main()
