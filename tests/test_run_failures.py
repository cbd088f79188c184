"""Runs that a full disk or a read-only folder cannot break (issue 28, points 5, 6, 8):
a failed checkpoint write is one line with exit status 1 and the previous checkpoint
resumes bit-identically; a folder that cannot take a checkpoint fails before training;
inputs that cannot make a run are refused; ``--resume`` before the first checkpoint says
how to start the run.

Disk full is simulated with a file-size limit (``RLIMIT_FSIZE`` in the child, SIGXFSZ
ignored so that writes fail with EFBIG as on a full disk). A read-only folder is
simulated with the immutable attribute (``chattr +i``): the tests run as root, which
ignores permission bits but not that attribute (skipped where the file system or the
container does not support it)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys

import _train_worker as W
import jax
import numpy as np
import pytest

from jdiff import cli, runs
from jdiff import train as T

STEPS = 20
SETTINGS = W.toy_run_settings(width=64, warmup=2)  # width 64: a checkpoint of ~0.5 MB, over the file-size limit
FSIZE = 100_000  # bytes: the logs and config stay under it, a checkpoint's data file does not


def _train(out, env, *extra, fsize=None):
    cmd = [sys.executable, "-m", "jdiff", "train", "--out", str(out), "--no-progress", *map(str, extra)]
    if "--resume" not in extra:
        cmd += ["toy2d", "--steps", str(STEPS)] + sum((["--set", s] for s in SETTINGS), [])

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit if fsize else None
    )


def _final_state(out):
    _, _, _, state, step = runs.load_run_state(str(out))
    return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def _assert_same_run(out, ref):
    assert W.metrics_rows(out) == W.metrics_rows(ref)
    (s1, a), (s2, b) = _final_state(out), _final_state(ref)
    assert s1 == s2 == STEPS and len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run stopped at its checkpoint of step 10, and the same run alone to step 20."""
    root = tmp_path_factory.mktemp("failures")
    env = W.cached_env(root / "jax_cache")
    ref = subprocess.Popen(
        [sys.executable, "-m", "jdiff", "train", "toy2d", "--out", str(root / "ref"), "--no-progress"]
        + ["--steps", str(STEPS)]
        + sum((["--set", s] for s in SETTINGS), []),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    r = _train(root / "base", env, "--stop-at", 10)
    assert r.returncode == 0, r.stderr[-3000:]
    log = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, log[-3000:]
    assert sorted(os.listdir(root / "base" / "checkpoints")) == ["10"]
    return root / "base", root / "ref", env


def _copy(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def _err_lines(r):
    return [line for line in r.stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes(base, tmp_path):
    src, ref, env = base
    run = _copy(src, tmp_path)
    r = _train(run, env, "--resume", fsize=FSIZE)
    err = _err_lines(r)
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(err) <= 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot write step 20 in" in err[-1] and "File too large" in err[-1], err
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["10"]
    # the next command resumes from step 10 and ends exactly as the run alone
    r = _train(run, env, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(run, ref)


def _immutable(path, on: bool) -> bool:
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_fails_before_training_and_resumes_afterwards(base, tmp_path):
    src, ref, env = base
    run = _copy(src, tmp_path)
    ckpt = run / "checkpoints"
    if shutil.which("chattr") is None or not _immutable(ckpt, True):
        pytest.skip("chattr +i is not available here (file system or container)")
    try:
        before = W.metrics_rows(run)
        r = _train(run, env, "--resume")
        err = _err_lines(r)
        assert r.returncode == 1 and len(err) <= 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"cannot write to the checkpoint folder {ckpt}" in err[-1], err
        assert W.metrics_rows(run) == before  # it failed before the first step
    finally:
        _immutable(ckpt, False)
    # A step without orbax's _CHECKPOINT_METADATA still restores, and deleting it later
    # (keep=1) leaks no absl warning lines.
    os.remove(ckpt / "10" / "_CHECKPOINT_METADATA")
    r = _train(run, env, "--resume", "--set", "train.keep=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "absl" not in r.stderr and "WARNING" not in r.stderr, r.stderr[-3000:]
    assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["20"]
    _assert_same_run(run, ref)


def test_an_out_that_cannot_be_created_is_one_line(tmp_path, capfd):
    out = "/proc/jdiff-no-such-folder/run"  # /proc takes no new folders, not even from root
    code = cli.main(["train", "toy2d", "--out", out, "--no-progress", "--steps", "2"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"jdiff train: error: cannot create run directory {out}: "), err


def test_checkpoint_write_error_is_an_os_error_naming_the_step_and_folder(tmp_path):
    e = T.CheckpointWriteError(28, f"cannot write step 30 in {tmp_path}: No space left on device", str(tmp_path))
    assert isinstance(e, OSError) and e.errno == 28 and e.filename == str(tmp_path)
    assert str(e) == f"cannot write step 30 in {tmp_path}: No space left on device"


def test_empty_out_and_non_positive_sizes_are_refused(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "toy2d", "--out", ""]) == 2
    assert "jdiff train: error: --out is empty: give a directory name" in capfd.readouterr().err
    for key in ("model.mlp.num_blocks=0", "model.mlp.width=-4", "model.mlp.mlp_ratio=0"):
        assert cli.main(["train", "toy2d", "--out", "r", "--set", key]) == 2
        name, value = key.split("=")
        assert f"{name} is a size and must be positive, got {value}" in capfd.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing was created


def test_resume_before_the_first_checkpoint_says_how_to_start(tmp_path, capfd):
    out = tmp_path / "r"
    out.mkdir()
    argv = ["jdiff", "train", "toy2d", "--out", str(out), "--steps", "50"]
    T.append_history(out, T.history_entry("started", argv=argv, start_step=0, total_steps=50))
    code = cli.main(["train", "--out", str(out), "--resume"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "nothing was saved yet" in err[0] and "without --resume" in err[0]
    assert err[0].endswith(f"jdiff train toy2d --out {out} --steps 50"), err


@pytest.mark.parametrize("async_save", [True, False])
def test_a_folder_made_read_only_during_training_fails_one_save_cleanly(tmp_path, capfd, async_save):
    """The checkpoint folder turns read-only between two saves: the failed save raises
    one CheckpointWriteError (from save, wait or close), orbax prints nothing, and the
    step saved before restores exactly."""
    import jax.numpy as jnp

    params = {"w": jnp.arange(12.0).reshape(3, 4)}
    state = T.init_train_state(params, T.make_optimizer(1e-3), 0)
    d = tmp_path / "ckpt"
    ck = T.Checkpointer(d, save_every=1, async_save=async_save)
    ck.save(1, state)
    ck.wait()
    if shutil.which("chattr") is None or not _immutable(d, True):
        ck.close()
        pytest.skip("chattr +i is not available here (file system or container)")
    try:
        with pytest.raises(T.CheckpointWriteError) as info:
            ck.save(2, state._replace(step=jnp.int32(2)))
            ck.wait()
        ck.close()  # the failure was raised once: closing does not raise it again
    finally:
        _immutable(d, False)
    e = info.value
    assert e.errno == 1 and str(e) == f"cannot write step 2 in {d}: Operation not permitted", str(e)
    assert capfd.readouterr().err == ""
    with T.Checkpointer(d, read_only=True) as ck:
        restored = ck.restore(state)
    assert restored.step == 1
    for x, y in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
