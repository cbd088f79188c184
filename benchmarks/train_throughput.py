"""Training throughput of the ``jdiff train`` presets on this machine.

For each preset the model, objective, optimizer and data loader are built exactly as
``jdiff train`` builds them (``jdiff.cli``), then:

- compile time: ``lower`` + ``compile`` of the jitted train step (the first step of a
  run pays this once);
- steps/s and samples/s: after a few warm-up steps, the median over ``--repeats``
  timed windows of ``--window`` steps, each step fed a fresh batch from the
  :class:`jdiff.data.Loader` as in the training loop (the state is donated, as in
  the loop; EMA and gradient clipping included). samples/s = steps/s x batch size.

    PYTHONPATH=. python benchmarks/train_throughput.py [--presets digits toy2d] [--quick]

Prints a markdown table and writes ``benchmarks/results/train_throughput.csv`` (``--quick``: a
file in the temporary directory).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, today, write_csv  # noqa: E402

from jdiff import cli  # noqa: E402
from jdiff import data as D  # noqa: E402
from jdiff import models as M  # noqa: E402
from jdiff import presets as P  # noqa: E402
from jdiff import train as T  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput.csv")


def measure(name: str, *, window: int = 0, repeats: int = 5, warmup: int = 3, target_s: float = 5.0) -> dict:
    cfg = P.get_preset(name)
    run = cli.build_run(cfg)
    arrays = {"x": run.x} if run.labels is None else {"x": run.x, "label": run.labels}
    loader = D.Loader(arrays, cfg.train.batch_size, cfg.data.shuffle_seed)
    mesh = T.make_mesh()
    cfg = run.cfg  # data-derived fields filled
    loss_fn = T.make_loss_fn(run.apply, cfg.objective)
    tx, sched = cfg.optim.build(cfg.train.steps)
    step = T.make_train_step(
        loss_fn,
        tx,
        mesh=mesh,
        accum_steps=cfg.optim.accum_steps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.warmup,
        schedule=sched,
    )
    state = T.replicate(T.init_train_state(run.params, tx, cfg.train.seed, ema=cfg.ema.decay is not None), mesh)
    batch = T.shard_batch(next(loader), mesh)

    t0 = time.perf_counter()
    step.jitted.lower(state, batch, T.state_key(state)).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(warmup):  # first call also fills jit's own cache for this signature
        state, m = step(state, next(loader))
    jax.block_until_ready(m)
    if not window:  # size the windows from a short probe: about target_s seconds each
        t0 = time.perf_counter()
        for _ in range(2):
            state, m = step(state, next(loader))
        jax.block_until_ready(m)
        window = max(2, int(2 / (time.perf_counter() - t0) * target_s))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(window):
            state, m = step(state, next(loader))
        jax.block_until_ready(m)
        rates.append(window / (time.perf_counter() - t0))
    rate = float(np.median(rates))
    return {
        "preset": name,
        "model": cfg.model.kind,
        "params": M.count_params(run.params),
        "data": "x".join(map(str, run.data_shape)),
        "batch": cfg.train.batch_size,
        "compile_s": round(compile_s, 2),
        "steps_per_s": round(rate, 2),
        "samples_per_s": round(rate * cfg.train.batch_size, 1),
        "steps_per_s_min": round(min(rates), 2),
        "steps_per_s_max": round(max(rates), 2),
        "window": window,
        "repeats": repeats,
        "loss_finite": bool(np.isfinite(float(m["loss"]))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=P.preset_names(), help="presets to measure")
    ap.add_argument("--window", type=int, default=0, help="steps per timed window (0: about 5 s per window)")
    ap.add_argument("--repeats", type=int, default=5, help="timed windows per preset")
    ap.add_argument("--quick", action="store_true", help="3 short windows")
    ap.add_argument(
        "--out",
        default=None,
        help="CSV path (default: benchmarks/results/train_throughput.csv for the full run, which is tracked; "
        "with --quick, train_throughput_quick.csv in the temporary directory, never the tracked file)",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "train_throughput_quick.csv") if args.quick else RESULTS
    repeats = 3 if args.quick else args.repeats
    rows = []
    print(f"# {machine()}, {today()}", flush=True)
    for name in args.presets:
        r = measure(name, window=args.window, repeats=repeats, target_s=1.0 if args.quick else 5.0)
        rows.append(r)
        print(
            f"{name}: {r['steps_per_s']} steps/s, {r['samples_per_s']} samples/s, compile {r['compile_s']} s",
            flush=True,
        )
    write_csv(args.out, rows)
    print()
    print(
        table(
            [
                [
                    r["preset"],
                    r["model"],
                    f"{r['params']:,}",
                    r["data"],
                    r["batch"],
                    r["compile_s"],
                    f"{r['steps_per_s']} ({r['steps_per_s_min']}-{r['steps_per_s_max']})",
                    r["samples_per_s"],
                ]
                for r in rows
            ],
            ["preset", "model", "params", "example", "batch", "compile (s)", "steps/s (min-max)", "samples/s"],
        )
    )
    print(f"\nCSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
