"""Training a student in a folder and shipping it (jdiff.distill._run, ``jdiff distill``,
``jdiff sample --student``), on a tiny toy2d teacher with a test-only recipe: the student
starts as half the teacher's weights and learns the teacher's output back (an MSE to
the teacher, so the weights move and the loss falls), and samples with Euler steps of
its own flow, refusing more steps than it was trained for."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import cli, distill
from jdiff import runs as RN
from jdiff.distill import METHODS, DistillError, Recipe, Setup
from jdiff.distill._student import _layout, _target, resolve_options
from jdiff.features.digits import digits_classifier

TINY = [
    "model.mlp.width=16",
    "model.mlp.num_blocks=1",
    "data.toy_size=256",
    "data.class_conditional=true",
]
STEPS = 6
KW = dict(steps=STEPS, batch_size=32, lr=1e-2, save_every=2, log_every=1, progress=False, argv=["test"])


class CopyRecipe(Recipe):
    """A test recipe: learn the teacher back from half its weights (MSE to the teacher
    at random times), sample with Euler steps of the student's flow."""

    name = "copy-test"
    paper = "none (a test recipe)"

    def build(self, teacher, *, steps=2, scale=0.5, total_steps=1000, init=None, ema_target=None, shift=0.0):
        if steps < 1:
            raise DistillError(f"steps must be >= 1, got {steps}")
        apply = teacher.apply

        def loss_fn(params, batch, keys, *, frozen=None):
            x, y = batch["x"], batch["label"]
            t = jax.vmap(lambda k: jax.random.uniform(k, (), minval=0.05, maxval=0.95))(keys)
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x.shape[1:]))(keys)
            tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
            xt = (1 - tb) * x + tb * eps
            d = apply(params, xt, t, y) - apply(frozen, xt, t, y)
            loss = jnp.mean(d**2)
            return loss, {"loss": loss}

        params = jax.tree.map(lambda a: a * scale, teacher.params if init is None else init)
        notes = {"scale": scale, "ema_decay": ema_target}
        return Setup(params=params, frozen=teacher.params, loss_fn=loss_fn, steps=steps, notes=notes)

    def sample(self, teacher, params, noise, *, steps, trained_steps, cond=None, key=None, shift=0.0):
        if steps > trained_steps:
            raise DistillError(f"this student was trained for {trained_steps} steps; {steps} asked")
        return shift + jdiff.sample(jdiff.solvers.get("euler"), teacher.denoiser(params), noise, nfe=steps, cond=cond)


@pytest.fixture(scope="module", autouse=True)
def recipe():
    METHODS["copy-test"] = CopyRecipe()
    yield METHODS["copy-test"]
    del METHODS["copy-test"]


def _model_folder(path, overrides):
    """A model folder (as export_pretrained writes) of a toy2d network with random weights
    (the network's zero-initialized output layer included)."""
    cfg = RN.apply_overrides(RN.get_preset("toy2d"), overrides)
    run = RN.build_run(cfg)
    os.makedirs(path)
    rng = np.random.default_rng(0)
    flat = {k: np.asarray(v) for k, v in RN.flatten_params(run.params).items()}
    flat = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat.items()}
    np.savez(os.path.join(path, "params.npz"), **flat)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(RN.config_to_dict(run.cfg), f)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"data_shape": list(run.data_shape), "num_classes": run.num_classes}, f)
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("teacher") / "toy", TINY)


@pytest.fixture(scope="module")
def student(teacher_dir, tmp_path_factory):
    """A finished student folder (trained without a stop)."""
    out = str(tmp_path_factory.mktemp("students") / "whole")
    o = distill.distill_run("copy-test", teacher_dir, out, options={"steps": 2}, **KW)
    assert o.finished and o.step == STEPS and o.student == out
    return out


def _arrays(folder):
    with np.load(os.path.join(folder, "params.npz")) as f:
        return {k: f[k] for k in f.files}


def test_student_folder_loads_back_and_samples(student, teacher_dir):
    names = set(os.listdir(student))
    shipped = {"params.npz", "student.json", "TRAINED.md", "samples.png", "metrics.jsonl", "loss.png", "history.jsonl"}
    assert shipped <= names
    info = json.load(open(os.path.join(student, "student.json")))
    # total_steps (a curriculum's length) follows the training's steps when left out
    assert info["method"] == "copy-test" and info["steps"] == 2 and info["options"] == {"steps": 2, "total_steps": 6}
    assert info["process"]["name"] == "rectified_flow" and info["teacher"]["source"] == teacher_dir
    assert info["training"]["step"] == STEPS and info["params"]["layout"] == "teacher"
    trained = open(os.path.join(student, "TRAINED.md")).read()
    assert "jdiff distill --method copy-test" in trained and "--set steps=2" in trained
    losses = [json.loads(line)["loss"] for line in open(os.path.join(student, "metrics.jsonl"))]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # the weights moved towards the teacher

    s = distill.load_student(student)
    assert s.steps == 2 and s.teacher.num_classes == 2
    teacher = distill.load_teacher(teacher_dir)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - 0.5 * b))), s.params, teacher.params)
    assert max(jax.tree.leaves(moved)) > 0  # trained, not the initial half weights
    x = distill.sample_student(s, 8, jax.random.key(0), cond=np.arange(8) % 2)
    assert x.shape == (8, 2) and bool(jnp.all(jnp.isfinite(x)))
    x1 = distill.sample_student(s, 8, jax.random.key(0), steps=1, cond=np.arange(8) % 2)
    assert not np.allclose(x, x1)  # another step count, another sampler
    with pytest.raises(DistillError, match="trained for 2 steps; 3 asked"):
        distill.sample_student(s, 8, jax.random.key(0), steps=3)
    # a sampling option the student was built with is passed as built
    shifted = dataclasses.replace(s, options=dict(s.options, shift=5.0))
    x5 = distill.sample_student(shifted, 8, jax.random.key(0), cond=np.arange(8) % 2)
    np.testing.assert_allclose(x5, x + 5.0, rtol=0, atol=1e-5)


def test_resume_after_a_stop_gives_the_same_student(student, teacher_dir, tmp_path):
    out = str(tmp_path / "stopped")
    o = distill.distill_run("copy-test", teacher_dir, out, options={"steps": 2}, stop_at=3, **KW)
    assert not o.finished and o.step == 3 and o.stopped == "stop_at 3" and o.student is None
    assert not os.path.exists(os.path.join(out, "student.json"))
    o = distill.distill_run("copy-test", teacher_dir, out, options={"steps": 2}, **KW)
    assert o.finished and o.step == STEPS
    a, b = _arrays(student), _arrays(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))
    # finished: a second call trains nothing; a student lost after the last checkpoint is written again
    os.remove(os.path.join(out, "student.json"))
    os.remove(os.path.join(out, "params.npz"))
    o = distill.distill_run("copy-test", teacher_dir, out, options={"steps": 2}, **KW)
    assert o.nothing_to_do and o.step == STEPS and o.student == out
    b = _arrays(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # other settings are refused, each on its own line
    with pytest.raises(DistillError, match=r"(?s)other settings.*options.steps: 2 -> 1.*train.lr"):
        distill.distill_run("copy-test", teacher_dir, out, options={"steps": 1}, **dict(KW, lr=1e-3))


def test_students_chain_and_layouts(student, teacher_dir, tmp_path):
    s = distill.load_student(student)
    # a student folder as an option value stands for its parameters (the next round)
    resolved = resolve_options({"init": student, "steps": 2, "pairs": str(tmp_path)})
    assert resolved["steps"] == 2 and resolved["pairs"] == str(tmp_path)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), resolved["init"], s.params))
    # a smaller network of the teacher's architecture keeps its shapes in the record
    small = jax.tree.map(lambda a: jnp.zeros(a.shape[:-1] + (1,), a.dtype), s.teacher.params)
    layout = _layout({"gen": small, "aux": s.params, "w": jnp.ones(3)}, s.teacher.params)
    assert layout["dict"]["aux"] == "teacher" and "teacher_tree" in layout["dict"]["gen"]
    target = _target(json.loads(json.dumps(layout)), s.teacher.params)
    assert jax.tree.structure(target) == jax.tree.structure({"gen": small, "aux": s.params, "w": jnp.ones(3)})
    assert [t.shape for t in jax.tree.leaves(target["gen"])] == [a.shape for a in jax.tree.leaves(small)]
    # a method with an EMA target sets the decay; another one is refused before training
    with pytest.raises(DistillError, match="keeps an EMA of the student as its target"):
        opts = {"ema_target": 0.9}
        distill.distill_run("copy-test", teacher_dir, str(tmp_path / "e"), options=opts, **dict(KW, ema_decay=0.5))


def test_export_and_shipped_students(student, tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    distill.export_student(student, assets / "student_tiny")
    assert sorted(os.listdir(assets / "student_tiny")) == sorted(
        ["params.npz", "student.json", "TRAINED.md", "samples.png", "metrics.jsonl", "history.jsonl", "loss.png"]
    )
    monkeypatch.setattr("jdiff.distill._student._assets", lambda: str(assets))
    assert distill.shipped_students() == {"tiny": str(assets / "student_tiny")}
    s = distill.load_student("tiny")
    assert s.folder == str(assets / "student_tiny") and s.steps == 2
    with pytest.raises(DistillError, match=r"no student .*shipped students: tiny"):
        distill.load_student("nope")


def test_the_lock_refuses_a_second_writer(teacher_dir, tmp_path):
    out = tmp_path / "locked"
    with RN.lock_run(out):
        with pytest.raises(RN.RunLockedError, match="is in use"):
            distill.distill_run("copy-test", teacher_dir, str(out), **KW)
    assert os.listdir(out) == [".lock"]


def test_teacher_of_another_process_and_bad_folders(student, teacher_dir, tmp_path):
    vp = _model_folder(tmp_path / "vp", TINY + ["objective.process=vp_cosine", "objective.prediction=v"])
    with pytest.raises(DistillError, match="distilled from a teacher of process rectified_flow.*vp_cosine"):
        distill.load_student(student, teacher=vp)
    assert distill.load_student(student, teacher=teacher_dir).teacher.source == teacher_dir
    with pytest.raises(DistillError, match="no student"):
        distill.load_student(str(tmp_path))
    with pytest.raises(DistillError, match="holds something other than a distillation"):
        distill.distill_run("copy-test", teacher_dir, vp, **KW)
    with pytest.raises(DistillError, match="unknown method 'nope'"):
        distill.distill_run("nope", teacher_dir, str(tmp_path / "x"), **KW)


def test_options_are_read_by_the_recipes_defaults():
    assert distill.parse_options("copy-test", ["steps=4", "scale=0.25"]) == {"steps": 4, "scale": 0.25}
    with pytest.raises(DistillError, match="unknown option 'bogus'.*steps=2, scale=0.5, total_steps=1000"):
        distill.parse_options("copy-test", ["bogus=1"])
    with pytest.raises(DistillError, match="option steps: expected an integer"):
        distill.parse_options("copy-test", ["steps=1.5"])


def _cli(capfd, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_errors_are_one_line(student, teacher_dir, tmp_path, capfd):
    code, _, err = _cli(capfd, "distill", "--method", "nope", "--teacher", teacher_dir, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'nope'" in err and "copy-test" in err
    code, _, err = _cli(capfd, "distill", "--method", "copy-test", "--teacher", tmp_path / "none", "--out", tmp_path)
    shipped = ", ".join(RN.PRETRAINED)  # the message names every shipped model
    assert code == 2 and err.count("\n") == 1 and f"not a shipped model ({shipped}) and no such folder" in err
    code, _, err = _cli(capfd, "distill", "--method", "copy-test", "--teacher", teacher_dir, "--set", "bogus=1")
    assert code == 2 and err.count("\n") == 1
    code, _, err = _cli(capfd, "sample", "--student", student, "--steps", "3")
    assert code == 2 and err == "jdiff sample: error: this student was trained for 2 steps; 3 asked\n"
    code, _, err = _cli(capfd, "sample", "--student", student, "--label", "2")
    assert code == 2 and err == "jdiff sample: error: --label must be in [0, 2), got 2\n"
    code, _, err = _cli(capfd, "sample", "--student", student, "--nfe", "3")
    assert code == 2 and "--steps" in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(student, "samples"))


def test_cli_sample_from_a_student(student, tmp_path, capfd):
    out = tmp_path / "s.png"
    code, text, err = _cli(capfd, "sample", "--student", student, "--num", "6", "--steps", "1", "--out", out)
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        assert f["samples"].shape == (6, 2) and np.all(np.isfinite(f["samples"]))
        assert list(f["labels"]) == [0, 1, 0, 1, 0, 1] and int(f["steps"]) == 1
    assert os.path.exists(out) and "6 samples of the copy-test student" in text


def test_students_are_points_on_the_main_jobs_figure(tmp_path, monkeypatch):
    import matplotlib.figure

    from jdiff.sweep import plot_results

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    rows = [dict(solver="ddim", nfe=n, nfe_used=n, fd_digits=v) for n, v in ((4, 2.0), (8, 1.0))]
    points = [dict(label="cd", nfe=1, fd_digits=1.5), dict(label="cd", nfe=2, fd_digits=1.2)]
    points += [dict(label="pd", nfe=2, fd_digits=0.9), dict(label="pd", nfe=4, fd_digits=float("nan"))]
    plot_results(rows, str(tmp_path / "f.png"), metric=["fd_digits"], points=points)
    ax = figs[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["cd"].get_xdata()) == [1, 2] and list(lines["cd"].get_ydata()) == [1.5, 1.2]
    assert list(lines["pd"].get_xdata()) == [2] and lines["pd"].get_linestyle() == "None"
    assert list(lines["DDIM / DDPM"].get_xdata()) == [4, 8]
    assert [int(t) for t in ax.get_xticks()] == [1, 2, 4, 8]


def test_benchmark_checks_read_the_issues_thresholds(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "distill.py")
    spec = importlib.util.spec_from_file_location("bench_distill", path)
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    rows = "method,steps,fd_digits,accuracy,train_seconds\ncd,1,0.35,0.98,600\npd,2,0.29,0.99,\n"
    (tmp_path / "rows.csv").write_text(rows)
    students = B.csv_rows(str(tmp_path / "rows.csv"))
    assert [(r["method"], r["nfe"], r["train_seconds"]) for r in students] == [("cd", 1, 600.0), ("pd", 2, None)]
    solvers = [dict(solver="dpm++2m", nfe=20, fd_digits=0.25), dict(solver="ddim", nfe=20, fd_digits=0.3)]
    solvers += [dict(solver="unipc2", nfe=4, fd_digits=0.31), dict(solver="heun", nfe=4, skipped="too few")]
    lines = B.checks(students, solvers)
    assert lines[0].endswith("= 1.40x -> yes") and "dpm++2m 0.25" in lines[0]  # 0.35 / 0.25 <= 1.5
    assert lines[1].endswith("= 1.16x -> yes")  # 0.29 / 0.25 <= 1.2
    assert "unipc2 0.31 -> yes" in lines[2]  # 0.29 < 0.31, the skipped cell ignored
    assert "NO" in B.checks([dict(students[0], fd_digits=0.4)], solvers)[0]


def test_the_shipped_reflow_student_draws_classified_digits_in_one_step():
    """The student shipped in jdiff/assets/student_reflow loads by name and, in one network
    call, draws digits the classifier reads as their labels (0.977 on 1,000 samples in its
    TRAINED.md; an untrained or mis-loaded network gives chance level, 0.1); asked for more
    steps than it was trained for, it refuses."""
    assert "reflow" in distill.shipped_students()
    s = distill.load_student("reflow")
    labels = np.arange(40, dtype=np.int32) % 10
    x = np.asarray(distill.sample_student(s, 40, jax.random.key(0), steps=1, cond=labels))
    assert x.shape == (40, 8, 8, 1) and np.all(np.isfinite(x))
    assert digits_classifier().accuracy(np.clip(x, -1, 1), labels) >= 0.8
    with pytest.raises(DistillError, match=r"trained for at most 4 step\(s\); asked for 5"):
        distill.sample_student(s, 4, jax.random.key(0), steps=5, cond=labels[:4])
