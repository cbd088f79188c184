"""Guided distillation (Meng et al. 2023) of the shipped digits model.

    nice -n 10 python experiments/distill/guided.py --match-steps 100 --start 8 --rounds 2 --steps-per-round 80

Stage one: a guidance-scale-conditioned student matches the classifier-free-guided
teacher at w uniform in [w_min, w_max]; stage two: progressive rounds of it
(jdiff.distill.guided_distill, trained with jdiff.train.train). Every student is saved
under --out and measured at guidance 1 and 2 (FD-digits on 1,000 samples against the
held-out digits, class accuracy). --baseline first measures the guided teacher's DDIM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _prog_common as C  # noqa: E402

from jdiff.distill import METHODS, guided_distill  # noqa: E402
from jdiff.distill._progressive import ddim_student_sample  # noqa: E402
from jdiff.train import make_optimizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match-steps", type=int, default=100)
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps-per-round", type=int, default=80)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--w-min", type=float, default=1.0)
    ap.add_argument("--w-max", type=float, default=3.0)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/prog/guided")
    args = ap.parse_args(argv)

    recipe = METHODS["guided"]
    teacher, x, labels = C.teacher_and_data()
    ev = C.Evaluator(args.num)
    print(C.HEADER, flush=True)
    if args.baseline:
        for w in args.scales:
            den = teacher.denoiser(guidance=w)
            ev.row(
                f"teacher DDIM, guidance {w:g} ({1 if w == 1 else 2} calls/step)",
                args.start,
                lambda z, y, s: ddim_student_sample(den, z, steps=s, trained_steps=s, cond=y),
            )
    t0 = time.perf_counter()
    not_training = [0.0]

    def measure(name, params, steps):
        t1 = time.perf_counter()
        C.save(params, os.path.join(args.out, f"{name.split()[0]}_{steps}.npz"))
        for w in args.scales:
            ev.row(
                f"{name}, guidance {w:g}",
                steps,
                lambda z, y, s: recipe.sample(teacher, params, z, steps=s, trained_steps=steps, cond=y, guidance=w),
                t1 - t0 - not_training[0],
            )
        not_training[0] += time.perf_counter() - t1

    guided_distill(
        teacher,
        C.batches(x, labels, args.batch),
        match_steps=args.match_steps,
        steps_per_round=args.steps_per_round,
        optimizer=make_optimizer(args.lr, warmup_steps=10, clip_norm=1.0),
        start_steps=args.start,
        rounds=args.rounds,
        w_min=args.w_min,
        w_max=args.w_max,
        on_match=lambda params: measure("guided-stage-one", params, args.start),
        on_round=lambda r: measure("guided-progressive", r.params, r.steps),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
