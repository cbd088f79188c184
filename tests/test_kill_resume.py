"""kill -9 a small ``jdiff train`` run at 6 random steps (several of them while an
asynchronous checkpoint is being written), resume it each time, and compare with an
uninterrupted run: the final parameters and every line of metrics.jsonl (less the
wall-clock fields) must be identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import _train_worker as W
import jax
import numpy as np
import pytest

STEPS = 40
SETTINGS = [
    "model.mlp.width=16",
    "model.mlp.num_blocks=1",
    "train.batch_size=32",
    "data.toy_size=256",
    "train.log_every=1",
    "train.checkpoint_every=2",  # frequent async saves: most kills land during a write
    "train.keep=2",
    "train.grid_every=0",
    "sample.num=16",
    "sample.nfe=2",
    "optim.warmup_steps=5",
]
WALL_CLOCK = ("wall_time", "steps_per_sec", "samples_per_sec")
SEED = 20261129


def _env(cache):
    # A persistent compilation cache makes each restart cheap (compilation dominates).
    return W.subprocess_env(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
    )


def _cmd(out, resume):
    base = [sys.executable, "-m", "jdiff.cli", "train", "--out", str(out), "--no-progress"]
    if resume:
        return base + ["--resume"]
    cmd = base + ["--preset", "toy2d", "--steps", str(STEPS)]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd


def _logged_step(path):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _has_checkpoint(out):
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def _final_state(out):
    from jdiff import cli

    _, _, _, state, step = cli.load_run_state(str(out))
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.slow
def test_kill9_at_random_steps_then_resume_is_identical(tmp_path):
    env = _env(tmp_path / "jax_cache")
    ref, run = tmp_path / "ref", tmp_path / "run"
    t0 = time.time()
    # The uninterrupted reference runs alongside the killed runs (its own directory; the
    # compilation cache is shared, and entries are written atomically).
    ref_proc = subprocess.Popen(_cmd(ref, False), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    targets = sorted(random.Random(SEED).sample(range(2, STEPS - 1), 6))
    killed = []  # (target step, last step logged when the kill was sent, newest checkpoint after it)
    mpath = os.path.join(run, "metrics.jsonl")
    for target in targets:
        if _logged_step(mpath) >= target:
            continue  # the previous kill landed past this one
        proc = subprocess.Popen(
            _cmd(run, _has_checkpoint(run)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 240
        while proc.poll() is None and _logged_step(mpath) < target and time.time() < deadline:
            time.sleep(0.002)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate(timeout=60)[0]
        assert alive, f"the run ended before step {target}:\n{log[-3000:]}"
        ckpts = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
        killed.append((target, _logged_step(mpath), ckpts[-1] if ckpts else None))
    print("kill -9 (target step, last logged step, newest checkpoint):", killed)
    assert len(killed) >= 4, killed

    r = subprocess.run(_cmd(run, True), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ref_log = ref_proc.communicate(timeout=300)[0]
    assert ref_proc.returncode == 0, ref_log[-4000:]
    print(f"kill-and-resume test: {time.time() - t0:.1f} s")

    got, want = _metrics(run), _metrics(ref)
    assert [m["step"] for m in want] == list(range(1, STEPS + 1))
    assert [m["step"] for m in got] == [m["step"] for m in want], f"kills {killed}"
    for a, b in zip(got, want, strict=True):
        assert a == b, f"kills {killed}: metrics differ at step {b['step']}: {a} vs {b}"
    step_a, state_a = _final_state(run)
    step_b, state_b = _final_state(ref)
    assert step_a == step_b == STEPS
    assert state_a.keys() == state_b.keys()
    for k in state_b:
        np.testing.assert_array_equal(state_a[k], state_b[k], err_msg=f"{k} (kills {killed})")
