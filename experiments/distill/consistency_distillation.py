"""Consistency distillation of the shipped digits teacher, measured at 1, 2 and 4 steps.

    nice -n 10 python experiments/distill/consistency_distillation.py --steps 400 --budget 660
    # the other consistency recipes (rlcm from a saved student) with the same script:
    nice -n 10 python experiments/distill/consistency_distillation.py --method ect --steps 400
    nice -n 10 python experiments/distill/consistency_distillation.py --method rlcm \
        --student /tmp/cons/consistency_distillation.npz

Loads the digits teacher (``load_teacher("digits")``), builds the
``consistency_distillation`` recipe (DDIM teacher step by default), trains the student
with :func:`jdiff.train.train` for a fixed number of steps on the 1,797 digits (random
batches with their labels), saves the target (EMA) parameters as ``.npz`` under ``--out``,
then measures FD-digits against the held-out digits and the class accuracy of 1,000
class-conditional samples (labels cycling 0..9) at 1, 2 and 4 steps, as
``scripts/check_pretrained_digits.py`` does for the solvers. One table row per step count,
with the training wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiff.data
from jdiff import train as T
from jdiff.distill import METHODS, load_teacher
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance
from jdiff.runs._pretrained import flatten_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="consistency_distillation")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--solver", default="ddim", help="the teacher's step (consistency_distillation)")
    ap.add_argument("--num-scales", type=int, default=18)
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--student", default=None, help="rlcm: the consistency student's .npz")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/cons")
    ap.add_argument("--budget", type=float, default=0, help="stop training after this many seconds (0: none)")
    args = ap.parse_args(argv)

    teacher = load_teacher("digits")
    rec = METHODS[args.method]
    opts = {"solver": args.solver, "num_scales": args.num_scales, "ema": args.ema}
    if args.method in ("consistency_training", "ect"):
        opts = {"total_steps": args.steps}
    elif args.method == "rlcm":
        opts = {"student": args.student}
    setup = rec.build(teacher, **opts)
    x_all, y_all = jdiff.data.digits()
    rng = np.random.default_rng(args.seed)

    def data(step):
        idx = rng.integers(0, len(x_all), args.batch)
        return {"x": x_all[idx], "label": y_all[idx]}

    opt = T.make_optimizer(
        args.lr, warmup_steps=min(20, args.steps // 10), total_steps=args.steps, final_lr=args.lr / 10
    )
    ema = setup.notes.get("ema_decay")
    t0 = time.perf_counter()

    def budget(step, metrics, state):
        return bool(args.budget) and time.perf_counter() - t0 > args.budget

    res = T.train(
        setup.loss_fn,
        setup.params,
        data,
        args.steps,
        optimizer=opt,
        frozen=setup.frozen,
        ema_decay=ema,
        seed=args.seed,
        log_every=25,
        handle_sigterm=False,
        callbacks=[budget],
    )
    wall = time.perf_counter() - t0
    params = res.state.ema_params if ema is not None else res.state.params
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.method}.npz")
    np.savez(path, **{k: np.asarray(v) for k, v in flatten_params(jax.device_get(params)).items()})
    print(f"trained {res.step} of {args.steps} steps (batch {args.batch}) in {wall:.0f} s; saved {path}", flush=True)

    clf = F.digits_classifier()
    _, _, xte, _ = F.digits_split()
    ref_te = clf.stats(xte)
    labels = np.arange(args.num, dtype=np.int32) % 10
    noise = jax.random.normal(jax.random.key(args.seed), (args.num, *teacher.shape))
    print("| method | steps (NFE) | FD-digits (held-out) | accuracy | train wall (s) | sample wall (s) |")
    print("|---|---|---|---|---|---|")
    for steps in (1, 2, 4):
        if steps > setup.steps:
            continue
        t1 = time.perf_counter()
        xs = []
        for s in range(0, args.num, 250):
            x = rec.sample(
                teacher,
                params,
                noise[s : s + 250],
                steps=steps,
                trained_steps=setup.steps,
                cond=jnp.asarray(labels[s : s + 250]),
                key=jax.random.fold_in(jax.random.key(args.seed + 1), s),
            )
            xs.append(np.asarray(x))
        x = np.concatenate(xs)
        dt = time.perf_counter() - t1
        fd = frechet_distance(*clf.stats(x), *ref_te)
        print(
            f"| {args.method} ({args.solver if args.method == 'consistency_distillation' else ''}) | {steps} "
            f"| {fd:.3f} | {clf.accuracy(x, labels):.4f} | {wall:.0f} | {dt:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
