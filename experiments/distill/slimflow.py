"""SlimFlow on the shipped digits teacher (Zhu et al. 2024): annealing reflow of a
half-width U-Net (16 base channels, about a quarter of the teacher's parameters) from
random initialization on the teacher's pairs, then flow-guided distillation of that
small 2-rectified flow into one step on its own pairs.

    nice -n 10 python experiments/distill/slimflow.py [--steps 1200] [--distill-steps 400] [--pairs 2048]
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
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--anneal-steps", type=int, default=400)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=2048)
    ap.add_argument("--pair-nfe", type=int, default=10)
    ap.add_argument("--flow-pair-nfe", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16)
    a = ap.parse_args()
    teacher = load_teacher("digits")
    rec = METHODS["slimflow"]
    t0 = time.perf_counter()
    setup = rec.build(
        teacher,
        width=a.width,
        num_pairs=a.pairs,
        pair_nfe=a.pair_nfe,
        anneal_steps=a.anneal_steps,
        pairs_path=f"/tmp/flow/pairs_teacher_{a.pairs}_{a.pair_nfe}.npz",
    )
    t_pairs = time.perf_counter() - t0
    print(f"pairs: {a.pairs} at NFE {a.pair_nfe} in {t_pairs:.0f} s; {setup.notes}", flush=True)
    flow, wall = fit(setup, steps=a.steps, batch=a.batch, lr=a.lr)
    save(flow, "slimflow_reflow")
    print(HEADER)
    name = f"slimflow stage 1 (w{a.width} 2-RF)"
    evaluate(rec, teacher, flow, (1, 4), setup.steps, label=name, wall=t_pairs + wall)
    t0 = time.perf_counter()
    d = rec.build(
        teacher,
        stage="distill",
        flow=flow,
        width=a.width,
        num_pairs=a.pairs,
        pair_nfe=a.flow_pair_nfe,
        pair_solver="euler",
    )
    t_d = time.perf_counter() - t0
    print(f"distillation pairs from the small flow in {t_d:.0f} s", flush=True)
    params, dwall = fit(d, steps=a.distill_steps, batch=a.batch, lr=a.lr / 3)
    print("saved", save(params, "slimflow"), flush=True)
    total = t_pairs + wall + t_d + dwall
    evaluate(rec, teacher, params, (1,), d.steps, label=f"slimflow (w{a.width}, one step)", wall=total)


if __name__ == "__main__":
    main()
