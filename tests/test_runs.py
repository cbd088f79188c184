"""A run's record (jdiff.train._run): atomic config, append-only history, the
learning-rate plan derived from it, resume rules and metrics trimming."""

import json
import os

import pytest

from jdiff import train as T


def _cfg(**train):
    return {
        "name": "toy2d",
        "model": {"kind": "mlp", "mlp": {"width": 128, "num_blocks": 3}},
        "objective": {"process": "rectified_flow", "prediction": "flow"},
        "data": {"source": "toy", "toy_size": 20000},
        "optim": {"lr": 0.003, "warmup_steps": 50, "final_lr": 1e-5},
        "train": {"steps": 2000, "batch_size": 256, "seed": 0, "log_every": 10, "checkpoint_every": 500, **train},
        "sample": {"solver": "heun", "nfe": 20},
    }


# --------------------------------------------------------------------- config


def test_config_round_trip_is_atomic_and_missing_or_unreadable_is_an_error(tmp_path):
    cfg = _cfg()
    T.write_config(tmp_path, cfg)
    assert T.read_config(tmp_path) == cfg
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        T.write_config(tmp_path, {"bad": object()})
    assert T.read_config(tmp_path) == cfg  # a failed write leaves the old file intact

    (tmp_path / "config.json").write_text('{"x')
    with pytest.raises(T.RunRecordError, match=r"config.json is unreadable \(JSONDecodeError.*full configuration"):
        T.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(T.RunRecordError, match="unreadable .*JSON list"):
        T.read_config(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(T.RunRecordError, match="config.json is missing: a run cannot be resumed"):
        T.read_config(tmp_path)
    # only when the caller explicitly passes the full configuration
    assert T.read_config(tmp_path, replacement=cfg) == cfg
    assert not os.path.exists(tmp_path / "config.json")  # reading never writes


def test_resume_policy_allows_steps_logging_checkpoints_sampling_only():
    saved = _cfg()
    req = _cfg(steps=3000, log_every=1, checkpoint_every=100)
    req["sample"]["nfe"] = 50
    ok = T.check_resume_config(saved, req)
    assert ok == {
        "sample.nfe": (20, 50),
        "train.checkpoint_every": (500, 100),
        "train.log_every": (10, 1),
        "train.steps": (2000, 3000),
    }
    assert T.check_resume_config(saved, _cfg()) == {}
    bad = _cfg(steps=3000, batch_size=128)
    bad["optim"]["lr"] = 0.1
    bad["model"]["mlp"]["width"] = 64
    bad["objective"]["prediction"] = "eps"
    bad["data"]["extra"] = 1
    del bad["data"]["toy_size"]
    with pytest.raises(T.ResumeConfigError) as info:
        T.check_resume_config(saved, bad)
    e = info.value
    assert sorted(e.forbidden) == [
        "data.extra",
        "data.toy_size",
        "model.mlp.width",
        "objective.prediction",
        "optim.lr",
        "train.batch_size",
    ]
    lines = str(e).splitlines()
    assert lines[0].startswith("resuming cannot change 6 setting(s)")
    assert "  optim.lr: 0.003 -> 0.1" in lines and "  data.toy_size: 20000 -> <missing>" in lines
    assert len(lines) == 7 and not any("train.steps" in x for x in lines[1:])


# -------------------------------------------------------------------- history


def test_history_is_append_only_and_survives_a_torn_line(tmp_path):
    e1 = T.append_history(
        tmp_path,
        T.history_entry("started", argv=["jdiff", "train"], start_step=0, total_steps=1000),
    )
    assert e1["event"] == "started" and "time" in e1 and "end_step" not in e1
    before = (tmp_path / "history.jsonl").read_bytes()
    T.append_history(tmp_path, T.history_entry("trained", start_step=0, end_step=1000, what="trained 0->1000"))
    after = (tmp_path / "history.jsonl").read_bytes()
    assert after.startswith(before)  # earlier lines untouched
    with open(tmp_path / "history.jsonl", "ab") as f:
        f.write(b'{"event": "started", "sta')  # a crash mid-append
    with pytest.raises(TypeError):
        T.append_history(tmp_path, {"event": "x", "bad": object()})
    T.append_history(tmp_path, T.history_entry("nothing_to_do", start_step=1000, what="nothing to do"))
    got = T.read_history(tmp_path)
    assert [e["event"] for e in got] == ["started", "trained", "nothing_to_do"]
    assert got[0] == e1 and got[1]["what"] == "trained 0->1000"
    assert (tmp_path / "history.jsonl").read_bytes().startswith(after)
    assert T.read_history(tmp_path / "nowhere") == []


def _started(a, n):
    return T.history_entry("started", start_step=a, total_steps=n)


def test_schedule_plan_from_history():
    assert T.schedule_plan([]) == (None, ())
    h = [_started(0, 1500), T.history_entry("trained", start_step=0, end_step=1500)]
    assert T.schedule_plan(h) == (1500, ())
    h.append(_started(1000, 1500))  # a plain resume changes nothing
    assert T.schedule_plan(h) == (1500, ())
    h.append(_started(1500, 3000))  # the case: a finished run continued to 3000
    assert T.schedule_plan(h) == (1500, ((1500, 3000),))
    h.append(_started(2000, 3000))  # killed, resumed: same plan, so the same learning rates
    assert T.schedule_plan(h) == (1500, ((1500, 3000),))
    h.append(_started(2200, 4000))
    assert T.schedule_plan(h) == (1500, ((1500, 3000), (2200, 4000)))
    # checkpoints after 1800 lost: the change at 2200 belongs to lost training
    h.append(_started(1800, 3000))
    assert T.schedule_plan(h) == (1500, ((1500, 3000),))
    h.append(_started(1500, 2500))  # back at the change point with another total: replaces it
    assert T.schedule_plan(h) == (1500, ((1500, 2500),))
    total, ext = T.schedule_plan(h)
    T.lr_schedule(1e-3, warmup_steps=10, total_steps=total, extensions=ext)  # a valid plan


# -------------------------------------------------------------------- metrics


def _write_metrics(path, steps, tail=""):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "wall_time": float(s)}) + "\n")
        f.write(tail)


def test_trim_metrics_keeps_what_the_restored_step_logged(tmp_path):
    p = tmp_path / "metrics.jsonl"
    _write_metrics(p, range(1, 11))
    original = p.read_text()
    assert T.trim_metrics(p, None) == 10.0 and p.read_text() == original  # nothing restored: untouched
    assert T.trim_metrics(p, 10) == 10.0 and p.read_text() == original
    assert T.trim_metrics(p, 25) == 10.0 and p.read_text() == original  # never below the restored step
    assert T.trim_metrics(p, 6) == 6.0
    assert p.read_text() == "".join(original.splitlines(keepends=True)[:6])
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    # a line torn by a crash mid-append is dropped; the rest kept
    _write_metrics(p, range(1, 5), tail='{"step": 5, "lo')
    assert T.trim_metrics(p, 4) == 4.0
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4]
    assert T.trim_metrics(p, 0) == 0.0 and p.read_text() == ""
    assert T.trim_metrics(tmp_path / "absent.jsonl", 3) == 0.0 and not (tmp_path / "absent.jsonl").exists()
