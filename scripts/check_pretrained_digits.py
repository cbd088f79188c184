"""Measure the shipped digits denoiser with the FD-digits classifier.

    python scripts/check_pretrained_digits.py                 # 1000 samples, dpm++2m, NFE 10 and 50
    python scripts/check_pretrained_digits.py --path DIR      # a folder written by export_pretrained instead
    python scripts/check_pretrained_digits.py --name digits_dit --flops   # another shipped model; FLOPs per call

For each NFE: class-conditional samples (labels cycling 0..9, guidance 1 unless
``--guidance``), the classifier's accuracy on the requested labels, and FD-digits
against the held-out real digits (450) and against the training split (1347). For
scale, the same numbers for real held-out digits are printed first. ``--flops``: the
model FLOPs of one network call on a batch of ``--num`` (XLA's cost analysis of the
compiled call, guidance 1).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import presets
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance


def call_flops(name: str, batch: int, *, path=None) -> float:
    """Model FLOPs of one conditional network call on ``batch`` examples (XLA's cost
    analysis of the compiled call)."""
    den, cfg = presets.pretrained(name, path=path)
    x = jnp.zeros((batch, *cfg.data.shape), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    c = jnp.zeros((batch,), jnp.int32)
    cost = jax.jit(den.apply_fn).lower(den.params, x, t, c).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solver", default="dpm++2m")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="digits", choices=sorted(presets.PRETRAINED), help="the shipped model")
    ap.add_argument("--path", default=None, help="a folder written by jdiff.presets.export_pretrained")
    ap.add_argument("--flops", action="store_true", help="print the model FLOPs of one call on --num samples")
    args = ap.parse_args(argv)

    clf = F.digits_classifier()
    xtr, _, xte, yte = F.digits_split()
    ref_te, ref_tr = clf.stats(xte), clf.stats(xtr)
    fd_real = frechet_distance(*ref_te, *ref_tr)
    print(f"real held-out: accuracy {clf.accuracy(xte, yte):.4f}, FD-digits vs train {fd_real:.3f}")
    den, cfg = presets.pretrained(args.name, guidance=args.guidance, path=args.path)
    labels = np.arange(args.num, dtype=np.int32) % 10
    if args.flops:
        print(f"{args.name}: {call_flops(args.name, args.num, path=args.path):.4g} FLOPs per call (batch {args.num})")
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
