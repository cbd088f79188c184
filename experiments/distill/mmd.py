"""MMD-DDM (Aiello et al. 2023) fine-tuning of the shipped digits model.

    nice -n 10 python experiments/distill/mmd.py --steps 2 --train-steps 150 --batch 128

The network is fine-tuned so that its deterministic DDIM samples with --steps steps
match the data by the unbiased MMD of the FD-digits classifier's features (gradient
through the whole sampling chain, jdiff.Remat), trained with jdiff.train.train. The
student is saved under --out and measured at its step counts (FD-digits on 1,000 samples
against the held-out digits, class accuracy); --baseline measures the teacher's DDIM at
the same steps first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _prog_common as C  # noqa: E402

from jdiff.distill import METHODS  # noqa: E402
from jdiff.train import make_optimizer, train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--kernel", default="rbf")
    ap.add_argument("--features", default="digits")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/prog/mmd")
    args = ap.parse_args(argv)

    recipe = METHODS["mmd"]
    teacher, x, labels = C.teacher_and_data()
    ev = C.Evaluator(args.num)
    steps = sorted({args.steps, 1}, reverse=True)
    print(C.HEADER, flush=True)
    if args.baseline:
        for s in steps:
            ev.row(
                "teacher DDIM",
                s,
                lambda z, y, n: recipe.sample(teacher, teacher.params, z, steps=n, trained_steps=n, cond=y),
            )
    setup = recipe.build(teacher, steps=args.steps, kernel=args.kernel, features=args.features)
    t0 = time.perf_counter()
    res = train(
        setup.loss_fn,
        setup.params,
        C.batches(x, labels, args.batch),
        args.train_steps,
        optimizer=make_optimizer(args.lr, clip_norm=1.0),
        frozen=setup.frozen,
        ema_decay=None,
        log_every=25,
        handle_sigterm=False,
    )
    train_s = time.perf_counter() - t0
    params = res.state.params
    C.save(params, os.path.join(args.out, f"student_{args.steps}.npz"))
    for s in steps:
        ev.row(
            f"mmd ({args.kernel}, {args.features})",
            s,
            lambda z, y, n: recipe.sample(teacher, params, z, steps=n, trained_steps=args.steps, cond=y),
            train_s,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
