"""One writer per run directory (issue 28, point 1): ``jdiff train`` holds an OS lock on
``<run>/.lock``; a second writer refuses at once in one line naming the holder's process
id, the holder's run is exactly that of a run alone, and a lock whose holder was killed
with SIGKILL is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import _train_worker as W
import jax
import numpy as np
import pytest

from jdiff import runs
from jdiff import train as T

STEPS = 60
SETTINGS = W.toy_run_settings()


def _cmd(out, steps=STEPS):
    cmd = [sys.executable, "-m", "jdiff", "train", "toy2d", "--out", str(out), "--no-progress", "--steps", str(steps)]
    return cmd + sum((["--set", s] for s in SETTINGS), [])


def _wait_for_holder(proc, out, timeout=240):
    """Wait until ``proc`` has taken the lock of ``out`` (its pid is in the lock file)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if runs.lock_holder(out) == proc.pid:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {proc.pid} never took the lock of {out} (exit {proc.poll()})")


def _history(out):
    # time differs between runs, argv by the --out directory
    return [{k: v for k, v in e.items() if k not in ("time", "argv")} for e in T.read_history(out)]


def _final_state(out):
    _, _, _, state, step = runs.load_run_state(str(out))
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_the_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    d = tmp_path / "run"
    with runs.lock_run(d) as held:
        assert held.held and runs.lock_holder(d) == os.getpid()
        # flock locks belong to an open file, so a second lock in this process is refused too
        with pytest.raises(runs.RunLockedError) as info:
            runs.lock_run(d)
        assert info.value.pid == os.getpid() and str(d) in str(info.value)
        assert f"process {os.getpid()} is writing this run" in str(info.value)
        assert "\n" not in str(info.value)
    with runs.lock_run(d):  # released: free again
        pass
    assert os.path.exists(d / runs.LOCK_FILE)  # the file stays; only the OS lock goes


@pytest.mark.slow
def test_a_second_writer_refuses_at_once_and_the_first_is_a_run_alone(tmp_path):
    env = W.cached_env(tmp_path / "jax_cache")
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    # The run alone trains alongside (its own directory; the compilation cache is shared).
    ref = subprocess.Popen(_cmd(alone), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.Popen(_cmd(shared), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_holder(first, shared)
    second = subprocess.run(_cmd(shared), env=env, capture_output=True, text=True, timeout=300)
    # "at once": the refusal did not wait for the holder, which is still training
    holder_running = first.poll() is None
    first_log = first.communicate(timeout=300)[0]
    ref_log = ref.communicate(timeout=300)[0]
    assert first.returncode == 0, first_log[-3000:]
    assert ref.returncode == 0, ref_log[-3000:]

    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and second.stdout == "", (second.stdout, second.stderr)
    assert len(err) == 1 and f"process {first.pid} is writing this run" in err[0], err
    assert err[0].startswith("jdiff train: error: ") and "Traceback" not in second.stderr
    assert holder_running

    assert W.metrics_rows(shared) == W.metrics_rows(alone)
    assert _history(shared) == _history(alone)
    assert [e["event"] for e in _history(shared)] == ["started", "finished"]
    assert sorted(os.listdir(shared / "checkpoints")) == sorted(os.listdir(alone / "checkpoints")) == ["50", "60"]
    (s_step, s_state), (a_step, a_state) = _final_state(shared), _final_state(alone)
    assert s_step == a_step == STEPS and s_state.keys() == a_state.keys()
    for k in s_state:
        np.testing.assert_array_equal(s_state[k], a_state[k], err_msg=k)


@pytest.mark.slow
def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    env = W.cached_env(tmp_path / "jax_cache")
    out = tmp_path / "run"
    holder = subprocess.Popen(
        _cmd(out, steps=100000), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for_holder(holder, out)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert runs.lock_holder(out) == holder.pid  # the file still names it: only the OS lock went
    t0 = time.time()
    with runs.lock_run(out):
        assert time.time() - t0 < 1.0 and runs.lock_holder(out) == os.getpid()
    # and a new command takes it (writes its own pid) and finishes
    new = subprocess.Popen(_cmd(out, steps=3), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = new.communicate(timeout=300)[0]
    assert new.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert runs.lock_holder(out) == new.pid
