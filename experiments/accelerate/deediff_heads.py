"""Train DeeDiff exit heads for the digits DiT and measure early exit at NFE 20.

    nice -n 10 python experiments/accelerate/deediff_heads.py \
        --path /work/wt/models25/jdiff/assets/digits_dit --minutes 9

The DiT's parameters stay frozen (``frozen=`` on jdiff.train's seam); only the heads of
jdiff.accelerate.exit_heads learn, with jdiff.accelerate.exit_loss on the digits training
split (label dropout 0.1 as the model's own training, so the heads also see the null class).
Training stops after ``--steps`` or ``--minutes`` of wall time. Then, on ``--num``
class-conditional samples (labels cycling 0..9, guidance 1, dpm++2m at ``--nfe``): for each
threshold the blocks computed per network call, the mean L2 distance of each sample to the
plain sampler's (same noise), the digits classifier's accuracy and FD-digits against the
held-out digits (noisy at 200 samples: for scale only). The heads go to ``--out`` as
heads.npz with a RESULTS block printed for TRAINED.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdiff
from jdiff import accelerate as A
from jdiff import presets
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance
from jdiff.models import internals
from jdiff.train import train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="the digits DiT folder (default: pretrained('digits_dit'))")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--layer-weight", type=float, default=1.0)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--solver", default="dpm++2m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="jdiff/assets/digits_dit_exits")
    ap.add_argument("--heads", default=None, help="measure these saved heads (heads.npz) instead of training")
    args = ap.parse_args(argv)

    if args.path is None:
        den, cfg = presets.pretrained("digits_dit")
    else:
        den, cfg = presets.pretrained("digits", path=args.path)
    net = internals(den.apply_fn, den.params)
    xtr, ytr, xte, yte = F.digits_split()
    num_classes = 10
    heads = A.exit_heads(den, width=args.width, seed=args.seed)
    loss_fn = A.exit_loss(den, layer_weight=args.layer_weight, label_dropout=0.1, num_classes=num_classes)

    def data(step):
        idx = np.random.default_rng([args.seed, step]).integers(0, len(xtr), args.batch)
        return {"x": xtr[idx], "label": ytr[idx].astype(np.int32)}

    start = time.perf_counter()
    deadline = start + 60 * args.minutes
    log = []

    def cb(step, metrics, state):
        if step % 50 == 0 or step == 1:
            m = {k: float(v) for k, v in metrics.items()}
            log.append({"step": step, **m, "wall": time.perf_counter() - start})
            print(f"step {step}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(m.items())), flush=True)
        return time.perf_counter() > deadline

    if args.heads is None:
        sched = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05)
        result = train(
            loss_fn, heads, data, args.steps, optimizer=optax.adam(sched), callbacks=[cb], frozen=den.params,
            ema_decay=None, handle_sigterm=False,
        )  # fmt: skip
        heads, steps = jax.tree.map(np.asarray, result.state.params), result.step
        train_s = time.perf_counter() - start
        print(f"trained {steps} steps in {train_s:.0f} s", flush=True)
        os.makedirs(args.out, exist_ok=True)
        A.save_exit_heads(os.path.join(args.out, "heads.npz"), heads)
    else:
        heads, steps, train_s = A.load_exit_heads(args.heads), None, 0.0

    # held-out: each exit's RMS error against the full output and its mean uncertainty
    key = jax.random.key(args.seed + 1)
    x0 = xte[:256]
    t, _, xt = jdiff.train.noise_batch(den.process, x0, key)
    outs, u = jax.jit(A.exit_outputs, static_argnums=0)(net, den.params, heads, xt, den.model_time(t), yte[:256])
    rms = np.sqrt(np.mean(np.square(np.asarray(outs[:-1] - outs[-1])).reshape(len(u), len(x0), -1), axis=-1))
    per_exit = [
        {"block": i, "rms": float(rms[i].mean()), "tanh_rms": float(np.tanh(rms[i]).mean()), "u": float(u[i].mean()),
         "u_abs_err": float(np.abs(np.asarray(u[i]) - np.tanh(rms[i])).mean())}
        for i in range(len(u))
    ]  # fmt: skip
    for row in per_exit:
        print("held-out exit", row, flush=True)

    clf = F.digits_classifier()
    ref_te = clf.stats(xte)
    labels = jnp.asarray(np.arange(args.num) % num_classes, jnp.int32)
    x_T = jax.random.normal(jax.random.key(args.seed), (args.num,) + tuple(cfg.data.shape))
    solver = jdiff.solvers.get(args.solver)

    def measure(thr):
        m = A.early_exit(heads, thr)
        A.sample(m, solver, den, x_T[:10], nfe=args.nfe, cond=labels[:10], report=True)  # compile apart
        t0 = time.perf_counter()
        out, stats = A.sample(m, solver, den, x_T, nfe=args.nfe, cond=labels, report=True)
        out = jax.block_until_ready(out)
        return np.asarray(out), jax.tree.map(np.asarray, stats[0][0]), time.perf_counter() - t0

    jdiff.sample(solver, den, x_T[:10], nfe=args.nfe, cond=labels[:10])  # compile apart
    t0 = time.perf_counter()
    plain = np.asarray(jax.block_until_ready(jdiff.sample(solver, den, x_T, nfe=args.nfe, cond=labels)))
    plain_s = time.perf_counter() - t0
    rows = []
    for thr in [0.0] + list(args.thresholds):
        out, st, secs = measure(thr) if thr > 0 else (plain, None, plain_s)
        if st is None:
            st = {"calls": args.nfe, "blocks": args.nfe * net.depth, "full": args.nfe}
        s = clf.stats(out)
        row = {
            "threshold": thr,
            "blocks_per_call": float(st["blocks"]) / float(st["calls"]),
            "full_calls": int(st["full"]),
            "calls": int(st["calls"]),
            "exits": [int(v) for v in st.get("exits", [])],
            "l2_to_plain": float(np.mean(np.linalg.norm((out - plain).reshape(args.num, -1), axis=1))),
            "accuracy": float(clf.accuracy(out, np.asarray(labels))),
            "fd_heldout": float(frechet_distance(*s, *ref_te)),
            "seconds": secs,
        }
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "steps": steps, "train_s": train_s, "per_exit": per_exit,
                   "rows": rows, "log": log}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
