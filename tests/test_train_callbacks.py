"""Callbacks of ``jdiff.train.train`` from Python (issue 22, point 2): where a run starts,
every step, how it ended; the metrics log, stopping at a step, stopping on a signal."""

from __future__ import annotations

import json
import os
import signal

import _train_worker as W
import jax
import numpy as np
import pytest

from jdiff import train as T


class Record(T.Callback):
    def __init__(self):
        self.events = []

    def on_start(self, step):
        self.events.append(("start", step))

    def on_step(self, step, metrics, state):
        self.events.append(("step", step))

    def on_end(self, result):
        self.events.append(("end", None if result is None else (result.step, result.stopped)))


@pytest.fixture(scope="module")
def setup():
    return W.loss_fn(), W.optimizer(8), lambda step: W.global_batch(step, 8, seed=5)


def _kw(setup):
    loss, opt, data = setup
    return loss, data, dict(optimizer=opt, seed=3, handle_sigterm=False, ema_decay=None)


def test_callbacks_see_start_steps_and_end_and_the_log_is_exact(setup, tmp_path):
    loss, data, kw = _kw(setup)
    rec, calls = Record(), []
    log = T.MetricsLog(tmp_path / "metrics.jsonl", every=2, total_steps=8, batch_size=8)
    first = T.train(
        loss,
        W.init_params(0),
        data,
        8,
        callbacks=[rec, log, T.StopAt(5), lambda s, m, st: calls.append(s)],
        checkpoint_dir=tmp_path / "ckpt",
        save_every=100,
        **kw,
    )
    assert (first.step, first.stopped, first.preempted) == (5, True, False)
    assert rec.events == [("start", 0)] + [("step", s) for s in range(1, 6)] + [("end", (5, True))]
    assert calls == [1, 2, 3, 4, 5]  # a plain function is an on_step
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2 steps, and the step it stopped at
    assert all(r["steps_per_sec"] > 0 and r["samples_per_sec"] == r["steps_per_sec"] * 8 for r in rows)
    assert rows[0].keys() == {"step", "steps_per_sec", "samples_per_sec", "wall_time"} | set(first.metrics)

    # resuming: on_start is told the restored step, and the run equals one that never stopped
    rec2 = Record()
    resumed = T.train(loss, W.init_params(0), data, 8, callbacks=[rec2], checkpoint_dir=tmp_path / "ckpt", **kw)
    assert rec2.events[0] == ("start", 5) and rec2.events[-1] == ("end", (8, False))
    full = T.train(loss, W.init_params(0), data, 8, **kw)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_on_end_is_told_of_an_exception(setup):
    loss, data, kw = _kw(setup)
    rec = Record()

    def boom(step, metrics, state):
        if step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        T.train(loss, W.init_params(0), data, 8, callbacks=[rec, boom], **kw)
    assert rec.events[-1] == ("end", None)


def test_stop_signals_stop_on_sigint_and_sigterm(setup):
    loss, data, kw = _kw(setup)
    for sig, preempted in ((signal.SIGINT, False), (signal.SIGTERM, True)):
        signals = T.StopSignals(message=None)

        def send(step, metrics, state, sig=sig):
            if step == 3:
                os.kill(os.getpid(), sig)

        with signals:
            r = T.train(
                loss, W.init_params(0), data, 8, callbacks=[send, signals], **(kw | {"stop_flag": signals.flag})
            )
        assert (r.step, r.stopped, r.preempted, signals.interrupted) == (3, True, preempted, not preempted)
