"""Progressive distillation (Salimans & Ho 2022) of the shipped digits model.

    nice -n 10 python experiments/distill/progressive.py --start 8 --rounds 3 --steps-per-round 100

Round k distills start/2^k DDIM steps of its teacher into start/2^(k+1) steps of its
student (jdiff.distill.progressive_rounds, trained with jdiff.train.train); after every
round the student is saved under --out and measured (FD-digits on 1,000 samples against
the held-out digits, class accuracy; scripts/check_pretrained_digits.py's protocol). With
--baseline the teacher's own DDIM at the same step counts is measured first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _prog_common as C  # noqa: E402

from jdiff.distill import METHODS, progressive_rounds  # noqa: E402
from jdiff.train import make_optimizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--num", type=int, default=1000, help="samples per FD-digits row")
    ap.add_argument("--out", default="/tmp/prog/progressive")
    args = ap.parse_args(argv)

    recipe = METHODS["progressive"]
    teacher, x, labels = C.teacher_and_data()
    ev = C.Evaluator(args.num)
    print(C.HEADER, flush=True)
    if args.baseline:
        for k in range(args.rounds + 1):
            n = args.start >> k
            ev.row(
                "teacher DDIM",
                n,
                lambda z, y, s: recipe.sample(teacher, teacher.params, z, steps=s, trained_steps=s, cond=y),
            )
    t0 = time.perf_counter()
    not_training = [0.0]  # seconds spent measuring between rounds

    def on_round(r):
        t1 = time.perf_counter()
        C.save(r.params, os.path.join(args.out, f"student_{r.steps}.npz"))
        ev.row(
            "progressive",
            r.steps,
            lambda z, y, s: recipe.sample(teacher, r.params, z, steps=s, trained_steps=r.steps, cond=y),
            t1 - t0 - not_training[0],
        )
        not_training[0] += time.perf_counter() - t1

    progressive_rounds(
        teacher,
        C.batches(x, labels, args.batch),
        steps_per_round=args.steps_per_round,
        optimizer=make_optimizer(args.lr, warmup_steps=10, clip_norm=1.0),
        start_steps=args.start,
        rounds=args.rounds,
        on_round=on_round,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
