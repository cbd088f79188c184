"""benchmarks/accelerate.py's bookkeeping (no sampling): row selection, the counts a
carried method reports, the table and the issue's checks."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def B():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "accelerate.py")
    spec = importlib.util.spec_from_file_location("bench_accelerate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_rows_and_stats(B):
    assert "dev-count" not in [r.name for r in B.select_rows("all")]
    assert [r.name for r in B.select_rows("all,dev")][-2:] == ["dev-count", "dev-reuse2"]
    assert {r.family for r in B.select_rows("stitch,guidance")} == {"stitch", "guidance"}
    with pytest.raises(SystemExit, match="unknown"):
        B.select_rows("no-such-method")
    # summed over networks and call sites; a per-sample array is averaged; absent -> None
    stats = [[{"calls": 10, "full": np.array([4, 6])}, {"calls": 10}], None]
    assert B._stat(stats, "calls") == 20 and B._stat(stats, "full") == 5 and B._stat(stats, "blocks") is None


def _row(B, method, family, speedup, d_fd, model="unet", nfe=50, calls=50.0, spread=None):
    r = {k: None for k in B.COLUMNS}
    r.update(model=model, nfe=nfe, method=method, family=family, speedup=speedup, ms_per_sample=1.0, calls=calls)
    r.update(mflop=100.0, flop_ratio=1.0, fd=0.25 + d_fd, d_fd=d_fd, fd_spread=spread, l2_to_plain=0.0, note="")
    return r


def test_table_and_checks(B):
    rows = [
        _row(B, "plain", "plain", 1.0, 0.0, spread=0.01),
        _row(B, "fast-bad", "cache", 3.0, 0.05),  # outside the spread: not counted
        _row(B, "fast-ok", "cache", 1.6, 0.008),
        _row(B, "plain", "plain", 1.0, 0.0, model="dit", spread=0.01),
        _row(B, "slow", "cache", 1.5, -0.01, model="dit"),
        _row(B, "plain", "plain", 1.0, 0.0, model="unet-cfg", nfe=20, calls=40.0, spread=0.01),
        _row(B, "ag", "guidance", 1.3, 0.0, model="unet-cfg", nfe=20, calls=30.0),
        B._skip_row("dit", 50, "deediff", "exit", "jdiff.accelerate.early_exit is not on this branch"),
        B._skip_row("dit", 20, "deediff", "exit", "jdiff.accelerate.early_exit is not on this branch"),
    ]
    lines = B.checks(rows)
    assert lines[0].startswith("dit, NFE 50: best caching method within the spread: slow 1.50x")
    assert lines[0].endswith("NO")  # 1.5x < 2x
    assert "fast-ok 1.60x" in lines[1] and lines[1].endswith("yes")
    assert lines[2].startswith("adaptive guidance, ag, NFE 20: 25% fewer calls") and lines[2].endswith("yes")
    text = B.markdown(rows)
    assert "0.2500 +- 0.0100" in text and "3.00x" in text and text.count("deediff") == 1
    assert "- deediff (dit NFE 50, 20): jdiff.accelerate.early_exit is not on this branch" in text
