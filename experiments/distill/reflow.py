"""Reflow of the shipped digits teacher (Liu et al. 2023): the teacher (VP cosine,
v-prediction) read as a 1-rectified flow, its pairs ``(z, ODE(z))`` (DPM-Solver++(2M),
``--pair-nfe``), and the 2-rectified flow trained on them from the teacher's weights;
sampled with Euler at 1, 2 and 4 steps. Optionally (``--distill-steps``) the one-step
distillation of that flow on its own pairs.

    nice -n 10 python experiments/distill/reflow.py [--steps 800] [--pairs 2048] [--pair-nfe 10]
"""

from __future__ import annotations

import argparse
import time

from jdiff._xla import prefer_fast_cpu_compile

prefer_fast_cpu_compile()  # before JAX starts

from _common import HEADER, evaluate, fit, save  # noqa: E402

from jdiff.distill import METHODS, load_teacher  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--pair-nfe", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--distill-steps", type=int, default=0)
    a = ap.parse_args()
    teacher = load_teacher("digits")
    rec = METHODS["reflow"]
    t0 = time.perf_counter()
    cache = f"/tmp/flow/pairs_teacher_{a.pairs}_{a.pair_nfe}.npz"
    setup = rec.build(teacher, num_pairs=a.pairs, pair_nfe=a.pair_nfe, pairs_path=cache)
    t_pairs = time.perf_counter() - t0
    print(f"pairs: {a.pairs} at NFE {a.pair_nfe} in {t_pairs:.0f} s; {setup.notes}", flush=True)
    params, wall = fit(setup, steps=a.steps, batch=a.batch, lr=a.lr)
    print("saved", save(params, "reflow"), flush=True)
    print(HEADER)
    evaluate(rec, teacher, params, (1, 2, 4), setup.steps, label=f"reflow (2-RF, {a.steps} steps)", wall=t_pairs + wall)
    if a.distill_steps:
        t0 = time.perf_counter()
        d = rec.build(teacher, stage="distill", flow=params, num_pairs=a.pairs, pair_nfe=a.pair_nfe)
        t_d = time.perf_counter() - t0
        dparams, dwall = fit(d, steps=a.distill_steps, batch=a.batch, lr=a.lr)
        save(dparams, "reflow_distill")
        evaluate(rec, teacher, dparams, (1,), d.steps, label="reflow + distill", wall=t_pairs + wall + t_d + dwall)


if __name__ == "__main__":
    main()
