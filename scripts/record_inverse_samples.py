"""Record the samples of every posterior sampler and every inversion for fixed keys
(tests/recorded_inverse_cases.py) into tests/data/inverse_samples.npz.

Run once from the repository root, with the code whose values are to be kept (under
the test suite's compiler settings, which the script sets):

    PYTHONPATH=. python scripts/record_inverse_samples.py

tests/test_posterior_engine.py then checks that later code gives the same values (a
subset); ``--check [filter]`` compares every recorded case with the current code and
prints each one's largest difference in units of the dtype's epsilon times the
case's largest magnitude.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# The test suite's compiler settings (tests/conftest.py): XLA's optimizations may
# reassociate floating-point sums, so values are recorded and compared under the same ones.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
from _train_worker import prefer_fast_test_compile  # noqa: E402  (a test helper, as below)

prefer_fast_test_compile()

import numpy as np  # noqa: E402
import recorded_inverse_cases as cases  # noqa: E402  (a test helper, found through the path above)


def check(filt=""):
    path = os.path.join(ROOT, "tests", "data", "inverse_samples.npz")
    with np.load(path) as f:
        ref = dict(f)
    worst = 0.0
    for prefix, x64, dtype in cases.all_cases():
        for which in ("posterior", "inversion"):
            got = cases.run(prefix, x64, dtype, (which,), filt)
            for k, a in got.items():
                r = ref[k]
                ulps = float(np.max(np.abs(a - r))) / (np.finfo(r.dtype).eps * max(1.0, float(np.max(np.abs(r)))))
                worst = max(worst, ulps)
                print(f"{k:60s} {ulps:10.1f} eps", flush=True)
    print(f"largest: {worst:.1f} eps")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        return check(sys.argv[2] if len(sys.argv) > 2 else "")
    out = {}
    for prefix, x64, dtype in cases.all_cases():
        out |= cases.run(prefix, x64, dtype)
    path = os.path.join(ROOT, "tests", "data", "inverse_samples.npz")
    np.savez_compressed(path, **out)
    print(f"{len(out)} arrays, {os.path.getsize(path)} bytes -> {path}")


if __name__ == "__main__":
    main()
