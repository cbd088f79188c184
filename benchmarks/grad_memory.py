"""Gradient memory and time through the sampler, for each gradient strategy.

For three denoisers (an MLP on vectors, the digits U-Net at 8x8x1, a U-Net at 32x32x3),
DPM-Solver++(2M) and NFE 10, 20, 50, 100, the gradient of ``mean(sample(x_T)^2)`` with
respect to ``x_T`` and the network's parameters is compiled for each strategy
(``Backprop``, ``Remat``, ``Adjoint``, ``Truncated(2)``) and its temporary memory is read
from ``jax.jit(grad).lower(...).compile().memory_analysis()`` (no execution needed). The
time per gradient is the median of a few calls after compilation (skipped for cells
above ``--time-budget`` seconds of estimated work).

    python benchmarks/grad_memory.py [--quick] [--out CSV]

The full run writes the tracked ``benchmarks/results/grad_memory.csv``; ``--quick`` (NFE
10 and 100 only) writes to the temporary directory unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, today, write_csv  # noqa: E402

import jdiff  # noqa: E402
from jdiff import solvers as S  # noqa: E402

NFES = (10, 20, 50, 100)
MiB = 1 << 20


def strategies():
    return {
        "Backprop": jdiff.Backprop(),
        "Remat": jdiff.Remat(),
        "Adjoint": jdiff.Adjoint(),
        "Truncated(2)": jdiff.Truncated(2),
    }


def mlp_case(process):
    """The MLP of the issue's measurement: batch 256 x 64, 4 hidden layers of 256."""
    dim, hidden, depth = 64, 256, 4
    ks = jax.random.split(jax.random.key(0), depth + 1)
    dims = [dim + 1] + [hidden] * depth + [dim]
    params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)) for k, a, b in zip(ks, dims[:-1], dims[1:])]

    def apply(params, x, t, cond):
        h = jnp.concatenate([x, jnp.broadcast_to(jnp.reshape(t, (-1, 1)), (x.shape[0], 1))], axis=1)
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.silu(h)
        return h

    den = jdiff.denoiser(apply, process, "eps", params=params)
    x = jdiff.prior_sample(process, jax.random.key(1), (256, dim))
    return den, x


def unet_case(process, image_size, channels, batch, **kw):
    from jdiff import models as M

    base = dict(
        image_size=image_size,
        in_channels=channels,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        head_channels=16,
        dropout=0.0,
        scale_shift=True,
        resblock_updown=True,
    )
    from flax import nnx

    model = M.UNet(M.UNetConfig(**(base | kw)), rngs=nnx.Rngs(0))
    apply, params = M.functional(model)
    den = jdiff.denoiser(apply, process, "eps", params=params)
    x = jdiff.prior_sample(process, jax.random.key(1), (batch, image_size, image_size, channels))
    return den, x


CASES = {
    "mlp 256x64": lambda p: mlp_case(p),
    "digits unet 8x8x1 (b=64)": lambda p: unet_case(p, 8, 1, 64),
    "unet 32x32x3 (b=8)": lambda p: unet_case(
        p, 32, 3, 8, base_channels=64, channel_mult=(1, 2, 2), attn_resolutions=(8,)
    ),
}


RAM_FRACTION = 0.5  # never run a gradient whose temporary buffers need more than this share of RAM


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=30.0,
        help="skip timing a cell above this many seconds (cells needing more than half the RAM are never run)",
    )
    ap.add_argument("--cases", default=None, help="comma-separated substrings of the model names to run (default: all)")
    ap.add_argument("--nfes", default=None, help="comma-separated NFEs (default: 10,20,50,100)")
    ap.add_argument("--strategies", default=None, help="comma-separated strategy names to run (default: all four)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per cell (median); 1: one run, no warm-up (slow cells)"
    )
    args = ap.parse_args(argv)
    cases = list(CASES)
    if args.cases:
        want = [c.strip() for c in args.cases.split(",") if c.strip()]
        cases = [c for c in cases if any(w in c for w in want)]
        if not cases:
            ap.error(f"--cases {args.cases!r} matches none of {list(CASES)}")
    nfes = (10, 100) if args.quick else NFES
    if args.nfes:
        try:
            nfes = tuple(int(n) for n in args.nfes.split(","))
        except ValueError:
            ap.error(f"--nfes must be comma-separated integers, got {args.nfes!r}")
    snames = list(strategies())
    if args.strategies:
        snames = [n.strip() for n in args.strategies.split(",") if n.strip()]
        if not snames or any(n not in strategies() for n in snames):
            ap.error(f"--strategies {args.strategies!r}: choose from {list(strategies())}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    out = args.out or (
        os.path.join(tempfile.gettempdir(), "grad_memory.csv")
        if args.quick
        else os.path.join(os.path.dirname(__file__), "results", "grad_memory.csv")
    )
    process = jdiff.vp_cosine()
    solver = S.get("dpm++2m")
    rows = []
    print(f"# gradient memory and time, {solver.name}; {machine()}; {today()}", flush=True)
    for case in cases:
        den, x = CASES[case](process)
        fwd_time = None
        for nfe in nfes:
            for sname in snames:
                strat = strategies()[sname]

                def loss(x, den, strat=strat, nfe=nfe):
                    return jnp.mean(jdiff.sample(solver, den, x, nfe=nfe, gradient=strat) ** 2)

                g = jax.jit(jax.grad(loss, argnums=(0, 1)))
                t0 = time.perf_counter()
                compiled = g.lower(x, den).compile()
                compile_s = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                temp = getattr(mem, "temp_size_in_bytes", float("nan")) / MiB
                ms = cpu = float("nan")
                first = None
                if fwd_time is None:
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(compiled(x, den))
                    first = time.perf_counter() - t0
                    first_cpu = time.process_time() - c0
                    fwd_time = first / nfe  # per step, first strategy's estimate
                if fwd_time * nfe * 2 <= args.time_budget and temp * MiB <= RAM_FRACTION * _ram_bytes():
                    if args.repeats > 1 and first is None:
                        jax.block_until_ready(compiled(x, den))
                    ts, cs = ([], []) if first is None or args.repeats > 1 else ([first], [first_cpu])
                    for _ in range(args.repeats - len(ts)):
                        t0, c0 = time.perf_counter(), time.process_time()
                        jax.block_until_ready(compiled(x, den))
                        ts.append(time.perf_counter() - t0)
                        cs.append(time.process_time() - c0)
                    ms = 1e3 * sorted(ts)[len(ts) // 2]
                    cpu = sorted(cs)[len(cs) // 2]
                row = dict(
                    model=case,
                    nfe=nfe,
                    strategy=sname,
                    temp_mib=round(temp, 2),
                    ms_per_grad=round(ms, 1),
                    cpu_s_per_grad=round(cpu, 2),
                    compile_s=round(compile_s, 1),
                )
                rows.append(row)
                print(
                    f"{case:28s} nfe {nfe:4d} {sname:13s} temp {temp:9.2f} MiB  {ms:10.1f} ms/grad"
                    f"  {cpu:8.2f} CPU s/grad",
                    flush=True,
                )
    header = ["model", "NFE", "strategy", "temp MiB", "ms / gradient", "CPU s / gradient", "compile s"]
    print()
    print(
        table(
            [
                [
                    r["model"],
                    r["nfe"],
                    r["strategy"],
                    r["temp_mib"],
                    r["ms_per_grad"],
                    r["cpu_s_per_grad"],
                    r["compile_s"],
                ]
                for r in rows
            ],
            header,
        )
    )
    # the growth of each strategy's memory from the smallest to the largest NFE
    print()
    for case in cases:
        for sname in snames:
            m = {r["nfe"]: r["temp_mib"] for r in rows if r["model"] == case and r["strategy"] == sname}
            lo, hi = m[min(m)], m[max(m)]
            print(f"{case:28s} {sname:13s} NFE {min(m)} -> {max(m)}: x{hi / lo:.3f}")
    write_csv(out, rows)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
