"""Helpers shared by the benchmark scripts: timing, machine description, output."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import time

import jax


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devs = jax.devices()
    return (
        f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on {devs[0].platform} "
        f"({len(devs)} device{'s' if len(devs) > 1 else ''})"
    )


def today() -> str:
    return datetime.date.today().isoformat()


def timeit(fn, *args, repeat: int = 7, min_time: float = 0.2) -> float:
    """Median wall time of ``fn(*args)`` (blocking on the result) in seconds."""
    jax.block_until_ready(fn(*args))
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        if dt >= min_time / repeat or n >= 1 << 12:
            break
        n *= 2
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) / n)
    times.sort()
    return times[len(times) // 2]


def time_pair(f, g, args_f, args_g, *, repeat: int = 9, min_time: float = 0.3):
    """Interleaved timing of two functions; returns the minimum per-call time of each.

    Interleaving exposes both to the same machine load, and the minimum over repeats is
    the least noisy estimate of the intrinsic cost on a shared machine."""
    jax.block_until_ready(f(*args_f))
    jax.block_until_ready(g(*args_g))

    def calls_for(fn, args):
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(fn(*args))
            if time.perf_counter() - t0 >= min_time / repeat or n >= 1 << 12:
                return n
            n *= 2

    nf, ng = calls_for(f, args_f), calls_for(g, args_g)
    tf, tg = [], []
    for _ in range(repeat):
        for fn, args, n, out in ((f, args_f, nf, tf), (g, args_g, ng, tg)):
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(fn(*args))
            out.append((time.perf_counter() - t0) / n)
    return min(tf), min(tg)


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def table(rows: list[list], header: list[str]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )
