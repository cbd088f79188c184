"""Score distillation of the shipped digits teacher into a one-step generator
(SwiftBrush / variational score distillation): generator and auxiliary score network
both started from the teacher, trained together by one optimizer (Adam without
momentum, the two networks playing a game); no training images read.

    nice -n 10 python experiments/distill/score_distillation.py [--steps 400]
"""

from __future__ import annotations

import argparse

from jdiff._xla import prefer_fast_cpu_compile

prefer_fast_cpu_compile()  # before JAX starts

from _common import HEADER, evaluate, fit, save  # noqa: E402

from jdiff.distill import METHODS, load_teacher  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--guidance", type=float, default=1.0)
    a = ap.parse_args()
    teacher = load_teacher("digits")
    rec = METHODS["score_distillation"]
    setup = rec.build(teacher, guidance=a.guidance)
    params, wall = fit(setup, steps=a.steps, batch=a.batch, lr=a.lr, b1=0.0)
    print("saved", save(params["generator"], "score_distillation"), flush=True)
    print(HEADER)
    evaluate(rec, teacher, params, (1,), setup.steps, label=f"score distillation ({a.steps} steps)", wall=wall)


if __name__ == "__main__":
    main()
