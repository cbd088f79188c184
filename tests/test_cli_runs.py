"""Run safety of ``jdiff train`` / ``jdiff sample`` (issue 14, points 1-4 and 7): each
test reproduces the reported problem on a tiny toy2d run and asserts the fixed
behaviour. Runs are in-process (``jdiff.cli.main``); ``capfd`` captures what reaches
the file descriptors too (TensorStore / absl output, warnings)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from jdiff import cli
from jdiff import train as T

TINY = [
    "model.mlp.width=16",
    "model.mlp.num_blocks=1",
    "train.batch_size=32",
    "data.toy_size=256",
    "train.log_every=1",
    "train.checkpoint_every=10",
    "train.keep=3",
    "train.grid_every=0",
    "sample.num=16",
    "sample.nfe=2",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "optim.final_lr=1e-4",
]
SETS = sum((["--set", s] for s in TINY), [])
STEPS = 20


def jdiff(capfd, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def tree_hash(root) -> dict:
    """``{relative path: sha256}`` of every file under ``root`` and every directory
    (as ``"dir"``), so that renames, new files and changed bytes all show."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def metrics(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_lines(run) -> list[str]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return f.read().splitlines()


def lr_by_step(run) -> dict[int, float]:
    return {int(r["step"]): float(r["lr"]) for r in metrics(run)}


def corrupt_meta(run, step) -> None:
    """Make a checkpoint step unreadable the way the issue did: its ``meta`` item's
    JSON document becomes ``{"x``."""
    path = os.path.join(run, "checkpoints", str(step), "meta", "metadata")
    assert os.path.isfile(path), sorted(os.listdir(os.path.join(run, "checkpoints", str(step))))
    with open(path, "w") as f:
        f.write('{"x')


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A toy2d run trained to step 20 of 20 (checkpoints 10 and 20, lr logged at every
    step). Tests work on copies."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    code = cli.main(["train", "toy2d", "--out", str(out), "--no-progress", "--steps", str(STEPS)] + SETS)
    assert code == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]
    return out


@pytest.fixture
def run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def plan_lr(total, extensions, step):
    """The learning rate of update ``step`` (0-based) under the run's settings."""
    return float(T.lr_schedule(1e-2, warmup_steps=2, total_steps=total, final_lr=1e-4, extensions=extensions)(step))


# ------------------------------------------------------------ 1. extending a run


def test_extending_a_finished_run_continues_the_lr_schedule(run, capfd):
    before = metric_lines(run)
    lr0 = lr_by_step(run)
    # Extend 20 -> 40, stopping half way; then a plain --resume (config.json now says 40).
    code, out, err = jdiff(capfd, "train", "--out", run, "--resume", "--steps", 40, "--stop-at", 30, "--no-progress")
    assert code == 0, err
    assert "schedule continues from step 20" in out
    code, out, err = jdiff(capfd, "train", "--out", run, "--resume", "--no-progress")
    assert code == 0, err
    assert metric_lines(run)[:STEPS] == before  # what was logged stays as it was
    lr = lr_by_step(run)
    assert sorted(lr) == list(range(1, 41))
    # The metrics' lr of step s is that of update s - 1. Before the extension the run's
    # schedule had reached final_lr at step 20; the first step after the extension uses
    # exactly that lr (no jump; before the fix: the 40-step schedule restarted, ~50x higher).
    in_force = plan_lr(STEPS, (), STEPS)
    assert in_force == pytest.approx(1e-4, rel=1e-6)
    assert lr[21] == pytest.approx(in_force, rel=1e-6)
    assert lr[21] <= lr0[20]
    restarted = plan_lr(40, (), STEPS)
    assert restarted > 10 * lr[21]
    # ... and it stays at final_lr up to the new total (the decay was complete).
    for s in range(21, 41):
        assert lr[s] == pytest.approx(1e-4, rel=1e-6), s
    # The record says what happened: config.json holds the extended total, the history one
    # "started" and one "stopped"/"finished" entry per training invocation, appended.
    assert json.load(open(run / "config.json"))["train"]["steps"] == 40
    h = T.read_history(run)
    assert [e["event"] for e in h] == ["started", "finished", "started", "stopped", "started", "finished"]
    assert [(e["start_step"], e.get("end_step"), e["total_steps"]) for e in h] == [
        (0, None, 20),
        (0, 20, 20),
        (20, None, 40),
        (20, 30, 40),
        (30, None, 40),
        (30, 40, 40),
    ]
    assert "schedule extended at 20 to 40" in h[2]["what"] and h[2]["argv"][:2] == ["jdiff", "train"]
    assert T.schedule_plan(h) == (20, ((20, 40),))


def test_extending_a_run_mid_decay_replans_only_the_rest(run, capfd):
    # The run at step 10 of 20 (its step 20 lost), extended to 40: from step 10 on the
    # cosine continues from the phase it had reached and ends at final_lr at step 40.
    shutil.rmtree(run / "checkpoints" / "20")
    lr0 = lr_by_step(run)
    code, out, err = jdiff(capfd, "train", "--out", run, "--resume", "--steps", 40, "--no-progress")
    assert code == 0, err
    lr = lr_by_step(run)
    assert sorted(lr) == list(range(1, 41))
    assert all(lr[s] == lr0[s] for s in range(1, 11))
    # The first step after the extension uses the lr the uninterrupted run used there.
    assert lr[11] == pytest.approx(lr0[11], rel=1e-6)
    assert plan_lr(40, (), 10) > 1.2 * lr[11]  # what a restarted 40-step schedule would give
    for s in range(11, 41):
        # (float32 on device vs float64 here: a few ulps)
        assert lr[s] == pytest.approx(plan_lr(20, ((10, 40),), s - 1), rel=1e-5), s
    assert all(lr[s + 1] <= lr[s] for s in range(10, 40))  # keeps decaying
    assert plan_lr(20, ((10, 40),), 40) == pytest.approx(1e-4, rel=1e-6)  # final_lr at the new total
    assert lr[40] < 1.2e-4


# ------------------------------------------------------- 2. every checkpoint corrupt


def test_resume_with_every_checkpoint_corrupt_fails_and_changes_nothing(run, capfd):
    for step in (10, 20):
        corrupt_meta(run, step)
    snapshot = tree_hash(run)
    for argv in (
        ["train", "--out", run, "--resume", "--no-progress"],
        ["train", "--out", run, "--resume", "--steps", 40, "--no-progress"],
        ["train", "toy2d", "--out", run, "--steps", 40, "--no-progress", *SETS],  # resume implied by --out
    ):
        code, out, err = jdiff(capfd, *argv)
        assert code != 0, out
        lines = err.strip().splitlines()
        assert lines[0].startswith("jdiff train: error: no usable checkpoint in "), err
        assert "all 2 steps found are unreadable or corrupt" in lines[0]
        listed = [line.strip() for line in lines[1:]]
        assert [line.split(":")[0] for line in listed] == ["step 20", "step 10"], err
        assert all("JSON" in line or "json" in line for line in listed), err
        assert "Traceback" not in err and "resumed" not in out
        assert tree_hash(run) == snapshot  # every file byte-identical, nothing renamed
    assert len(metrics(run)) == STEPS


# ------------------------------------------------ 3. the record: nothing to do, config


def test_a_command_that_trains_nothing_changes_nothing(run, capfd):
    snapshot = tree_hash(run)
    for extra in (["--steps", 10], [], ["--steps", 40, "--stop-at", 15], ["--steps", 20]):
        code, out, err = jdiff(capfd, "train", "--out", run, "--resume", "--no-progress", *extra)
        assert code == 0, err
        assert "nothing to do" in out and "step 20" in out
        assert tree_hash(run) == snapshot
    # config.json still holds the run's total: a plain --resume later still knows the run.
    assert json.load(open(run / "config.json"))["train"]["steps"] == STEPS


def test_resume_cannot_change_forbidden_settings(run, capfd):
    snapshot = tree_hash(run)
    code, _, err = jdiff(capfd, "train", "--out", run, "--resume", "--set", "optim.lr=0.1")
    assert code == 2
    assert "optim.lr: 0.01 -> 0.1" in err
    code, _, err = jdiff(
        capfd,
        "train",
        "--out",
        run,
        "--resume",
        "--set",
        "optim.lr=0.1",
        "--set",
        "model.mlp.width=32",
        "--set",
        "objective.prediction=eps",
        "--set",
        "data.toy_size=512",
        "--set",
        "train.log_every=5",  # allowed, not listed
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert "different configuration" in lines[0] and "cannot change 4 of its settings" in lines[0]
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "data.toy_size",
        "model.mlp.width",
        "objective.prediction",
        "optim.lr",
    ]
    assert tree_hash(run) == snapshot


def test_missing_config_needs_the_full_configuration_again(run, capfd):
    os.remove(run / "config.json")
    snapshot = tree_hash(run)
    # Before: resumed under any --set without a word.
    for extra in ([], ["--set", "optim.lr=0.1"], ["--steps", 30]):
        code, _, err = jdiff(capfd, "train", "--out", run, "--resume", "--no-progress", *extra)
        assert code == 2
        assert "config.json is missing" in err and "--replace-config" in err
        assert tree_hash(run) == snapshot
    # --replace-config needs the configuration itself.
    code, _, err = jdiff(capfd, "train", "--out", run, "--resume", "--replace-config", "--steps", 30)
    assert code == 2 and "--preset NAME" in err
    assert tree_hash(run) == snapshot
    # A wrong model is caught by the checkpoints (nothing changed either).
    code, _, err = jdiff(
        capfd, "train", "--out", run, "--resume", "--preset", "toy2d", "--replace-config", *SETS,
        "--set", "model.mlp.width=32", "--steps", 30,
    )  # fmt: skip
    assert code == 2 and "different model" in err
    assert tree_hash(run) == snapshot
    # The full configuration, stated explicitly: resumes (at step 20) and records it.
    run_json = (run / "run.json").read_bytes()
    code, out, err = jdiff(
        capfd, "train", "--out", run, "--resume", "--preset", "toy2d", "--replace-config", *SETS,
        "--steps", 30, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "resumed from checkpoint step 20" in out
    assert json.load(open(run / "config.json"))["train"]["steps"] == 30
    assert (run / "run.json").read_bytes() == run_json  # run.json is not rewritten on resume
    h = T.read_history(run)
    assert h[2]["event"] == "started" and "--replace-config" in h[2]["what"]
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))


# ------------------------------------------------------ 4. sampling a corrupt run


def test_sample_uses_the_previous_good_checkpoint_and_changes_nothing(run, tmp_path, capfd):
    corrupt_meta(run, 20)
    snapshot = tree_hash(run)
    img = tmp_path / "s.png"
    code, out, err = jdiff(capfd, "sample", "--run", run, "--num", 8, "--out", img)
    assert code == 0, err
    said = [line for line in err.splitlines() if "checkpoint step 20" in line]
    assert len(said) == 1 and "corrupt" in said[0] and "using step 10" in said[0], err
    assert "moved" not in said[0]
    assert "from step 10" in out
    assert int(np.load(tmp_path / "s.npz")["step"]) == 10
    assert tree_hash(run) == snapshot  # read-only: nothing renamed or written
    # An explicit --step of the corrupt checkpoint is an error, still changing nothing.
    code, _, err = jdiff(capfd, "sample", "--run", run, "--num", 8, "--out", img, "--step", 20, "--force")
    assert code == 2 and "step 20" in err and "unusable" in err
    assert tree_hash(run) == snapshot


# ------------------------------------------ 7. noise: one clean line, reported once


def test_truncated_checkpoint_is_one_clean_line_and_resume_is_reported_once(run, capfd):
    # Truncate the array data files of the newest checkpoint (TensorStore reads them).
    data = run / "checkpoints" / "20" / "state" / "ocdbt.process_0" / "d"
    for name in os.listdir(data):
        with open(data / name, "r+b") as f:
            f.truncate(os.path.getsize(data / name) // 2)
    kept = metric_lines(run)[:10]
    code, out, err = jdiff(capfd, "train", "--out", run, "--resume", "--steps", 25, "--no-progress")
    assert code == 0, err
    said = [line for line in (out + err).splitlines() if "checkpoint step 20" in line]
    assert len(said) == 1, out + err
    assert said[0].startswith("checkpoint step 20 in ") and "is corrupt (" in said[0]
    assert "using step 10; moved to corrupt_step_20" in said[0]  # a writing command quarantines it
    for noise in ("RuntimeWarning", "Warning:", "source locations", "TensorStore details", "bound method", ".py:"):
        assert noise not in out + err, out + err
    resumed = [line for line in (out + err).splitlines() if "resumed" in line]
    assert resumed == [f"resumed from checkpoint step 10 in {run / 'checkpoints'}"]
    # metrics.jsonl keeps every line the restored step had logged; 11..25 are redone.
    assert metric_lines(run)[:10] == kept
    assert [r["step"] for r in metrics(run)] == list(range(1, 26))
    assert sorted(os.listdir(run / "checkpoints")) == ["10", "20", "25", "corrupt_step_20"]
