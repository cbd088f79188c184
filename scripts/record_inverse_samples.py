"""Record the samples of every posterior sampler and every inversion for fixed keys
(tests/recorded_inverse_cases.py) into tests/data/inverse_samples.npz.

Run once from the repository root, with the code whose values are to be kept:

    PYTHONPATH=. python scripts/record_inverse_samples.py

tests/test_inverse_recorded.py then checks that later code gives the same values.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import recorded_inverse_cases as cases  # noqa: E402  (a test helper, found through the path above)


def main():
    out = {}
    for prefix, x64, dtype in cases.all_cases():
        out |= cases.run(prefix, x64, dtype)
    path = os.path.join(ROOT, "tests", "data", "inverse_samples.npz")
    np.savez_compressed(path, **out)
    print(f"{len(out)} arrays, {os.path.getsize(path)} bytes -> {path}")


if __name__ == "__main__":
    main()
