"""Features per second of jdiff's FID InceptionV3 on this machine (after compilation).

    python scripts/bench_inception_features.py [--batch 16] [--size 32] [--batches 4]

Pseudo-random weights (the speed does not depend on the values); uint8 NHWC inputs of
``size x size`` resized to 299x299 inside the network, as in FID evaluation. Prints the
compile time, the steady-state images (= feature vectors) per second, the CPU time per
image, the machine and the load average while it ran (images per second are only
meaningful on an otherwise idle machine; CPU time per image much less depends on load).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from jdiff.features import InceptionV3, inception_features


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="input height = width before the 299 resize")
    ap.add_argument("--batches", type=int, default=4, help="timed batches after the compiling one")
    args = ap.parse_args()
    model = InceptionV3(seed=0)
    x = np.random.default_rng(0).integers(0, 256, (args.batch * args.batches, args.size, args.size, 3), np.uint8)
    t0 = time.perf_counter()
    inception_features(model, x[: args.batch], batch_size=args.batch)
    compile_s = time.perf_counter() - t0
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    f = inception_features(model, x, batch_size=args.batch)
    dt, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    assert f.shape == (len(x), 2048) and np.all(np.isfinite(f))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"InceptionV3 features: {len(x) / dt:.2f} images/s (batch {args.batch}, {args.size}x{args.size} uint8 -> 299, "
        f"{len(x)} images in {dt:.1f} s; first batch incl. compile {compile_s:.1f} s); "
        f"{cpu_s / len(x):.2f} CPU-seconds per image (all threads; on a shared machine, "
        f"{os.cpu_count()} / that is the idle-machine rate if the threads scale)\n"
        f"machine: {cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.device_count()} device), load average {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
