"""Measure the shipped digits denoiser with the FD-digits classifier.

    python scripts/check_pretrained_digits.py                 # 1000 samples, dpm++2m, NFE 10 and 50
    python scripts/check_pretrained_digits.py --run /tmp/r    # a run directory's EMA weights instead

For each NFE: class-conditional samples (labels cycling 0..9, guidance 1 unless
``--guidance``), the classifier's accuracy on the requested labels, and FD-digits
against the held-out real digits (450) and against the training split (1347). For
scale, the same numbers for real held-out digits are printed first.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import jdiff
from jdiff import presets
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solver", default="dpm++2m")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", default=None, help="a folder written by jdiff.presets.export_pretrained")
    args = ap.parse_args(argv)

    clf = F.digits_classifier()
    xtr, _, xte, yte = F.digits_split()
    ref_te, ref_tr = clf.stats(xte), clf.stats(xtr)
    fd_real = frechet_distance(*ref_te, *ref_tr)
    print(f"real held-out: accuracy {clf.accuracy(xte, yte):.4f}, FD-digits vs train {fd_real:.3f}")
    den, cfg = presets.pretrained("digits", guidance=args.guidance, path=args.path)
    labels = np.arange(args.num, dtype=np.int32) % 10
    solver = jdiff.solvers.get(args.solver)
    for nfe in args.nfe:
        t0 = time.perf_counter()
        x = jdiff.generate(solver, den, args.num, cfg.data.shape, nfe=nfe, seed=args.seed, cond=labels)
        dt = time.perf_counter() - t0
        s = clf.stats(x)
        print(
            f"{args.solver} NFE {nfe:3d}, guidance {args.guidance:g}, {args.num} samples ({dt:.1f} s): "
            f"accuracy {clf.accuracy(x, labels):.4f}, FD-digits vs held-out {frechet_distance(*s, *ref_te):.3f}, "
            f"vs train {frechet_distance(*s, *ref_tr):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
